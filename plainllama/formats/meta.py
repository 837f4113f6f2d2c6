"""Meta's checkpoint folders: params.json, consolidated.00.pth ... consolidated.NN.pth, tokenizer.model.

Meta trains and ships the larger models split for model parallelism: shard k of N holds slice k of
every big matrix. Column-parallel layers (wq wk wv w1 w3 output) are cut along their output rows
(dim 0), row-parallel layers (wo w2) along their input columns (dim 1); norms are replicated. The
token embedding differs by generation: Llama 1/2 cut it along the embedding width (dim 1), Llama 3
along the vocabulary (dim 0); the shard shapes against params.json say which. We glue the slices
back together, so any shard count runs on one device.

params.json gives the shape, but not the feed-forward width: that is derived from dim, multiple_of
and ffn_dim_multiplier exactly as Meta's reference does, and then checked against the tensors.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import struct
import zipfile
from functools import partial

import torch

from ..errors import PlainLlamaError
from ..model import ModelArgs, llama3_rope_factors
from .fields import integer, number
from .checkpoint import Checkpoint, CheckpointTensor, StoredTensor, expected_shapes, type_name
from .hf_tokenizer import load_tokenizer_json, read_json
from .tokenizer_files import load_tokenizer_model

log = logging.getLogger("plainllama")

SHARD = re.compile(r"consolidated\.(\d+)\.pth")
COLUMN_PARALLEL = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")
ROW_PARALLEL = ("attention.wo", "feed_forward.w2")
REPLICATED = ("attention_norm", "ffn_norm")

# params.json keys: read, harmless, or a kind of model plainllama does not run.
READ_KEYS = {
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "multiple_of",
    "ffn_dim_multiplier",
    "norm_eps",
    "rope_theta",
    "use_scaled_rope",
    "max_seq_len",
}
HARMLESS_KEYS = {"max_batch_size"}  # a setting of Meta's own runtime, not of the model
UNSUPPORTED_KEYS = {
    "vision_chunk_size": "vision (image) models",
    "vision_max_num_chunks": "vision (image) models",
    "vision_num_cross_attention_layers": "vision (image) models",
    "moe_args": "mixture-of-experts models",
    "quantization_args": "Meta's pre-quantized checkpoints",
    "lora_args": "LoRA adapter checkpoints",
}


def _vocab_size(where, name, value):
    return value if value == -1 else integer(where, name, value)  # -1: "as many as the tokenizer has"


def _flag(where, name, value):
    if not isinstance(value, bool):
        raise PlainLlamaError(f"{where}: {name} must be true or false, got {value!r}")
    return value


# The type and range of every params.json key that is read (absent or null: its default).
PARAM_CHECKS = {
    "dim": integer,
    "n_layers": integer,
    "n_heads": integer,
    "n_kv_heads": integer,
    "vocab_size": _vocab_size,
    "multiple_of": integer,
    "ffn_dim_multiplier": number,
    "norm_eps": number,
    "rope_theta": number,
    "use_scaled_rope": _flag,
    "max_seq_len": integer,
}


def looks_like(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "params.json")) and any(SHARD.fullmatch(f) for f in os.listdir(folder))


def feed_forward_width(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's rule: 2/3 of 4*dim (SwiGLU has three matrices where a plain MLP has two, so this keeps
    the parameter count), scaled by ffn_dim_multiplier, rounded up to a multiple of multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def read_params(path: str) -> tuple[dict, list[str]]:
    try:
        with open(path, encoding="utf-8") as f:
            params = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlainLlamaError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(params, dict):
        raise PlainLlamaError(f"{path}: expected a JSON object")
    for key, what in UNSUPPORTED_KEYS.items():
        if params.get(key) not in (None, -1, {}, 0):
            raise PlainLlamaError(f"{path}: '{key}' marks one of {what}, which plainllama does not run")
    notes = [
        f"params.json key {k!r} is not known to plainllama and was ignored"
        for k in sorted(params)
        if k not in READ_KEYS | HARMLESS_KEYS | set(UNSUPPORTED_KEYS)
    ]
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise PlainLlamaError(f"{path}: '{key}' is missing")
    for key, check in PARAM_CHECKS.items():
        if params.get(key) is not None:
            check(path, f"'{key}'", params[key])
    return params, notes


def context_length(params: dict) -> int:
    """params.json records no context length unless max_seq_len is set. Meta's published figures
    follow from the rotary settings: the scaled rope of Llama 3.1+ serves 128k tokens, theta
    500000 is Llama 3 (8k), anything else is Llama 1/2 (4k; Llama 1 had 2k but runs at 4k)."""
    if params.get("max_seq_len"):
        return int(params["max_seq_len"])
    if params.get("use_scaled_rope"):
        return 131072
    return 8192 if params.get("rope_theta", 10000.0) >= 500000 else 4096


def load_shard(path: str) -> dict:
    return read_shard(path)[0]


def read_shard(path: str) -> tuple[dict, dict[str, StoredTensor]]:
    """A shard's tensors (memory-mapped), checked, and where each one's bytes lie in the file."""
    try:
        shard = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise PlainLlamaError(
            f"{path}: refused to load: the file holds Python objects other than tensors, which could run code "
            f"when unpickled (loaded with weights_only=True; {str(e).splitlines()[0]})"
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise PlainLlamaError(
            f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]}); the file may be truncated or "
            "corrupt"
        ) from None
    if not isinstance(shard, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in shard.items()
    ):
        raise PlainLlamaError(
            f"{path}: expected a dictionary of named tensors, found a {type(shard).__name__} of other things"
        )
    return shard, stored_tensors(path, shard, check_records(path, shard))


def zip_records(path: str) -> list[tuple[int, int]]:
    """(where the data starts in the file, its length) of each tensor storage's record."""
    with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
        records = []
        for info in archive.infolist():
            if "/data/" in info.filename and info.filename.rsplit("/", 1)[-1].isdigit():
                f.seek(info.header_offset + 26)
                name_length, extra_length = struct.unpack("<HH", f.read(4))
                records.append((info.header_offset + 30 + name_length + extra_length, info.file_size))
    return records


