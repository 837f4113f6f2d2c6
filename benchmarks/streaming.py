"""Streaming figures (issue 5): a model larger than its memory budget, layers read from disk per pass.

    .venv/bin/python benchmarks/streaming.py MODEL.gguf --max-memory 4G \
        [--decode-tokens 4] [--prompt-tokens 512] [--batch 32]

Measured in one run, in this order, so that the ratios compare like with like on a shared, noisy disk:
  1. disk read speed: the file's pages dropped from the page cache (posix_fadvise DONTNEED), then
     read sequentially in 64 MB reads (as the streamer reads), 4 GB of it;
  2. decode: tokens/s against the bound `disk speed / bytes streamed per token`;
  3. prefill of a `--prompt-tokens` prompt (one pass over the weights for all of them);
  4. throughput: `--batch` prompts in one batch, `--batch-new-tokens` each, total tokens/s;
  5. the disk speed again, and peak RSS (VmHWM) against the budget.
Make the models with benchmarks/make_big_models.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import plainllama  # noqa: E402

PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "In 1969, the first",
    "My favourite recipe is",
    "The theory of relativity",
    "Dear hiring manager,",
    "Here is a list of",
]


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_speed(path: str, nbytes: int = 4 << 30, chunk: int = 64 << 20) -> float:
    """GB/s reading `nbytes` from the middle of the file after dropping it from the page cache."""
    drop_cache(path)
    size = os.path.getsize(path)
    start_at = max(0, size // 2 - nbytes // 2)
    buffer = bytearray(chunk)
    fd = os.open(path, os.O_RDONLY)
    try:
        start, done = time.perf_counter(), 0
        while done < min(nbytes, size):
            got = os.preadv(fd, [buffer], start_at + done)
            if got <= 0:
                break
            done += got
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
    drop_cache(path)
    return done / seconds / 1e9


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--max-memory", required=True, help="SIZE, or auto: what the machine has (the planner decides)")
    p.add_argument("--decode-tokens", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batch-new-tokens", type=int, default=4)
    args = p.parse_args()

    speed_before = disk_speed(args.model)
    drop_cache(args.model)
    llm = plainllama.load(
        args.model,
        device="cpu",
        max_memory=None if args.max_memory == "auto" else args.max_memory,
        context=max(args.prompt_tokens + args.decode_tokens, args.batch * (16 + args.batch_new_tokens)),
        report=lambda text: print(text, file=sys.stderr),
    )
    plan = llm.plan
    if plan is None or not plan.streamed:
        sys.exit(f"streaming.py: nothing streams from disk under --max-memory {args.max_memory}: give a smaller budget")
    per_pass = plan.stream_bytes / 1e9

    # decode: a short prompt, then one token per pass
    out = llm.generate("The capital of France is", max_new_tokens=args.decode_tokens, temperature=0)
    t = out.timings
    decode_tps = t.decode_tokens_per_second
    bound_tps = speed_before / per_pass

    # prefill: one pass for the whole prompt
    ids = (llm.tokenizer.encode(" ".join(PROMPTS)) * args.prompt_tokens)[: args.prompt_tokens]
    pre = llm.generate(ids, max_new_tokens=1, temperature=0).timings

    # throughput: a batch of prompts, each pass serving all of them
    prompts = [PROMPTS[i % len(PROMPTS)] + f" (#{i})" for i in range(args.batch)]
    start = time.perf_counter()
    results = llm.generate_batch(prompts, max_new_tokens=args.batch_new_tokens)
    seconds = time.perf_counter() - start
    prompt_tokens = sum(len(r.prompt_tokens) for r in results)
    generated = sum(len(r.tokens) for r in results)

    peak = peak_rss()  # before the second disk probe, whose 64 MB read buffer is not the model's
    speed_after = disk_speed(args.model)
    figures = {
        "model": args.model,
        "budget_gib": round(plan.budget / 2**30, 2),
        "max_memory": args.max_memory,
        "layers_streamed": len(plan.streamed),
        "layers_resident": len(plan.resident),
        "gb_streamed_per_pass": round(per_pass, 2),
        "disk_gb_per_s_before": round(speed_before, 2),
        "disk_gb_per_s_after": round(speed_after, 2),
        "reader_gb_per_s": round(llm.streamer.stats.disk_speed / 1e9, 2),
        "decode_tokens_per_s": round(decode_tps, 4),
        "decode_seconds_per_token": round(1 / decode_tps, 2) if decode_tps else None,
        "bound_tokens_per_s": round(bound_tps, 4),
        "decode_fraction_of_bound": round(decode_tps / bound_tps, 3),
        "decode_fraction_of_bound_vs_mean_disk": round(decode_tps / ((speed_before + speed_after) / 2 / per_pass), 3),
        "prefill_tokens": pre.prompt_tokens,
        "prefill_seconds": round(pre.prefill_seconds, 1),
        "prefill_tokens_per_s": round(pre.prefill_tokens_per_second, 2),
        "batch": args.batch,
        "batch_prompt_tokens": prompt_tokens,
        "batch_generated": generated,
        "batch_seconds": round(seconds, 1),
        "batch_tokens_per_s_all": round((prompt_tokens + generated) / seconds, 2),
        "batch_generated_per_s": round(generated / seconds, 3),
        "peak_rss_gib": round(peak / 2**30, 2),
    }
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
