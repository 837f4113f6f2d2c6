"""GGUF files (llama.cpp's format): one file holding the config, the tokenizer and the weights.

The file is a header of typed key/value metadata, a table of tensors (name, type, shape, offset),
then the tensor data. gguf_reader.py parses the header and maps the data into memory; this
module checks everything against what a Llama model needs before anything is built, renames the
tensors to Meta's naming and hands over functions that dequantize each tensor on demand.

Two quirks of the format:
- GGUF writes shapes innermost dimension first (ggml's ne[0] is the row length), so a [out, in]
  matrix is listed as [in, out].
- llama.cpp stores the q and k projections with their rows in Meta's interleaved rotary order (its
  converter undoes Hugging Face's permutation), which is the order model.py's rotary expects, so
  they are used as stored. Llama 3.1 frequency scaling arrives ready-made as the tensor
  `rope_freqs.weight` (one divisor per frequency).
"""

from __future__ import annotations

import logging
import re
import warnings

import numpy as np
import torch

from ..errors import PlainLlamaError
from ..model import ModelArgs
from .gguf_quants import SUPPORTED_TYPES, block_size, byte_size, dequantize
from ..tokenizer import BytePairEncoding, SentencePieceBPE, Tokenizer
from ..tokenizer.pretokenize import pre_tokenizer_for
from .fields import MISSING, integer, number
from .checkpoint import Checkpoint, CheckpointTensor, StoredTensor, expected_shapes
from .gguf_reader import GGUFFile, TensorInfo, read_gguf

log = logging.getLogger("plainllama")

MAGIC = b"GGUF"

# GGUF tensor name -> ours. Per-layer names are "blk.N.<name>".
GLOBAL_TENSORS = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
LAYER_TENSORS = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
}
LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# Metadata keys under "llama." that this loader reads or knows to be harmless.
KNOWN_LLAMA_KEYS = {
    "context_length",
    "embedding_length",
    "block_count",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "rope.freq_base",
    "rope.dimension_count",
    "vocab_size",
    "attention.key_length",
    "attention.value_length",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scaling.original_context_length",
    "expert_count",
    "expert_used_count",
    "rope.scaling.finetuned",  # informational only
}


