"""Writing GGUF files for tests with the `gguf` package's own writer (llama.cpp's Python library).

Quantized tensors: the `gguf` package quantizes F16/BF16/Q4_0..Q8_0 itself; for the K formats
(which it can only dequantize) we write random blocks whose float16 scale fields hold small finite
values, which is all the dequantizers and the model need; Q2_K and Q3_K are fitted to the
weights (q2_k_blocks, q3_k_blocks: their random blocks are numerically unlike any real file's).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants

from plainllama.default_model import default_model_path

# byte offsets of the float16 scale fields inside each block, per format
SCALE_FIELDS = {
    "Q8_0": [0],
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}
QUANTIZABLE = {"F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}


def random_blocks(type_name: str, n_blocks: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """[n_blocks, bytes_per_block] uint8 of random content with finite float16 scales."""
    _, block_bytes = quants.GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for offset in SCALE_FIELDS[type_name]:
        values = (rng.standard_normal(n_blocks) * scale).astype(np.float16)
        raw[:, offset : offset + 2] = values.view(np.uint8).reshape(n_blocks, 2)
    return raw


def q2_k_blocks(weights: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] -> Q2_K blocks [rows * cols / 256, 84] that approximate them: per 16 weights
    a scale and a minimum (4 bits each, times the super-block's float16 d and dmin), 2-bit values.
    A plain fit (llama.cpp's quantizer searches harder), but blocks shaped as real files' are: random
    Q2_K bytes describe weights with a large offset per 16, whose products cancel far more than any
    trained matrix's."""
    sub = weights.astype(np.float32).reshape(-1, 16, 16)  # [n, sub-block, 16]
    low = np.minimum(sub.min(-1), 0)  # weight = scale * q - minimum, minimum = -low >= 0
    scale = (sub.max(-1) - low) / 3
    d = (scale.max(-1) / 15).astype(np.float16)  # [n]
    dmin = (-low.min(-1) / 15).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.rint(np.divide(scale, d32, out=np.zeros_like(scale), where=d32 > 0)), 0, 15).astype(np.uint8)
    mn = np.clip(np.rint(np.divide(-low, dmin32, out=np.zeros_like(low), where=dmin32 > 0)), 0, 15).astype(np.uint8)
    step, offset = (d32 * sc)[..., None], (dmin32 * mn)[..., None]
    q = np.clip(np.rint(np.divide(sub + offset, step, out=np.zeros_like(sub), where=step > 0)), 0, 3).astype(np.uint8)
    q = q.reshape(-1, 2, 4, 32)  # weight 128 h + 32 s + l: bits 2s..2s+1 of byte 32 h + l
    qs = (q[:, :, 0] | q[:, :, 1] << 2 | q[:, :, 2] << 4 | q[:, :, 3] << 6).reshape(-1, 64)
    halves = np.stack([d, dmin], axis=-1).view(np.uint8).reshape(-1, 4)
    return np.concatenate([sc | mn << 4, qs, halves], axis=-1)


