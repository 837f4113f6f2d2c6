"""Does torch.compile pay for decoding on this machine? Eager and compiled decode steps of the same
model, measured in turns in one process, and the time the first compiled step takes in a fresh
process with an empty compile cache and again with the cache filled (what `--compile` costs at
start-up, first run and later runs).

    .venv/bin/python benchmarks/compile_decode.py [-m MODEL] [--dtype float32] [--steps 64] [--rounds 3]

The default: the default model held as float32 (the PyTorch path; packed weights on the CPU decode
in C and are not affected by --compile).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def decode_seconds(llm, steps: int) -> float:
    from plainllama.model import KVCache

    ids = llm.encode_prompt("The capital of France is")
    cache = KVCache(llm.args, 1, len(ids) + steps + 1, llm.dtype, llm.device)
    with torch.inference_mode():
        llm.model(torch.tensor([ids]), 0, cache, last_only=True)
        token = torch.tensor([[42]])
        start = time.perf_counter()
        for i in range(steps):
            llm.model(token, len(ids) + i, cache, last_only=True)
    return (time.perf_counter() - start) / steps


def first_step(model: str | None, dtype: str) -> None:
    """Child process: load with compile=True and time the first decode step (the compile)."""
    import plainllama

    llm = plainllama.load(model, device="cpu", dtype=dtype, compile=True)
    start = time.perf_counter()
    decode_seconds(llm, 1)
    print(json.dumps({"first_step_seconds": time.perf_counter() - start}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--first-step", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.first_step:
        return first_step(args.model, args.dtype)

    cache_dir = tempfile.mkdtemp(prefix="plainllama-inductor-")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    command = [sys.executable, __file__, "--first-step", "--dtype", args.dtype] + (
        ["-m", args.model] if args.model else []
    )
    compile_times = []
    for _ in ("empty cache", "filled cache"):
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        compile_times.append(json.loads(out.strip().splitlines()[-1])["first_step_seconds"])

    import plainllama

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    eager = plainllama.load(args.model, device="cpu", dtype=args.dtype)
    compiled = plainllama.load(args.model, device="cpu", dtype=args.dtype, compile=True)
    decode_seconds(compiled, 2)  # compile (from the cache) before timing
    best = {"eager": float("inf"), "compiled": float("inf")}
    for _ in range(args.rounds):  # in turns: the machine's speed drifts
        for name, llm in (("eager", eager), ("compiled", compiled)):
            best[name] = min(best[name], decode_seconds(llm, args.steps))
    print(
        f"first compiled step, fresh process: {compile_times[0]:.1f} s with an empty cache, {compile_times[1]:.1f} s "
        "with it filled"
    )
    print(
        f"decode, {args.dtype}: eager {1 / best['eager']:.1f} tok/s, compiled {1 / best['compiled']:.1f} tok/s "
        f"({best['eager'] / best['compiled']:.2f}x)"
    )


if __name__ == "__main__":
    main()
