"""`plainllama generate`: continue a prompt (or a file of prompts as one batch, or beam search)."""

from __future__ import annotations

import json
import sys
import time

import torch

from ..errors import PlainLlamaError
from ..generation.stops import StopMatcher
from .options import load_model, sampling_settings


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


def check_generate_options(args) -> None:
    if (args.prompt is None) == (args.prompts_file is None):
        raise PlainLlamaError("give a PROMPT or --prompts-file, not both or neither")
    if args.beams is not None and (args.draft_model or args.prompts_file or args.temperature):
        raise PlainLlamaError(
            "--beams is deterministic and runs one prompt: not with --draft-model, --prompts-file or --temperature"
        )
    if args.prompts_file and args.draft_model:
        raise PlainLlamaError("--draft-model runs one prompt at a time: not with --prompts-file")
    if args.throughput and not args.prompts_file:
        raise PlainLlamaError("--throughput measures a batch: give --prompts-file")


def run_beams(llm, prompt, args) -> int:
    early = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    beams = llm.beam_search(
        prompt,
        args.beams,
        args.max_new_tokens,
        args.length_penalty,
        early,
        args.no_repeat_ngram_size,
        args.num_return,
        stop=args.stop,
    )
    stops = StopMatcher(args.stop)
    texts = [stops.cut(llm.tokenizer.decode([t for t in b.tokens if t not in llm.tokenizer.end_ids])) for b in beams]
    if args.json:
        print(
            json.dumps(
                {
                    "beams": [
                        {"tokens": b.tokens, "text": t, "score": b.score} for b, t in zip(beams, texts, strict=True)
                    ]
                },
                ensure_ascii=False,
            )
        )
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
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "prompt_tokens": r.prompt_tokens,
                        "tokens": r.tokens,
                        "text": r.text,
                        "finish_reason": r.finish_reason,
                    },
                    ensure_ascii=False,
                )
            )
        else:
            print(json.dumps(prompt + r.text, ensure_ascii=False))
    print(
        f"[{len(prompts)} prompts, {generated} tokens in {seconds:.1f}s: {generated / seconds:.1f} tok/s]",
        file=sys.stderr,
    )
    return 0


def run_command(args) -> int:
    check_generate_options(args)
    prompts = read_prompts(args.prompts_file) if args.prompts_file else None  # before a load that may take minutes
    llm = load_model(args)
    if prompts is not None:
        return run_batch(llm, prompts, args)
    prompt = args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
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
        record = {
            "model": llm.checkpoint.path,
            "device": str(llm.device),
            "dtype": str(llm.dtype).removeprefix("torch."),
            "compute": llm.compute,
            "threads": torch.get_num_threads(),
            "prompt_tokens": result.prompt_tokens,
            "tokens": result.tokens,
            "text": result.text,
            "finish_reason": result.finish_reason,
            "load_seconds": round(llm.load_seconds, 3),
            **t.as_dict(),
        }
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
