"""The decode products alone: q4 and q8 [M x K] x [K x N] over the four matrix shapes of a Llama
3.2 1B layer (wqkv 3072x2048, wo 2048x2048, w13 16384x2048, w2 2048x8192), random weights.

    .venv/bin/python benchmarks/products.py [--layers 1] [--rows 1,2,4,8,16]

--layers 1 keeps one layer (19 MB of q4) in the CPU's caches: what the arithmetic allows (GMAC/s);
--layers 8 (150 MB) reads from memory: GB/s of weights against the read bound printed first.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--rows", default="1,2,4,8,16")
    args = parser.parse_args()
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