def q3_k_blocks(weights: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] -> Q3_K blocks [rows * cols / 256, 110] that approximate them (as
    q2_k_blocks): per 16 weights a 6-bit signed scale (times the super-block's float16 d), 3-bit
    values q in -4..3; weight = d * scale * q."""
    sub = weights.astype(np.float32).reshape(-1, 16, 16)  # [n, sub-block, 16]
    step = np.abs(sub).max(-1) / 4  # q = -4 reaches the largest magnitude
    d = (step.max(-1) / 31).astype(np.float16)  # [n]
    d32 = d.astype(np.float32)[:, None]
    scale = np.clip(np.rint(np.divide(step, d32, out=np.zeros_like(step), where=d32 > 0)), 0, 31).astype(np.int16)
    size = (d32 * scale)[..., None]
    q = np.clip(np.rint(np.divide(sub, size, out=np.zeros_like(sub), where=size > 0)), -4, 3).astype(np.int16)
    stored = (q + 4).astype(np.uint8).reshape(-1, 2, 4, 32)  # weight 128 h + 32 j + l
    low2, third = stored & 3, stored >> 2
    qs = (low2[:, :, 0] | low2[:, :, 1] << 2 | low2[:, :, 2] << 4 | low2[:, :, 3] << 6).reshape(-1, 64)
    hmask = np.zeros((len(stored), 32), dtype=np.uint8)  # bit 4 h + j of byte l
    for h in range(2):
        for j in range(4):
            hmask |= third[:, h, j] << (4 * h + j)
    biased = (scale + 32).astype(np.uint8)  # [n, 16], 6 bits
    packed = np.zeros((len(stored), 12), dtype=np.uint8)
    for i in range(16):  # low 4 bits: nibble i // 8 of byte i % 8; high 2: byte 8 + i % 4, bits 2 (i // 4)
        packed[:, i % 8] |= (biased[:, i] & 15) << (4 * (i // 8))
        packed[:, 8 + i % 4] |= (biased[:, i] >> 4) << (2 * (i // 4))
    return np.concatenate([hmask, qs, packed, d.view(np.uint8).reshape(-1, 2)], axis=-1)


def encode_tensor(weights: np.ndarray, type_name: str, rng: np.random.Generator):
    """float32 weights -> (array to write, raw_dtype) in the given GGUF type."""
    if type_name == "F32":
        return weights.astype(np.float32), None
    qtype = GGMLQuantizationType[type_name]
    if type_name in QUANTIZABLE:
        return quants.quantize(weights.astype(np.float32), qtype), qtype
    if type_name == "Q2_K":
        return q2_k_blocks(weights).reshape(weights.shape[0], -1), qtype
    if type_name == "Q3_K":
        return q3_k_blocks(weights).reshape(weights.shape[0], -1), qtype
    per_block, _ = quants.GGML_QUANT_SIZES[qtype]
    rows, cols = weights.shape
    # K formats: random blocks scaled like the float weights would be.
    blocks = random_blocks(type_name, rows * cols // per_block, rng, scale=float(np.abs(weights).mean()) / 8)
    return blocks.reshape(rows, -1), qtype


def default_vocabulary() -> dict:
    """The default model's tokenizer metadata, so test files get a real vocabulary."""
    reader = GGUFReader(default_model_path())

    def get(key):
        return reader.fields[key].contents()

    return {
        "model": get("tokenizer.ggml.model"),
        "pre": get("tokenizer.ggml.pre"),
        "tokens": get("tokenizer.ggml.tokens"),
        "types": get("tokenizer.ggml.token_type"),
        "merges": get("tokenizer.ggml.merges"),
        "bos": get("tokenizer.ggml.bos_token_id"),
        "eos": get("tokenizer.ggml.eos_token_id"),
    }


def add_vocabulary(w: GGUFWriter, vocab: dict) -> None:
    """The tokenizer metadata of `vocab` (as from default_vocabulary())."""
    w.add_tokenizer_model(vocab["model"])
    if vocab.get("pre"):
        w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if vocab.get("merges"):
        w.add_token_merges(vocab["merges"])
    if vocab.get("scores") is not None:
        w.add_token_scores(vocab["scores"])
    if vocab.get("bos") is not None:
        w.add_bos_token_id(vocab["bos"])
    if vocab.get("eos") is not None:
        w.add_eos_token_id(vocab["eos"])
    if vocab.get("unk") is not None:
        w.add_unk_token_id(vocab["unk"])
    if vocab.get("add_bos") is not None:
        w.add_add_bos_token(vocab["add_bos"])


def write_llama_gguf(
    path,
    vocab: dict,
    *,
    dim=256,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    hidden_dim=512,
    context_length=512,
    matrix_type="F32",
    embedding_type="F32",
    output_type=None,
    tied=False,
    seed=0,
    rope_freqs=None,
    extra_metadata=None,
    architecture="llama",
    skip_tensors=(),
    override_shapes=None,
    tensor_types=None,
):
    """A random-weight Llama model in GGUF. `vocab`: dict as from default_vocabulary() or a
    SentencePiece vocabulary (model "llama" with scores). `tensor_types`: {"attn_v.weight": "Q8_0", ...}
    gives the layer tensors ending so another type, as llama.cpp's mixed "_M" files do; `output_type`
    the output projection's (default: the embedding's)."""
    rng = np.random.default_rng(seed)
    V = len(vocab["tokens"])
    head_dim = dim // n_heads
    w = GGUFWriter(str(path), architecture)
    w.add_block_count(n_layers)
    w.add_context_length(context_length)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden_dim)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(V)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, value)
    add_vocabulary(w, vocab)

    shapes = {
        "token_embd.weight": ((V, dim), embedding_type),
        "output_norm.weight": ((dim,), "F32"),
    }
    if not tied:
        shapes["output.weight"] = ((V, dim), output_type or embedding_type)
    for i in range(n_layers):
        shapes[f"blk.{i}.attn_norm.weight"] = ((dim,), "F32")
        shapes[f"blk.{i}.ffn_norm.weight"] = ((dim,), "F32")
        shapes[f"blk.{i}.attn_q.weight"] = ((n_heads * head_dim, dim), matrix_type)
        shapes[f"blk.{i}.attn_k.weight"] = ((n_kv_heads * head_dim, dim), matrix_type)
        shapes[f"blk.{i}.attn_v.weight"] = ((n_kv_heads * head_dim, dim), matrix_type)
        shapes[f"blk.{i}.attn_output.weight"] = ((dim, n_heads * head_dim), matrix_type)
        shapes[f"blk.{i}.ffn_gate.weight"] = ((hidden_dim, dim), matrix_type)
        shapes[f"blk.{i}.ffn_up.weight"] = ((hidden_dim, dim), matrix_type)
        shapes[f"blk.{i}.ffn_down.weight"] = ((dim, hidden_dim), matrix_type)
    for name, shape in (override_shapes or {}).items():
        shapes[name] = (shape, shapes[name][1])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    for name, (shape, type_name) in shapes.items():
        type_name = next((t for suffix, t in (tensor_types or {}).items() if name.endswith("." + suffix)), type_name)
        if name in skip_tensors:
            continue
        if len(shape) == 1:
            weights = 1.0 + 0.1 * rng.standard_normal(shape).astype(np.float32)  # norm gains near 1
            w.add_tensor(name, weights)
            continue
        weights = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        data, raw_dtype = encode_tensor(weights, type_name, rng)
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def truncated_copy(src, dst, n_layers: int):
    """The same model with only its first n_layers blocks (same vocabulary, same tensor types):
    a cheap draft model for speculative decoding."""
    reader = GGUFReader(str(src))
    w = GGUFWriter(str(dst), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = n_layers if field.name == "llama.block_count" else field.contents()
        w.add_key_value(field.name, value, field.types[0], field.types[-1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= n_layers:
            continue
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def padded_vocabulary(size: int) -> dict:
    vocab = default_vocabulary()
    tokens, types = list(vocab["tokens"]), list(vocab["types"])
    tokens += [f"<|unused_{i}|>" for i in range(size - len(tokens))]
    types += [5] * (size - len(types))  # UNUSED: never produced by the tokenizer
    vocab["tokens"], vocab["types"] = tokens, types
    return vocab


def encode_16_bit(weights: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F16":
        return weights.astype(np.float16)
    bits = weights.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even bfloat16


def write_big_gguf(
    path, dtype: str, dim, n_layers, n_heads, n_kv_heads, hidden_dim, vocab, context_length, rope_theta, tied=False, **_
) -> None:
    """A random-weight model at a real large model's shape, written one tensor at a time (a whole
    model would not fit in memory). Every layer holds the same random matrices (drawing billions of
    fresh random numbers takes longer than what the file is for): the bytes on disk are as many as
    the real model's. `vocab` tokens: the default model's, padded with unused ones."""
    raw_type = GGMLQuantizationType.F16 if dtype == "F16" else GGMLQuantizationType.BF16
    numpy_type = np.float16 if dtype == "F16" else np.uint16
    rng = np.random.default_rng(0)
    v = padded_vocabulary(vocab)
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
        return encode_16_bit((rng.standard_normal((rows, cols), dtype=np.float32) / np.sqrt(cols)), dtype)

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
    tensors = [("token_embd.weight", embedding), ("output_norm.weight", norm)]
    if not tied:
        tensors.append(("output.weight", embedding))
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