def mapping_base(shard: dict, records: list[tuple[int, int]]) -> int | None:
    """The address of the file's first byte in torch.load's memory map (mmap=True): storages lie in
    the mapping at their records' offsets, and the first storage is the first record."""
    if not records or not shard:
        return None
    return min(t.untyped_storage().data_ptr() for t in shard.values()) - min(start for start, _ in records)


def check_records(path: str, shard: dict) -> dict[int, tuple[int, int]]:
    """Each tensor's bytes must lie within its own record of the zip file. Loading with mmap=True maps
    the file and does not check this (mmap=False does): a storage longer than its record would be
    read from the bytes that follow it. Returns storage address -> (its offset in the file, the
    record's length), for the storages that start a record."""
    records = zip_records(path)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in shard.values()}
    base = mapping_base(shard, records)
    if base is None:
        return {}
    lengths = dict(records)
    for pointer, nbytes in storages.items():
        length = lengths.get(pointer - base)
        if length is not None and nbytes > length:
            raise PlainLlamaError(
                f"{path}: a tensor claims {nbytes} bytes, but its record in the file holds {length}; the file is "
                "corrupt"
            )
    return {pointer: (pointer - base, lengths[pointer - base]) for pointer in storages if pointer - base in lengths}


def load_meta(folder: str) -> Checkpoint:
    params, notes = read_params(os.path.join(folder, "params.json"))
    shards, stored = read_shards(folder)
    args, embedding_axis = model_args(folder, params, shards)
    tensors = merged_tensors(shards, embedding_axis, args, stored_across_shards(shards, stored, embedding_axis))
    check_merged_shapes(folder, args, shards, embedding_axis)
    tokenizer, chat_format, chat_template = read_tokenizer(folder, args)
    for note in notes:
        log.warning("%s: %s", folder, note)
    return Checkpoint(
        format="meta",
        path=folder,
        args=args,
        tensors=tensors,
        tokenizer=tokenizer,
        chat_format=chat_format,
        chat_template=chat_template,
        notes=notes,
    )


