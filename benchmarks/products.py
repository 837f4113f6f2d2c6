"""The decode products alone: q4 and q8 [M x K] x [K x N] over the four matrix shapes of a Llama
3.2 1B layer (wqkv 3072x2048, wo 2048x2048, w13 16384x2048, w2 2048x8192), random weights.

    .venv/bin/python benchmarks/products.py [--layers 1] [--rows 1,2,4,8,16]
    .venv/bin/python benchmarks/products.py --prompt [--rows 512]

--layers 1 keeps one layer (19 MB of q4) in the CPU's caches: what the arithmetic allows (GMAC/s);
--layers 8 (150 MB) reads from memory: GB/s of weights against the read bound printed first.
--prompt: the many-rows path of prompts (weights unpacked a slice at a time, then oneDNN) with
bfloat16 products against float32 ones, alternating, on the CPU at hand: which of the two prompts
should use here (packed._bf16_products_fast decides).
Best of 5 passes. (Figures and what they decided: docs/performance.md.)
"""

from __future__ import annotations

import argparse
import ctypes
import time

import torch

from plainllama.cli.bench import read_buffer
from plainllama.engine.cpu import kernels
from plainllama.engine.memory import empty_for_weights, weights_on_huge_pages
from plainllama.engine.cpu import packed
from plainllama.engine.cpu.packed import PackedWeight

SHAPES = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)]


def placed(t: torch.Tensor) -> torch.Tensor:
    """`t` copied where a loaded model's weights lie (huge pages where the system gives them)."""
    with weights_on_huge_pages():
        return empty_for_weights(tuple(t.shape), t.dtype).copy_(t)


def weight(layout: str, n: int, k: int) -> PackedWeight:
    d = placed((torch.rand(n, k // 32) * 0.01).half())
    if layout == "q4":
        return PackedWeight("q4", (n, k), {"qs": placed(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)), "d": d})
    return PackedWeight("q8", (n, k), {"qs": placed(torch.randint(-127, 128, (n, k), dtype=torch.int8)), "d": d})


def prompt_products(rows: int) -> None:
    """bfloat16 against float32 products in the many-rows path, alternating, best of 5 rounds each."""
    print(
        f"{torch.get_num_threads()} threads; bfloat16 chosen here: {packed._bf16_products_fast()}; "
        f"oneDNN multiplies bfloat16 here: {packed._bf16_products_possible()}"
    )
    if not packed._bf16_products_possible():
        return
    flops = 2 * rows * sum(n * k for n, k in SHAPES)
    chosen = packed._bf16_products_fast
    try:
        for layout in ("q4", "q8"):
            weights = [weight(layout, n, k) for n, k in SHAPES]
            xs = [torch.randn(rows, k) for _, k in SHAPES]
            best = {"bfloat16": float("inf"), "float32": float("inf")}
            for _ in range(5):
                for dtype in best:
                    packed._bf16_products_fast = lambda dtype=dtype: dtype == "bfloat16"  # type: ignore[assignment]
                    start = time.perf_counter()
                    for w, x in zip(weights, xs, strict=True):
                        w._unpacked_matmul(x)
                    best[dtype] = min(best[dtype], time.perf_counter() - start)
            rates = {dtype: flops / seconds / 1e9 for dtype, seconds in best.items()}
            print(
                f"{layout} M={rows}: bfloat16 {rates['bfloat16']:6.1f} GFLOP/s, float32 {rates['float32']:6.1f} "
                f"GFLOP/s, float32/bfloat16 {rates['float32'] / rates['bfloat16']:.2f}x"
            )
    finally:
        packed._bf16_products_fast = chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--rows", default=None, help="rows per product (default 1,2,4,8,16; 512 with --prompt)")
    parser.add_argument("--prompt", action="store_true", help="bfloat16 against float32 products for prompts")
    args = parser.parse_args()
    if args.prompt:
        prompt_products(int(args.rows or 512))
        return
    args.rows = args.rows or "1,2,4,8,16"
    if not kernels.available():
        raise SystemExit("the C kernels do not run on this CPU")
    buffer = read_buffer(1 << 30).view(torch.uint8)
    read = kernels.function("read_bytes")
    read.restype = ctypes.c_double
    bound = 0.0
    for _ in range(3):
        start = time.perf_counter()
        read(buffer.data_ptr(), buffer.numel())
        bound = max(bound, buffer.numel() / (time.perf_counter() - start))
    del buffer
    print(f"read bound {bound / 1e9:.1f} GB/s, {torch.get_num_threads()} threads, {args.layers} layer(s)")
    shapes = SHAPES * args.layers
    macs = sum(n * k for n, k in shapes)
    for layout, bytes_per_weight in (("q4", 0.5625), ("q8", 1.0625)):
        weights = [weight(layout, n, k) for n, k in shapes]
        for rows in (int(r) for r in args.rows.split(",")):
            xs = [torch.randn(rows, k) for _, k in shapes]
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for w, x in zip(weights, xs, strict=True):
                    w.matmul_each_row(x)
                best = min(best, time.perf_counter() - start)
            print(
                f"{layout} M={rows:2d}: {best * 1e3 / args.layers:7.2f} ms/layer "
                f"{rows * macs / best / 1e9:7.1f} GMAC/s "
                f"{macs * bytes_per_weight / best / 1e9:6.1f} GB/s of weights"
            )


if __name__ == "__main__":
    main()
