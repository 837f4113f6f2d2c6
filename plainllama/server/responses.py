"""The JSON OpenAI's API answers with: completions, chat completions, their streamed chunks, errors.

Field for field as OpenAI documents them (and llama-server and vLLM send them), so that the
official clients parse them: `id`, `object`, `created`, `model`, `choices[]` with `finish_reason`
"stop" or "length" (the model's context running out is "length" too), and `usage` with token counts.
"""

from __future__ import annotations

import time
import uuid

from ..generation.generate import TokenLogprob

OPENAI_FINISH = {"stop": "stop", "length": "length", "context": "length"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},  # read from the prefix cache, not prefilled
    }


def error(message: str, kind: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def head(request_id: str, kind: str, model: str) -> dict:
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "system_fingerprint": None}


def token_text(tokenizer, token: int) -> str:
    return tokenizer.token_bytes[token].decode("utf-8", errors="replace")


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict:
    """Chat's form: per token its text, bytes, log-probability and the top alternatives."""

    def item(token: int, logprob: float) -> dict:
        return {"token": token_text(tokenizer, token), "logprob": logprob, "bytes": list(tokenizer.token_bytes[token])}

    return {
        "content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries],
        "refusal": None,
    }


def completion_logprobs(tokenizer, entries: list[TokenLogprob], offset: int = 0) -> dict:
    """The legacy completions form: parallel lists of tokens, log-probabilities, top alternatives
    (a token -> log-probability object) and each token's character offset in the text."""
    tokens, offsets = [], []
    for e in entries:
        offsets.append(offset)
        tokens.append(token_text(tokenizer, e.token))
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{token_text(tokenizer, t): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }
