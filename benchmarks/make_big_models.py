"""The streaming bench models of issue 5: random-weight GGUF files at real large-model shapes, bigger
than the memory they will be given (or than the machine's RAM).

    llama-8b-shape-BF16.gguf   Llama 3.1 8B: width 4096, 32 layers, 32/8 heads, feed-forward 14336,
                               128256-token vocabulary (SmolLM2's 49152 tokens padded with unused ones); 16 GB
    llama-13b-shape-F16.gguf   Llama 2 13B: width 5120, 40 layers, 40/40 heads, feed-forward 13824,
                               SmolLM2's 49152-token vocabulary (Llama 2 has 32000); 27 GB: more than
                               this machine's 24 GiB RAM

    .venv/bin/python benchmarks/make_big_models.py [8b|13b ...]   # into ~/.cache/plainllama/bench-models

The tensors are written one at a time with gguf's writer (a whole model would not fit in memory).
Every layer holds the same random matrices (drawing 8-13 billion fresh random numbers would take
longer than the benchmark): the bytes on disk are as many as the real model's, and streaming reads
every one of them on every pass, which is what these files measure. Files that exist are kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from gguf_files import write_big_gguf  # noqa: E402

SHAPES = {
    "8b": dict(
        name="llama-8b-shape-BF16.gguf",
        dtype="BF16",
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        hidden_dim=14336,
        vocab=128256,
        context_length=8192,
        rope_theta=500000.0,
    ),
    "13b": dict(
        name="llama-13b-shape-F16.gguf",
        dtype="F16",
        dim=5120,
        n_layers=40,
        n_heads=40,
        n_kv_heads=40,
        hidden_dim=13824,
        vocab=49152,
        context_length=4096,
        rope_theta=10000.0,
    ),
}


def main() -> None:
    folder = Path.home() / ".cache" / "plainllama" / "bench-models"
    folder.mkdir(parents=True, exist_ok=True)
    for key in sys.argv[1:] or ["8b"]:
        shape = SHAPES[key]
        path = folder / shape["name"]
        if not path.exists():
            write_big_gguf(path.with_suffix(".tmp"), **shape)
            path.with_suffix(".tmp").rename(path)
        print(path)


if __name__ == "__main__":
    main()
