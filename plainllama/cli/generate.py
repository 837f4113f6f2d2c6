"""`plainllama generate`: continue a prompt (or a file of prompts as one batch, or beam search)."""

from __future__ import annotations

import json
import os
import re
import sys
import time

import torch

from ..errors import PlainLlamaError
from ..generation.stops import StopMatcher
from ..sampling import SamplingSettings
from .options import load_model, sampling_settings

SAMPLING_NAMES = tuple(SamplingSettings.__dataclass_fields__)


def read_prompts(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise PlainLlamaError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise PlainLlamaError(
            f"{path}: not a text file (byte {e.start} is not UTF-8); expected one prompt per line"
        ) from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("{"):
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
                raise PlainLlamaError(f"{path}: line {number} is not a JSON object with a 'prompt'") from None
            ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
            if not (isinstance(prompt, str) or ids):
                shown = json.dumps(prompt)[:40]
                raise PlainLlamaError(
                    f"{path}: line {number}: 'prompt' must be text or a list of token ids, got {shown}"
                )
            prompts.append(prompt)
        else:
            prompts.append(line)
    if not prompts:
        raise PlainLlamaError(f"{path}: no prompts in the file")
    return prompts


BEAM_OPTIONS = ("num_return", "length_penalty", "early_stopping", "no_repeat_ngram_size")


def given(args, name: str) -> bool:
    """Whether an option was given (its value differs from its default)."""
    default = (
        SamplingSettings.__dataclass_fields__[name].default if name in SamplingSettings.__dataclass_fields__ else None
    )
    value = getattr(args, name)
    return value not in (None, {}) and value != default


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_generate_options(args) -> None:
    """Each combination either works or is refused, naming both options: none is dropped silently."""
    sources = [s for s in (args.prompt is not None, args.file is not None, args.prompts_file is not None) if s]
    if len(sources) > 1:
        raise PlainLlamaError("give one of PROMPT, -f/--file and --prompts-file")
    if args.beams is not None:
        for name in ("draft_model", "prompts_file", "logprobs", *SAMPLING_NAMES):
            if given(args, name):
                raise PlainLlamaError(f"--beams is deterministic and runs one prompt: not with {flag(name)}")
    else:
        for name in BEAM_OPTIONS:
            if getattr(args, name) is not None:
                raise PlainLlamaError(f"{flag(name)} applies to beam search: give --beams N too")
    if args.prompts_file and (args.draft_model or args.chat or args.logprobs is not None):
        other = "--draft-model" if args.draft_model else "--chat" if args.chat else "--logprobs"
        raise PlainLlamaError(f"{other} runs one prompt at a time: not with --prompts-file")
    if (args.system is not None or args.system_file is not None) and not args.chat:
        raise PlainLlamaError(
            f"{'--system' if args.system is not None else '--system-file'} applies to --chat: give --chat too"
        )
    if args.system is not None and args.system_file is not None:
        raise PlainLlamaError("give --system or --system-file, not both")
    if args.logprobs is not None and not args.json:
        raise PlainLlamaError("--logprobs is printed with --json: give --json too")
    if args.throughput and not args.prompts_file:
        raise PlainLlamaError("--throughput measures a batch: give --prompts-file")


def unescape(text: str) -> str:
    """-e/--escape: \\n, \\t, \\r and \\\\ as the characters they name (as llama.cpp's -e does)."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], text)


def read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise PlainLlamaError(f"{path}: cannot read {what} ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise PlainLlamaError(f"{path}: {what} is not UTF-8 text (byte {e.start})") from None


def piped(stream) -> bool:
    """Whether text is being piped in (not a terminal, and not closed)."""
    return stream is not None and not stream.closed and not stream.isatty()


def the_prompt(args) -> str | None:
    """The prompt from PROMPT, -f FILE, or stdin (PROMPT `-`, or none given with text piped in)."""
    if args.file is not None:
        text = read_text(args.file, "the prompt")
    elif args.prompt == "-" or (args.prompt is None and args.prompts_file is None and piped(sys.stdin)):
        text = sys.stdin.read() if sys.stdin is not None else ""
    elif args.prompt is None:
        if args.prompts_file is None:
            raise PlainLlamaError("give a PROMPT, -f/--file PROMPT_FILE, --prompts-file, or pipe text into stdin")
        return None
    else:
        text = args.prompt
    if args.file is not None or args.prompt in ("-", None):
        text = text.removesuffix("\n")  # the line end that `echo` and editors add
    if not text:
        raise PlainLlamaError("the prompt is empty")
    return unescape(text) if args.escape else text


def json_record(llm, prompt_ids: list[int], tokens: list[int], text: str, finish_reason: str, timings: dict) -> dict:
    """The one JSON shape of `generate --json`, for a prompt, each prompt of a batch, and beams (which
    add "beams"): OpenAI's names for the counts (usage), plainllama's for the rest."""
    return {
        "model": llm.checkpoint.path,
        "device": str(llm.device),
        "dtype": str(llm.dtype).removeprefix("torch."),
        "compute": llm.compute,
        "threads": torch.get_num_threads(),
        "world_size": llm.ranks.world if llm.ranks is not None else 1,  # tensor-parallel ranks
        "prompt_ids": prompt_ids,
        "text": text,
        "tokens": tokens,
        "finish_reason": finish_reason,
        "usage": {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": len(tokens),
            "total_tokens": len(prompt_ids) + len(tokens),
        },
        "timings": {"load_seconds": round(llm.load_seconds, 3), **timings},
    }


def run_beams(llm, prompt, args) -> int:
    start = time.perf_counter()
    early = {"true": True, "false": False, "never": "never"}[args.early_stopping or "false"]
    beams = llm.beam_search(
        prompt,
        args.beams,
        args.max_new_tokens,
        1.0 if args.length_penalty is None else args.length_penalty,
        early,
        args.no_repeat_ngram_size or 0,
        args.num_return or 1,
        stop=args.stop,
    )
    seconds = time.perf_counter() - start
    stops = StopMatcher(args.stop)
    texts = [stops.cut(llm.tokenizer.decode([t for t in b.tokens if t not in llm.tokenizer.end_ids])) for b in beams]
    if args.json:
        best = beams[0]
        ended = (
            bool(best.tokens)
            and best.tokens[-1] in llm.tokenizer.end_ids
            or texts[0] != llm.tokenizer.decode(best.tokens)
        )
        generated = [t for t in best.tokens if t not in llm.tokenizer.end_ids]
        ids = prompt if isinstance(prompt, list) else llm.encode_prompt(prompt)
        record = json_record(
            llm, ids, generated, texts[0], "stop" if ended else "length", {"seconds": round(seconds, 4)}
        )
        record["beams"] = [{"tokens": b.tokens, "text": t, "score": b.score} for b, t in zip(beams, texts, strict=True)]
        print(json.dumps(record, ensure_ascii=False))
    else:
        for i, (b, text) in enumerate(zip(beams, texts, strict=True)):
            print(f"[{i + 1}] score {b.score:.4f}:{text}" if len(beams) > 1 else text)
    return 0


def run_batch(llm, prompts: list[str], args) -> int:
    start = time.perf_counter()
    results = llm.generate_batch(prompts, max_new_tokens=args.max_new_tokens, stop=args.stop, **sampling_settings(args))
    seconds = time.perf_counter() - start
    generated = sum(len(r.tokens) for r in results)
    if args.throughput:
        prompt_tokens = sum(len(r.prompt_tokens) for r in results)
        streamer = llm.streamer
        streamed = f", {streamer.stats.bytes_read / 1e9:.1f} GB read from disk" if streamer is not None else ""
        print(
            f"{len(prompts)} prompts: {prompt_tokens} prompt tokens + {generated} generated in {seconds:.1f}s = "
            f"{(prompt_tokens + generated) / seconds:.2f} tokens/s in all, {generated / seconds:.2f} generated "
            f"tokens/s{streamed}"
        )
        return 0
    for prompt, r in zip(prompts, results, strict=True):
        if args.json:
            record = json_record(llm, r.prompt_tokens, r.tokens, r.text, r.finish_reason, r.timings.as_dict())
            print(json.dumps({"prompt": prompt, **record}, ensure_ascii=False))
        else:
            print(json.dumps(prompt + r.text, ensure_ascii=False))
    print(
        f"[{len(prompts)} prompts, {generated} tokens in {seconds:.1f}s: {generated / seconds:.1f} tok/s]",
        file=sys.stderr,
    )
    return 0


def run_command(args) -> int:
    check_generate_options(args)
    follower = os.environ.get("RANK", "0") != "0"  # a tensor-parallel rank other than 0: rank 0 reads the prompt
    # everything read before a load that may take minutes
    prompts = read_prompts(args.prompts_file) if args.prompts_file and not follower else None
    text = the_prompt(args) if not follower else None
    system = read_text(args.system_file, "the system prompt") if args.system_file else args.system
    if args.escape:
        system = unescape(system) if system is not None else None
        args.stop = [unescape(s) for s in args.stop]
    llm = load_model(args)
    if llm.ranks is not None:  # every rank continues rank 0's prompt (only it can read stdin)
        from ..parallel.ranks import share_object

        prompts, text, system = share_object(llm.ranks, (prompts, text, system))
    if prompts is not None:
        return run_batch(llm, prompts, args)
    assert text is not None
    prompt: str | list[int] = text
    if args.chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        prompt = llm.encode_chat(messages)
    if args.beams is not None:
        return run_beams(llm, prompt, args)
    draft = load_model(args, args.draft_model) if args.draft_model else None
    stream = llm.stream(
        prompt,
        max_new_tokens=args.max_new_tokens,
        stop=args.stop,
        logprobs=args.logprobs,
        draft=draft,
        speculate_k=args.speculate_k,
        **sampling_settings(args),
    )
    if args.json:
        for _ in stream:
            pass
    else:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    result = stream.result
    t = result.timings
    if args.json:
        record = json_record(llm, result.prompt_tokens, result.tokens, result.text, result.finish_reason, t.as_dict())
        if result.logprobs is not None:
            record["logprobs"] = [
                {
                    "token": lp.token,
                    "text": llm.tokenizer.piece(lp.token),
                    "logprob": lp.logprob,
                    "top": [{"token": i, "text": llm.tokenizer.piece(i), "logprob": v} for i, v in lp.top],
                }
                for lp in result.logprobs
            ]
        if result.draft_acceptance is not None:
            record["draft_acceptance"] = result.draft_acceptance
        print(json.dumps(record, ensure_ascii=False))
        return 0
    if result.finish_reason == "context":
        print(f"[stopped: the model's context of {llm.args.context_length} tokens is full]", file=sys.stderr)
    print(
        f"[prompt {t.prompt_tokens} tokens: {t.prefill_tokens_per_second:.1f} tok/s | "
        f"generated {len(result.tokens)} tokens: {t.decode_tokens_per_second:.1f} tok/s | "
        f"{llm.device}, {str(llm.dtype).removeprefix('torch.')}, {llm.compute}, loaded in {llm.load_seconds:.1f}s"
        + (f", draft accepted {result.draft_acceptance:.0%}" if result.draft_acceptance is not None else "")
        + "]",
        file=sys.stderr,
    )
    return 0