def read_shards(folder: str) -> tuple[list[dict], list[dict[str, StoredTensor]]]:
    """consolidated.00.pth ... NN.pth, numbered without gaps and holding the same tensor names: their
    tensors, and where each shard's tensors lie in its file."""
    numbered = sorted((int(m.group(1)), f) for f in os.listdir(folder) if (m := SHARD.fullmatch(f)))
    if not numbered:
        raise PlainLlamaError(f"{folder}: no consolidated.NN.pth weight files next to params.json")
    numbers = [n for n, _ in numbered]
    if numbers != list(range(len(numbers))):
        missing = ", ".join(f"consolidated.{n:02d}.pth" for n in sorted(set(range(max(numbers) + 1)) - set(numbers)))
        raise PlainLlamaError(f"{folder}: shard numbering has gaps or duplicates (missing {missing})")
    shards, stored = zip(*(read_shard(os.path.join(folder, f)) for _, f in numbered), strict=True)
    names = set(shards[0])
    for (_, f), shard in zip(numbered[1:], shards[1:], strict=True):
        if set(shard) != names:
            raise PlainLlamaError(
                f"{folder}: {f} holds different tensors than consolidated.00.pth; shards of different models?"
            )
    return list(shards), list(stored)


def model_args(folder: str, params: dict, shards: list[dict]) -> tuple[ModelArgs, int]:
    """The model's shape from params.json and the embedding, and the axis the shards cut the embedding along."""
    n = len(shards)
    dim, n_heads = params["dim"], params["n_heads"]
    # Claims are compared with what the shards hold before anything is sized by them.
    layers = {name.split(".")[1] for name in shards[0] if name.startswith("layers.")}
    if params["n_layers"] > len(layers):
        raise PlainLlamaError(
            f"{folder}/params.json: n_layers is {params['n_layers']}, but the shards hold {len(layers)} layers"
        )
    n_kv_heads = params.get("n_kv_heads") or n_heads
    embedding = shards[0].get("tok_embeddings.weight")
    if embedding is None:
        raise PlainLlamaError(f"{folder}: consolidated.00.pth has no tok_embeddings.weight; not a Llama checkpoint")
    # Which axis the embedding was cut along: its width is either all of dim (cut by vocabulary) or dim/N.
    if n > 1 and embedding.shape[1] * n == dim and embedding.shape[1] != dim:
        embedding_axis = 1
    elif embedding.shape[1] == dim:
        embedding_axis = 0
    else:
        raise PlainLlamaError(
            f"{folder}: tok_embeddings.weight of shard 0 has shape {list(embedding.shape)}, which fits neither "
            f"dim={dim} nor {n} shards of it"
        )
    vocab_size = params.get("vocab_size", -1)
    if vocab_size in (-1, None):  # Llama 1/2 leave it to the tokenizer: the embedding knows
        vocab_size = embedding.shape[0] * (n if embedding_axis == 0 else 1)

    factors = None
    if params.get("use_scaled_rope"):
        # Meta's reference applies Llama 3.1's scaling with these fixed constants.
        factors = llama3_rope_factors(dim // n_heads, params.get("rope_theta", 500000.0), 8.0, 1.0, 4.0, 8192)
    try:
        args = ModelArgs(
            dim=dim,
            n_layers=params["n_layers"],
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            vocab_size=vocab_size,
            hidden_dim=feed_forward_width(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=params.get("rope_theta", 10000.0),
            rope_freq_factors=factors,
            context_length=context_length(params),
        )
    except ValueError as e:
        raise PlainLlamaError(f"{folder}/params.json: {e}") from None

    return args, embedding_axis


def stored_tensors(path: str, shard: dict, records: dict[int, tuple[int, int]]) -> dict[str, StoredTensor]:
    """Where each contiguous tensor's bytes lie in its .pth file (`records`: check_records'), when they
    lie within its storage's record: lets a single-shard checkpoint's layers stream from disk like GGUF
    and safetensors ones (engine/streaming.py reads the byte range with plain reads; the zip stores
    records uncompressed). A tensor without one cannot stream, and the planner says so."""
    stored = {}
    for name, t in shard.items():
        record = records.get(t.untyped_storage().data_ptr())
        start, nbytes = t.storage_offset() * t.element_size(), t.numel() * t.element_size()
        if t.is_contiguous() and record is not None and start + nbytes <= record[1]:
            stored[name] = StoredTensor(path, record[0] + start, nbytes, partial(_decode, t.dtype, t.shape))
    return stored


def _decode(dtype: torch.dtype, shape: torch.Size, raw: torch.Tensor) -> torch.Tensor:
    return raw.view(dtype).view(shape)


def shard_axis(name: str, embedding_axis: int) -> int | None:
    """The axis Meta's model-parallel layers cut a tensor along; None for the norms, which every shard
    holds whole."""
    if name == "tok_embeddings.weight":
        return embedding_axis
    if name == "output.weight" or any(f".{c}." in name for c in COLUMN_PARALLEL):
        return 0
    if any(f".{r}." in name for r in ROW_PARALLEL):
        return 1
    return None


def stored_across_shards(
    shards: list[dict], stored: list[dict[str, StoredTensor]], embedding_axis: int
) -> dict[str, StoredTensor]:
    """Where each tensor's parts lie in the shards' files, as one StoredTensor of several byte ranges:
    what lets a checkpoint of several shards stream (engine/streaming.py reads the parts one after
    another and `decode` joins them: for a cut by rows the bytes already are the whole tensor's)."""
    if len(shards) == 1:
        return stored[0]
    joined = {}
    for name in shards[0]:
        if not all(name in s for s in stored):
            continue  # a part that is not one contiguous range of its file: the tensor cannot stream
        axis = shard_axis(name, embedding_axis)
        if axis is None:
            joined[name] = stored[0][name]
            continue
        shapes = [tuple(shard[name].shape) for shard in shards]
        parts = [s[name] for s in stored]
        joined[name] = StoredTensor(
            parts[0].path,
            parts[0].offset,
            sum(p.nbytes for p in parts),
            partial(_decode_parts, shards[0][name].dtype, shapes, axis),
            tuple((p.path, p.offset, p.nbytes) for p in parts),
        )
    return joined


def _decode_parts(dtype: torch.dtype, shapes: list[tuple[int, ...]], axis: int, raw: torch.Tensor) -> torch.Tensor:
    """The shards' parts, read one after another into `raw`, joined along `axis`."""
    counts = [math.prod(shape) * dtype.itemsize for shape in shapes]
    parts = [piece.view(dtype).view(shape) for piece, shape in zip(raw.split(counts), shapes, strict=True)]
    if axis == 0:  # rows after rows: the bytes are the whole tensor's already
        return raw.view(dtype).view(sum(shape[0] for shape in shapes), *shapes[0][1:])
    return torch.cat(parts, dim=axis)


class ShardParts:
    """A tensor as Meta's model-parallel shards hold it: one part per shard, cut along `axis` (None:
    each shard holds all of it, as the norms). Calling it joins the parts; tensor parallelism
    (parallel/slicing.py) cuts its own slice from them instead, reading only that slice."""

    def __init__(self, parts: list[torch.Tensor], axis: int | None):
        self.parts, self.axis = parts, axis

    def __call__(self) -> torch.Tensor:
        if self.axis is None or len(self.parts) == 1:
            return self.parts[0]
        from ..engine.memory import release

        # torch.cat, a part at a time: each part's pages of the mapped file are dropped once copied,
        # so joining holds the result and one part, not the result and every part
        shape = list(self.parts[0].shape)
        shape[self.axis] = sum(part.shape[self.axis] for part in self.parts)
        joined = torch.empty(shape, dtype=self.parts[0].dtype)
        at = 0
        for part in self.parts:
            joined.narrow(self.axis, at, part.shape[self.axis]).copy_(part)
            release(part, joined)
            at += part.shape[self.axis]
        return joined


def merged_tensors(
    shards: list[dict], embedding_axis: int, args: ModelArgs, stored: dict[str, StoredTensor]
) -> dict[str, CheckpointTensor]:
    """Every tensor, its shards' parts joined along the axis the model-parallel layers cut it.
    `stored`: where each tensor's bytes lie (stored_across_shards)."""
    names = set(shards[0])

    def merge(name: str) -> ShardParts:
        return ShardParts([shard[name] for shard in shards], shard_axis(name, embedding_axis))

    tensors = {}
    for name in sorted(names):
        if name == "rope.freqs":
            continue  # Llama 1/2 checkpoints carry their rotary table; it is recomputed from params
        tensors[name] = CheckpointTensor(type_name(shards[0][name].dtype), merge(name), stored=stored.get(name))
    first = shards[0]
    shared = (
        "output.weight" in first
        and first["output.weight"].untyped_storage().data_ptr()
        == first["tok_embeddings.weight"].untyped_storage().data_ptr()
    )
    if "output.weight" not in tensors or shared:
        # Tied embeddings: no output.weight, or one saved as the very same tensor as the embedding
        # (torch.save keeps shared storage shared, and `convert --to meta` writes ties that way).
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
        args.tie_embeddings = True
    return tensors


def read_tokenizer(folder: str, args: ModelArgs):
    """(tokenizer, built-in chat format, Jinja chat template) from tokenizer.model, or the
    tokenizer.json that `convert --to meta` writes for vocabularies tokenizer.model cannot hold."""
    tokenizer_path = os.path.join(folder, "tokenizer.model")
    chat_template = None
    if os.path.isfile(tokenizer_path):
        tokenizer, chat_format = load_tokenizer_model(tokenizer_path)
    elif os.path.isfile(os.path.join(folder, "tokenizer.json")):
        # Written by `plainllama convert --to meta` for vocabularies that tokenizer.model cannot hold.
        tokenizer_path = os.path.join(folder, "tokenizer.json")
        tokenizer, chat_format = load_tokenizer_json(folder, set()), None
        config_path = os.path.join(folder, "tokenizer_config.json")
        chat_template = read_json(config_path).get("chat_template") if os.path.isfile(config_path) else None
    else:
        raise PlainLlamaError(f"{folder}: no tokenizer.model next to params.json")
    if tokenizer.vocab_size > args.vocab_size:
        raise PlainLlamaError(
            f"{tokenizer_path}: {tokenizer.vocab_size} tokens, but the model's embedding has only {args.vocab_size} "
            "rows"
        )
    return tokenizer, chat_format, chat_template


def check_merged_shapes(folder, args, shards, embedding_axis):
    """Shapes after merging must be what params.json implies, before anything is built."""
    expected = expected_shapes(args)
    n = len(shards)
    present = set(shards[0]) - {"rope.freqs"}
    missing = sorted(set(expected) - present - ({"output.weight"} if args.tie_embeddings else set()))
    if missing:
        raise PlainLlamaError(f"{folder}: missing tensor(s) {', '.join(missing[:4])}")
    extra = sorted(present - set(expected))
    if extra:
        raise PlainLlamaError(f"{folder}: tensor {extra[0]!r} does not belong to a {args.n_layers}-layer Llama model")
    for name in present:
        shapes = [tuple(shard[name].shape) for shard in shards]
        if len(set(shapes)) > 1:  # Meta's shards hold equal slices of every tensor
            raise PlainLlamaError(
                f"{folder}: {name} has shapes {[list(s) for s in shapes]} across the {n} shards; shards of different "
                "models?"
            )
        want = expected[name]
        if len(want) == 1:
            merged = shapes[0]
        else:
            axis = (
                embedding_axis
                if name == "tok_embeddings.weight"
                else 1
                if any(f".{r}." in name for r in ROW_PARALLEL)
                else 0
            )
            merged = list(shapes[0])
            merged[axis] = sum(s[axis] for s in shapes)
            merged = tuple(merged)
        if merged != want:
            raise PlainLlamaError(
                f"{folder}: {name} has shape {list(merged)} after merging {n} shard(s), but params.json implies "
                f"{list(want)}"
            )
