"""An OpenAI request's JSON body, checked field by field, as what the scheduler runs.

Every field OpenAI's API (and llama-server) accepts and the engine can honour is read; a field it
cannot honour (tools, echo, best_of, ...) or does not know is a 400 that names it, as OpenAI answers
"Unrecognized request argument supplied", rather than silently doing something else. Ranges are
OpenAI's (temperature 0-2, penalties -2 to 2, top_logprobs up to 20, ...)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..errors import PlainLlamaError
from ..sampling_settings import SamplingSettings


class RequestError(Exception):
    """An answer other than 200: OpenAI's error JSON with this status, message, param and code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


COMMON = {
    "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "typical_p", "seed", "stop",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs", "n", "stream",
    "stream_options", "user",
    "store", "metadata", "service_tier",  # bookkeeping fields of OpenAI's that change nothing about the answer
}  # fmt: skip
CHAT = COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION = COMMON | {"prompt"}
MAX_N = 16  # choices per request
MAX_STOPS = 16


@dataclass
class Parsed:
    """A checked request: the prompts (token ids) and what to do with them."""

    prompts: list[list[int]]
    max_tokens: int
    settings: SamplingSettings
    stop: list[str]
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # alternatives per token; None: no log-probabilities
    model: str
    extra: dict = field(default_factory=dict)


def bad(message: str, param: str | None, code: str = "invalid_value") -> RequestError:
    return RequestError(400, message, param, code)


def number(body: dict, name: str, low: float, high: float, default=None, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise bad(f"{name} must be {kind}, got {value!r}", name, "invalid_type")
    if not (math.isfinite(value) and low <= value <= high):
        raise bad(f"{name} must be between {low} and {high}, got {value!r}", name)
    return value


def flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false, got {value!r}", name, "invalid_type")
    return value


def parse(body, chat: bool, llm, served_name: str) -> Parsed:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_request_error")
    unknown = sorted(set(body) - (CHAT if chat else COMPLETION))
    if unknown:
        raise bad(f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0], "unknown_parameter")
    model = body.get("model", served_name)
    if not isinstance(model, str):
        raise bad(f"model must be a string, got {model!r}", "model", "invalid_type")
    if model != served_name:
        raise RequestError(404, f"The model '{model}' does not exist; this server has '{served_name}'", "model",
                           "model_not_found")  # fmt: skip
    prompts = chat_prompt(body, llm) if chat else completion_prompts(body, llm)
    stream = flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise bad("stream_options is only allowed when stream is true", "stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise bad("stream_options must be an object with include_usage", "stream_options")
    include_usage = bool(options and flag(options, "include_usage"))
    n = number(body, "n", 1, MAX_N, 1, integer=True)
    logprobs = read_logprobs(body, chat)
    settings = sampling(body, llm)
    stop = read_stop(body)
    context = llm.args.context_length
    longest = max(len(p) for p in prompts)
    limit_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    # OpenAI's defaults: 16 tokens for a completion; a chat answer may run to the end of the context.
    max_tokens = number(body, limit_name, 1, 1 << 31, None, integer=True)
    if max_tokens is None:
        max_tokens = context - longest if chat else 16
    if longest + max_tokens > context:
        raise bad(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the completion). Please "
            "reduce the length of the prompt or the completion.",
            "messages" if chat else "prompt",
            "context_length_exceeded",
        )
    try:
        llm._check_request(n * len(prompts), longest + max_tokens)
    except PlainLlamaError as e:
        raise RequestError(413, str(e), "max_tokens", "insufficient_memory") from None
    return Parsed(prompts, max_tokens, settings, stop, n, stream, include_usage, logprobs, model)


def chat_prompt(body: dict, llm) -> list[list[int]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    plain = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad(f"{where} must be an object with a role and a content", where)
        if message["role"] not in ("system", "developer", "user", "assistant"):
            raise bad(f"{where}.role {message['role']!r} is not one of system, developer, user, assistant", where)
        plain.append({"role": "system" if message["role"] == "developer" else message["role"],
                      "content": message_text(message.get("content"), where)})  # fmt: skip
    try:
        ids = llm.encode_chat(plain)
    except PlainLlamaError as e:
        raise bad(str(e), "messages") from None
    return [ids]


def message_text(content, where: str) -> str:
    """A message's content: a string, or a list of text parts (OpenAI's newer form)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str) for part in content
    ):
        return "".join(part["text"] for part in content)
    raise bad(f"{where}.content must be a string or a list of text parts (this model reads text only)", where)


def completion_prompts(body: dict, llm) -> list[list[int]]:
    """prompt: a string, a list of token ids, or a list of either (several prompts)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or len(prompt) > MAX_N:
        raise bad(f"prompt must be a string, a list of token ids, or a list of up to {MAX_N} of those", "prompt")
    prompts = []
    for item in prompt:
        if not isinstance(item, (str, list)):
            raise bad("prompt must be a string, a list of token ids, or a list of those", "prompt")
        try:
            ids = llm.encode_prompt(item)
        except PlainLlamaError as e:
            raise bad(str(e), "prompt") from None
        if not ids:
            raise bad("the prompt is empty (no tokens to start from)", "prompt")
        prompts.append(ids)
    return prompts


def read_logprobs(body: dict, chat: bool) -> int | None:
    if chat:
        wanted = flag(body, "logprobs")
        top = number(body, "top_logprobs", 0, 20, None, integer=True)
        if top is not None and not wanted:
            raise bad("top_logprobs needs logprobs to be true", "top_logprobs")
        return (top or 0) if wanted else None
    return number(body, "logprobs", 0, 5, None, integer=True)


def read_stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise bad(f"stop must be a string or a list of up to {MAX_STOPS} strings", "stop")
    return [s for s in stops if s]


def sampling(body: dict, llm) -> SamplingSettings:
    vocab = llm.args.vocab_size
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise bad("logit_bias must be an object of token id -> bias", "logit_bias")
        try:
            bias = {int(k): v for k, v in bias.items()}
        except ValueError:
            raise bad("logit_bias keys must be token ids", "logit_bias") from None
        for token, value in bias.items():
            if not 0 <= token < vocab:
                raise bad(f"logit_bias token {token} is outside the vocabulary (0 to {vocab - 1})", "logit_bias")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
                raise bad(f"logit_bias values must be numbers from -100 to 100, got {value!r}", "logit_bias")
    top_k = number(body, "top_k", 0, vocab, None, integer=True)
    settings = SamplingSettings(
        temperature=number(body, "temperature", 0, 2, 1.0),
        top_p=number(body, "top_p", 0, 1, None),
        top_k=top_k or None,  # 0: no top-k, as llama-server reads it
        min_p=number(body, "min_p", 0, 1, None),
        typical_p=number(body, "typical_p", 0, 1, None),
        repetition_penalty=number(body, "repetition_penalty", 0, 10, None),
        presence_penalty=number(body, "presence_penalty", -2, 2, 0.0),
        frequency_penalty=number(body, "frequency_penalty", -2, 2, 0.0),
        logit_bias={k: float(v) for k, v in (bias or {}).items()},
        seed=seed % (1 << 64) if (seed := number(body, "seed", -(1 << 63), (1 << 64) - 1, None, integer=True))
        is not None else None,  # a negative seed is as good as its two's complement
    )  # fmt: skip
    try:
        settings.check(vocab)
    except PlainLlamaError as e:  # named as on the command line ("--top-p must be in (0, 1]")
        named = re.match(r"--([a-z-]+)", str(e))
        raise bad(str(e).replace("--", "", 1), named.group(1).replace("-", "_") if named else None) from None
    return settings