def looks_like(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def describe_non_gguf(head: bytes) -> str:
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype", b"<html", b"<head", b"<?xml")):
        return "it is a web page (HTML), not a GGUF file: the download saved the page instead of the file"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the file itself: fetch it with `git lfs pull`"
    if not head:
        return "the file is empty"
    return f"it does not start with the GGUF magic bytes (found {head[:4]!r})"


def load_gguf(path: str) -> Checkpoint:
    with open(path, "rb") as f:
        head = f.read(64)
    if not head.startswith(MAGIC):
        raise PlainLlamaError(f"{path}: {describe_non_gguf(head)}")
    gf = read_gguf(path)
    meta = gf.metadata
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise PlainLlamaError(f"{path}: architecture {arch!r} is not supported (plainllama runs 'llama')")

    notes = []
    unknown = sorted(k for k in meta if k.startswith("llama.") and k[len("llama.") :] not in KNOWN_LLAMA_KEYS)
    for key in unknown:
        notes.append(f"metadata key {key!r} is not known to plainllama and was ignored")

    tokenizer = _tokenizer(path, meta)
    args = _model_args(gf, tokenizer)

    tensors = {}
    for gguf_name, info in gf.tensors.items():
        ours = _our_name(gguf_name)
        if ours is None:
            if gguf_name == "rope_freqs.weight":
                continue  # read into args.rope_freq_factors
            if re.fullmatch(r"blk\.\d+\.attn_rot_embd", gguf_name):
                continue  # precomputed rotary tables some old converters wrote; recomputed here
            raise PlainLlamaError(f"{path}: unexpected tensor {gguf_name!r} (not part of a Llama model)")
        # types outside SUPPORTED_TYPES are refused by _check_tensors below, by name
        stored = (
            StoredTensor(path, info.offset, byte_size(info.type_name, info.count), _decoder(info))
            if info.type_name in SUPPORTED_TYPES
            else None
        )
        tensors[ours] = CheckpointTensor(info.type_name, _tensor_source(gf, info), _raw_source(gf, info), stored)
    if "output.weight" not in tensors and "tok_embeddings.weight" in tensors:
        # Tied embeddings: the output projection is the embedding matrix itself. Both names get the
        # same record, and loading.py turns that into one shared tensor.
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
        args.tie_embeddings = True
    _check_tensors(gf, args)

    for note in notes:
        log.warning("%s: %s", path, note)
    return Checkpoint(
        format="gguf",
        path=path,
        args=args,
        tensors=tensors,
        tokenizer=tokenizer,
        chat_template=meta.get("tokenizer.chat_template"),
        name=meta.get("general.name"),
        notes=notes,
    )


def _our_name(gguf_name: str) -> str | None:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    m = LAYER_NAME.fullmatch(gguf_name)
    if m and m.group(2) in LAYER_TENSORS:
        return f"layers.{m.group(1)}.{LAYER_TENSORS[m.group(2)]}.weight"
    return None


class _Metadata:
    """The llama.* metadata of a GGUF file, each field read with its type and range checked."""

    def __init__(self, gf: GGUFFile):
        self.path, self.meta = gf.path, gf.metadata

    def need(self, key):
        value = self.meta.get(f"llama.{key}")
        if value is None:
            raise PlainLlamaError(f"{self.path}: metadata key 'llama.{key}' is missing")
        return value

    def given(self, key) -> bool:
        return self.meta.get(f"llama.{key}") is not None

    def count(self, key, default=MISSING):
        """A positive integer; `default` where the key may be absent."""
        if default is not MISSING and not self.given(key):
            return default
        return integer(self.path, f"metadata llama.{key}", self.need(key))

    def positive(self, key, default=MISSING):
        """A finite number above zero; `default` where the key may be absent."""
        if default is not MISSING and not self.given(key):
            return default
        return number(self.path, f"metadata llama.{key}", self.need(key))


def _rope_factors(gf: GGUFFile, m: _Metadata, head_dim: int) -> tuple[float, ...] | None:
    """Per-frequency divisors: linear scaling from the metadata, or Llama 3.1's as rope_freqs.weight."""
    factors = None
    scaling = gf.metadata.get("llama.rope.scaling.type")
    if scaling == "linear":
        factors = (m.positive("rope.scaling.factor"),) * (head_dim // 2)
    elif scaling not in (None, "none"):
        raise PlainLlamaError(
            f"{gf.path}: rope scaling type {scaling!r} is not supported (plainllama supports linear and Llama 3.1's)"
        )
    if "rope_freqs.weight" in gf.tensors:
        info = gf.tensors["rope_freqs.weight"]
        if info.type_name != "F32" or info.count != head_dim // 2:
            raise PlainLlamaError(f"{gf.path}: rope_freqs.weight should be {head_dim // 2} float32 values")
        factors = tuple(float(x) for x in _raw_bytes(gf, info).view(np.float32))
    return factors


def _model_args(gf: GGUFFile, tokenizer) -> ModelArgs:
    path, m = gf.path, _Metadata(gf)
    dim, n_heads = m.count("embedding_length"), m.count("attention.head_count")
    if dim % n_heads and not m.given("attention.key_length"):
        raise PlainLlamaError(f"{path}: embedding_length {dim} is not a multiple of attention.head_count {n_heads}")
    head_dim = m.count("attention.key_length", dim // n_heads)
    value_dim = m.count("attention.value_length", head_dim)
    if value_dim != head_dim:
        raise PlainLlamaError(f"{path}: key width {head_dim} differs from value width {value_dim}; not a Llama layout")
    rope_dim = m.count("rope.dimension_count", None)
    if rope_dim is not None and rope_dim != head_dim:
        derived = "" if m.given("attention.key_length") else f" (embedding_length {dim} / head_count {n_heads})"
        raise PlainLlamaError(
            f"{path}: the head width {head_dim}{derived} disagrees with rope.dimension_count {rope_dim}: one of them "
            "is "
            "wrong, or the model rotates part of each head (partial rotary embeddings), which plainllama does not run"
        )
    if m.count("expert_count", 0) > 0:
        raise PlainLlamaError(f"{path}: mixture-of-experts models (llama.expert_count) are not supported")
    embedding = gf.tensors.get("token_embd.weight")
    vocab_size = m.count("vocab_size", embedding.shape[0] if embedding is not None else tokenizer.vocab_size)
    # Claims are compared with what the file holds before anything is sized by them: every layer has
    # 9 tensors, so a block_count beyond the tensor table is corruption, not a model to plan for.
    n_layers = m.count("block_count")
    if n_layers * 9 > len(gf.tensors):
        raise PlainLlamaError(
            f"{path}: metadata llama.block_count claims {n_layers} layers, but the file holds only "
            f"{len(gf.tensors)} tensors ({n_layers * 9} needed); the metadata is corrupt"
        )
    if tokenizer.vocab_size > vocab_size:
        raise PlainLlamaError(
            f"{path}: the vocabulary has {tokenizer.vocab_size} tokens, but the model's embedding has {vocab_size} rows"
        )
    try:
        return ModelArgs(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=m.count("attention.head_count_kv", n_heads),
            vocab_size=vocab_size,
            hidden_dim=m.count("feed_forward_length"),
            norm_eps=m.positive("attention.layer_norm_rms_epsilon"),
            rope_theta=m.positive("rope.freq_base", 10000.0),
            rope_freq_factors=_rope_factors(gf, m, head_dim),
            context_length=m.count("context_length"),
            head_dim=head_dim,
        )
    except ValueError as e:
        raise PlainLlamaError(f"{path}: inconsistent model metadata: {e}") from None


def _check_tensors(gf: GGUFFile, args: ModelArgs):
    """Every tensor present, of a supported type, with the shape the metadata implies and all its bytes."""
    path = gf.path
    expected = expected_shapes(args)
    present = {ours: info for name, info in gf.tensors.items() if (ours := _our_name(name))}
    if args.tie_embeddings and "tok_embeddings.weight" in present:
        present["output.weight"] = present["tok_embeddings.weight"]
    missing = [name for name in expected if name not in present]
    if missing:
        raise PlainLlamaError(f"{path}: missing tensor(s) {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    extra = sorted(set(present) - set(expected))
    if extra:
        raise PlainLlamaError(f"{path}: tensor {extra[0]!r} does not belong to a {args.n_layers}-layer model")
    for ours, info in present.items():
        if info.type_name not in SUPPORTED_TYPES:
            raise PlainLlamaError(
                f"{path}: tensor {info.name} has type {info.type_name}, which plainllama cannot read (supported: "
                f"{', '.join(SUPPORTED_TYPES)})"
            )
        if info.shape and info.shape[-1] % block_size(info.type_name):
            raise PlainLlamaError(
                f"{path}: tensor {info.name} has rows of {info.shape[-1]} values, which are not whole "
                f"{info.type_name} blocks of {block_size(info.type_name)} (ggml refuses such files too)"
            )
        if info.shape != expected[ours]:
            raise PlainLlamaError(
                f"{path}: tensor {info.name} has shape {list(info.shape)}, but the metadata implies "
                f"{list(expected[ours])}"
            )
        want = byte_size(info.type_name, info.count)
        if info.offset + want > len(gf.data):
            raise PlainLlamaError(
                f"{path}: tensor {info.name} runs past the end of the file ({info.offset + want} > {len(gf.data)} "
                "bytes); the file is truncated"
            )


def _raw_bytes(gf: GGUFFile, info: TensorInfo) -> np.ndarray:
    return gf.data[info.offset : info.offset + byte_size(info.type_name, info.count)]


def _decoder(info: TensorInfo):
    def decode(raw: torch.Tensor) -> torch.Tensor:
        return dequantize(raw, info.type_name, info.shape)

    return decode


def _tensor_source(gf: GGUFFile, info: TensorInfo):
    decode = _decoder(info)

    def load() -> torch.Tensor:
        with warnings.catch_warnings():
            # The file is mapped read-only and torch warns that such memory cannot be written;
            # nothing here writes to it, and not copying it keeps memory at the model's size.
            warnings.simplefilter("ignore", UserWarning)
            return decode(torch.from_numpy(_raw_bytes(gf, info)))

    return load


def _raw_source(gf: GGUFFile, info: TensorInfo):
    def load() -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only mapping; see _tensor_source
            return torch.from_numpy(_raw_bytes(gf, info))

    return load


def _list_of(path, meta, key: str, kind: type, what: str) -> list | None:
    """A metadata array whose items are all of `kind` (an int is a float too), or None if absent."""
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(v, kind) or (kind is float and isinstance(v, int)) for v in value
    ):
        raise PlainLlamaError(f"{path}: metadata {key} must be a list of {what}")
    return value


def _tokenizer(path, meta) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    tokens = _list_of(path, meta, "tokenizer.ggml.tokens", str, "strings")
    if not tokens:
        raise PlainLlamaError(f"{path}: no tokenizer vocabulary (tokenizer.ggml.tokens) in the file")
    types = _list_of(path, meta, "tokenizer.ggml.token_type", int, "integers") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise PlainLlamaError(f"{path}: tokenizer has {len(tokens)} tokens but {len(types)} token types")
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    for name, value in (("bos", bos), ("eos", eos)):
        if value is not None:
            integer(path, f"metadata tokenizer.ggml.{name}_token_id", value, minimum=0, maximum=len(tokens) - 1)
    try:
        if kind == "gpt2":
            merges = _list_of(path, meta, "tokenizer.ggml.merges", str, "strings")
            if not merges:
                raise PlainLlamaError(f"{path}: byte-level BPE vocabulary without merges (tokenizer.ggml.merges)")
            patterns, whole_piece_first = pre_tokenizer_for(meta.get("tokenizer.ggml.pre"))
            model = BytePairEncoding(tokens, merges, patterns, whole_piece_first)
            add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        elif kind == "llama":
            scores = _list_of(path, meta, "tokenizer.ggml.scores", float, "numbers")
            if not scores or len(scores) != len(tokens):
                raise PlainLlamaError(
                    f"{path}: SentencePiece vocabulary needs one score per token (tokenizer.ggml.scores)"
                )
            add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            model = SentencePieceBPE(tokens, scores, types, meta.get("tokenizer.ggml.unknown_token_id"), add_prefix)  # type: ignore[assignment]
            # llama.cpp adds BOS for SentencePiece vocabularies unless the file says not to.
            add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
        else:
            raise PlainLlamaError(
                f"{path}: tokenizer model {kind!r} is not supported (plainllama reads 'gpt2' and 'llama')"
            )
    except ValueError as e:
        raise PlainLlamaError(f"{path}: broken tokenizer: {e}") from None
    return Tokenizer(model, tokens, types, bos, eos, add_bos)
