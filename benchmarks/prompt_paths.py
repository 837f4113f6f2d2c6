"""Whole prompts on each path a prompt's products can take on this CPU (without AMX): the int8 kernels
and the weights unpacked for oneDNN's bfloat16 (or PyTorch's float32 where bfloat16 is not native),
alternating in one process, per model file. What packed._int8_prompts decides, measured on a model
rather than on products alone (benchmarks/products.py --prompt).

    .venv/bin/python benchmarks/prompt_paths.py FILE.gguf [FILE.gguf ...] [--tokens 512] [--rounds 4]

Each round times one prefill of --tokens tokens per path (the last position's logits only, as
`plainllama bench` does); prints the best round's tok/s per path and their ratio. On a CPU with AMX
the kernels' AMX path is set aside, but oneDNN's bfloat16 still runs on AMX unless
ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 caps it: cap it to see a CPU without AMX.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import plainllama
from plainllama.engine.cpu import kernels, packed
from plainllama.generation.generate import device_and_dtype
from plainllama.model import KVCache


def prefill_seconds(llm, ids: torch.Tensor) -> float:
    cache = KVCache(llm.model.args, 1, ids.shape[1], device_and_dtype(llm.model)[1], llm.device)
    start = time.perf_counter()
    with torch.inference_mode():
        llm.model(ids, 0, cache, last_only=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("the int8 path is the C kernels', which do not run here")
    unpacked = "bfloat16" if packed._bf16_products_fast() else "float32"
    print(f"{torch.get_num_threads()} threads, kernels {kernels.isa()}; chosen here: {packed.prompt_products()}")
    chosen, amx = packed._int8_prompts, kernels.amx
    kernels.amx = lambda: False  # type: ignore[assignment]  # the paths of CPUs without AMX
    try:
        for path in args.files:
            llm = plainllama.load(path, device="cpu")
            ids = torch.arange(1000, 1000 + args.tokens)[None]
            best = {"int8": float("inf"), unpacked: float("inf")}
            for round_ in range(args.rounds + 1):  # round 0 warms up: not counted
                for name in best:
                    packed._int8_prompts = lambda name=name: name == "int8"  # type: ignore[assignment]
                    seconds = prefill_seconds(llm, ids)
                    if round_ > 0:
                        best[name] = min(best[name], seconds)
            rates = {name: args.tokens / seconds for name, seconds in best.items()}
            print(
                f"{Path(path).name}: "
                + ", ".join(f"{name} {rate:.1f}" for name, rate in rates.items())
                + f" tok/s; int8 / {unpacked} {rates['int8'] / rates[unpacked]:.2f}x"
            )
    finally:
        packed._int8_prompts, kernels.amx = chosen, amx  # type: ignore[assignment]


if __name__ == "__main__":
    main()
