"""The decode products alone: q4 and q8 [M x K] x [K x N] over the four matrix shapes of a Llama
3.2 1B layer (wqkv 3072x2048, wo 2048x2048, w13 16384x2048, w2 2048x8192), random weights.

    .venv/bin/python benchmarks/products.py [--layers 1] [--rows 1,2,4,8,16]
    .venv/bin/python benchmarks/products.py --prompt [--rows 512]
    .venv/bin/python benchmarks/products.py --amx [--rows 512]

--layers 1 keeps one layer (19 MB of q4) in the CPU's caches: what the arithmetic allows (GMAC/s);
--layers 8 (150 MB) reads from memory: GB/s of weights against the read bound printed first.
--prompt: the many-rows paths of prompts without AMX (weights unpacked a slice at a time for oneDNN's
bfloat16 or PyTorch's float32 product, or the direct int8 kernels), alternating, on the CPU at hand:
which of them prompts should use here (packed._bf16_products_fast and packed._int8_prompts decide);
then F16 and BF16 weights: kernels/float32_rows.c against PyTorch's float32 product in tiles of 64.
--amx: on a CPU with AMX, amx_matmul.c against the oneDNN bfloat16 path, per GGUF type (random blocks
of each), alternating.
Best of 5 passes. (Figures and what they decided: docs/performance.md.)
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np
import torch

from plainllama.cli.bench import read_buffer
from plainllama.engine.cpu import kernels
from plainllama.engine.memory import empty_for_weights, weights_on_huge_pages
from plainllama.engine.cpu import packed
from plainllama.engine.cpu.packed import PackedWeight, pack_gguf
from plainllama.formats.gguf_quants import BLOCK_FORMATS

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
    """The paths a prompt's products can take where there is no AMX, alternating, best of 5 rounds:
    bfloat16 (oneDNN, where it multiplies bfloat16 at all), float32 (weights unpacked, PyTorch's
    product) and int8 (the direct kernels, activations in int8). To see another CPU's choice on this
    one, cap PyTorch too: PLAINLLAMA_ISA=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2."""
    print(
        f"{torch.get_num_threads()} threads, {rows} rows, kernels {kernels.isa()}; chosen here: "
        f"bfloat16 {packed._bf16_products_fast()}, int8 {packed._int8_prompts()} "
        f"(oneDNN multiplies bfloat16 here: {packed._bf16_products_possible()})"
    )
    flops = 2 * rows * sum(n * k for n, k in SHAPES)
    paths = ["float32", "int8"] + (["bfloat16"] if packed._bf16_products_possible() else [])
    chosen = packed._bf16_products_fast, packed._int8_prompts, kernels.amx
    kernels.amx = lambda: False  # type: ignore[assignment]
    try:
        for type_name in ("Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"):
            weights = [gguf_weight(type_name, n, k) for n, k in SHAPES]
            xs = [torch.randn(rows, k) for _, k in SHAPES]
            best = dict.fromkeys(paths, float("inf"))
            for _ in range(5):
                for path in paths:
                    packed._bf16_products_fast = lambda path=path: path == "bfloat16"  # type: ignore[assignment]
                    packed._int8_prompts = lambda path=path: path == "int8"  # type: ignore[assignment]
                    start = time.perf_counter()
                    for w, x in zip(weights, xs, strict=True):
                        w._unpacked_matmul(x)
                    best[path] = min(best[path], time.perf_counter() - start)
            rates = {path: flops / seconds / 1e9 for path, seconds in best.items()}
            print(
                f"{type_name:5s} ({weights[0].layout}): "
                + ", ".join(f"{path} {rate:6.1f}" for path, rate in rates.items())
                + f" GFLOP/s; int8/float32 {rates['int8'] / rates['float32']:.2f}x"
            )
        for type_name in ("F16", "BF16"):
            half_products(type_name, rows, flops)
    finally:
        packed._bf16_products_fast, packed._int8_prompts, kernels.amx = chosen  # type: ignore[assignment]


def half_products(type_name: str, rows: int, flops: float) -> None:
    """16-bit weights where bfloat16 is not native: float32_rows.c against PyTorch's float32 product
    in tiles of 64 (and oneDNN's bfloat16 where it multiplies bfloat16 at all), alternating."""
    weights = [gguf_weight(type_name, n, k) for n, k in SHAPES]
    xs = [torch.randn(rows, k) for _, k in SHAPES]
    paths = {  # PyTorch's tiles: the path 16-bit weights took before float32_rows.c
        "float32_rows.c": lambda w, x: w._float32_matmul(x),
        "PyTorch tiles of 64": lambda w, x: w._float32_tiles(x),
    }
    if packed._bf16_products_possible():  # the weights in bfloat16 beforehand: the product alone
        as_bf16 = {id(w): w.dequantized(torch.bfloat16) for w in weights}
        paths["oneDNN bfloat16"] = lambda w, x: torch.nn.functional.linear(x.bfloat16(), as_bf16[id(w)])
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(5):
        for path, product in paths.items():
            start = time.perf_counter()
            for w, x in zip(weights, xs, strict=True):
                product(w, x)
            best[path] = min(best[path], time.perf_counter() - start)
    rates = {path: flops / seconds / 1e9 for path, seconds in best.items()}
    print(
        f"{type_name:5s} ({weights[0].layout}): "
        + ", ".join(f"{path} {rate:6.1f}" for path, rate in rates.items())
        + f" GFLOP/s; float32_rows.c / tiles {rates['float32_rows.c'] / rates['PyTorch tiles of 64']:.2f}x"
    )


def gguf_weight(type_name: str, n: int, k: int) -> PackedWeight:
    """A [n, k] matrix of random `type_name` blocks (tests/gguf_files.random_blocks), packed as loaded."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from gguf_files import random_blocks

    per_block = BLOCK_FORMATS[type_name][0] if type_name in BLOCK_FORMATS else 1
    if type_name == "F16":
        return PackedWeight("f16", (n, k), {"w": placed(torch.randn(n, k).half())})
    if type_name == "BF16":
        return PackedWeight("bf16", (n, k), {"w": placed(torch.randn(n, k).bfloat16())})
    raw = np.ascontiguousarray(random_blocks(type_name, n * k // per_block, np.random.default_rng(n + k)))
    return pack_gguf(placed(torch.from_numpy(raw.view(np.uint8).reshape(-1).copy())), type_name, (n, k))


def amx_products(rows: int) -> None:
    """amx_matmul.c against the oneDNN bfloat16 path, per GGUF type, alternating, best of 5 rounds."""
    if not kernels.amx():
        raise SystemExit("amx_matmul needs a CPU with AMX (and PLAINLLAMA_ISA not below amx)")
    print(f"{torch.get_num_threads()} threads, {rows} rows, the four 1B layer shapes")
    flops = 2 * rows * sum(n * k for n, k in SHAPES)
    for type_name in ("Q4_0", "Q4_1", "Q8_0", "F16", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "Q5_0"):
        weights = [gguf_weight(type_name, n, k) for n, k in SHAPES]
        xs = [torch.randn(rows, k) for _, k in SHAPES]
        best = {"amx": float("inf"), "oneDNN": float("inf")}
        for _ in range(5):
            for path in best:
                kernels.amx = lambda path=path: path == "amx"  # type: ignore[assignment]
                start = time.perf_counter()
                for w, x in zip(weights, xs, strict=True):
                    w._unpacked_matmul(x)
                best[path] = min(best[path], time.perf_counter() - start)
        kernels.amx = lambda: True  # type: ignore[assignment]
        rates = {path: flops / seconds / 1e12 for path, seconds in best.items()}
        print(
            f"{type_name:5s} ({weights[0].layout}): amx {rates['amx']:.2f} TFLOP/s, oneDNN bfloat16 "
            f"{rates['oneDNN']:.2f} TFLOP/s, amx/oneDNN {rates['amx'] / rates['oneDNN']:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--rows", default=None, help="rows per product (default 1,2,4,8,16; 512 with --prompt)")
    parser.add_argument("--prompt", action="store_true", help="the bfloat16, float32 and int8 paths for prompts")
    parser.add_argument("--amx", action="store_true", help="AMX against oneDNN products for prompts, per GGUF type")
    args = parser.parse_args()
    if args.amx:
        amx_products(int(args.rows or 512))
        return
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
