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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from gguf_files import default_vocabulary  # noqa: E402

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


def vocabulary(size: int) -> dict:
    vocab = default_vocabulary()
    tokens, types = list(vocab["tokens"]), list(vocab["types"])
    tokens += [f"<|unused_{i}|>" for i in range(size - len(tokens))]
    types += [5] * (size - len(types))  # UNUSED: never produced by the tokenizer
    vocab["tokens"], vocab["types"] = tokens, types
    return vocab


def encode(weights: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F16":
        return weights.astype(np.float16)
    bits = weights.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even bfloat16


def write(
    path: Path, dtype: str, dim, n_layers, n_heads, n_kv_heads, hidden_dim, vocab, context_length, rope_theta, **_
) -> None:
    from gguf import GGMLQuantizationType, GGUFWriter

    raw_type = GGMLQuantizationType.F16 if dtype == "F16" else GGMLQuantizationType.BF16
    numpy_type = np.float16 if dtype == "F16" else np.uint16
    rng = np.random.default_rng(0)
    v = vocabulary(vocab)
    head_dim = dim // n_heads
    w = GGUFWriter(str(path), "llama")
    for key, value in (
        ("block_count", n_layers),
        ("context_length", context_length),
        ("embedding_length", dim),
        ("feed_forward_length", hidden_dim),
        ("attention.head_count", n_heads),
        ("attention.head_count_kv", n_kv_heads),
        ("rope.dimension_count", head_dim),
        ("vocab_size", vocab),
    ):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", rope_theta)
    w.add_tokenizer_model(v["model"])
    w.add_tokenizer_pre(v["pre"])
    w.add_token_list(v["tokens"])
    w.add_token_types(v["types"])
    w.add_token_merges(v["merges"])
    w.add_bos_token_id(v["bos"])
    w.add_eos_token_id(v["eos"])

    def matrix(rows, cols):
        return encode((rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)), dtype)

    layer = {
        "attn_q": matrix(n_heads * head_dim, dim),
        "attn_k": matrix(n_kv_heads * head_dim, dim),
        "attn_v": matrix(n_kv_heads * head_dim, dim),
        "attn_output": matrix(dim, n_heads * head_dim),
        "ffn_gate": matrix(hidden_dim, dim),
        "ffn_up": matrix(hidden_dim, dim),
        "ffn_down": matrix(dim, hidden_dim),
    }
    norm = (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float32)
    embedding = matrix(vocab, dim)
    tensors = [("token_embd.weight", embedding), ("output_norm.weight", norm), ("output.weight", embedding)]
    for i in range(n_layers):
        tensors += [(f"blk.{i}.attn_norm.weight", norm), (f"blk.{i}.ffn_norm.weight", norm)]
        tensors += [(f"blk.{i}.{name}.weight", data) for name, data in layer.items()]
    for name, data in tensors:
        if data.dtype == np.float32:
            w.add_tensor_info(name, data.shape, data.dtype, data.nbytes)
        else:
            w.add_tensor_info(name, data.shape, numpy_type, data.nbytes, raw_dtype=raw_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, data in tensors:
        w.write_tensor_data(data)
    w.close()


def main() -> None:
    folder = Path.home() / ".cache" / "plainllama" / "bench-models"
    folder.mkdir(parents=True, exist_ok=True)
    for key in sys.argv[1:] or ["8b"]:
        shape = SHAPES[key]
        path = folder / shape["name"]
        if not path.exists():
            write(path.with_suffix(".tmp"), **shape)
            path.with_suffix(".tmp").rename(path)
        print(path)


if __name__ == "__main__":
    main()
