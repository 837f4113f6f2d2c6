"""What every format loader returns: the model's shape, its tensors in our naming, its tokenizer.

Tensors are given as zero-argument functions so that nothing is read or converted until the model
is built, one tensor at a time (see loading.py): peak memory stays near the size of the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from collections.abc import Callable

import torch

from ..errors import PlainLlamaError
from ..model import ModelArgs
from ..tokenizer import Tokenizer


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor's bytes lie in its file, and how those bytes become the tensor: what lets
    streaming.py read a layer with plain large reads into its own buffers instead of mapping the file.
    `decode(bytes)` takes the `nbytes` stored bytes (uint8, 1-D, on any device) and returns what the
    checkpoint's `tensors[name]()` returns."""

    path: str
    offset: int
    nbytes: int
    decode: Callable[[torch.Tensor], torch.Tensor]
    # A tensor whose bytes lie in several places (Meta's model-parallel shards, one part per file): the
    # (path, offset, nbytes) of each part, read one after another; then path and offset are the
    # first part's, nbytes the sum, and decode joins the parts.
    pieces: tuple[tuple[str, int, int], ...] = ()

    @property
    def ranges(self) -> tuple[tuple[str, int, int], ...]:
        """(path, offset, nbytes) of each byte range, in the order decode expects them."""
        return self.pieces or ((self.path, self.offset, self.nbytes),)


# Stored types are named as GGUF names them, whatever the format: a Meta or HF bfloat16 tensor is "BF16".
TYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
STORED_DTYPES = {name: dtype for dtype, name in TYPE_NAMES.items()}


def type_name(dtype: torch.dtype) -> str:
    """A float dtype's stored-type name ("BF16"); other dtypes keep PyTorch's name ("float64")."""
    return TYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class CheckpointTensor:
    """One tensor of a checkpoint, in our naming: its stored type and the ways to get it. A tied
    output projection is the very same record as the embedding, and is built once (loading.py)."""

    type: str  # stored type: "F32", "F16", "BF16", "Q8_0", "Q4_K", ...
    load: Callable[[], torch.Tensor]  # the tensor as stored (float32 for quantized types, else the stored float dtype)
    raw: Callable[[], torch.Tensor] | None = (
        None  # GGUF: the stored bytes (uint8, 1-D), kept compressed by engine/cpu/packed.py
    )
    stored: StoredTensor | None = (
        None  # where its bytes lie, when they are one byte range of a file (GGUF, safetensors): lets its layer stream
    )


def _released(path: str):
    def load():
        raise PlainLlamaError(
            f"{path}: the model is built and the checkpoint's tensors were released; open the checkpoint again to "
            "read them"
        )

    return load


@dataclass
class Checkpoint:
    format: str  # "gguf", "hf" or "meta"
    path: str
    args: ModelArgs
    # name in Meta's naming (e.g. "layers.0.attention.wq.weight") -> the tensor. Nothing is read until
    # a record's load() or raw() is called.
    tensors: dict[str, CheckpointTensor]
    tokenizer: Tokenizer
    chat_template: str | None = None  # a Jinja chat template carried by the files (GGUF, HF)
    chat_format: str | None = None  # or a built-in one: "llama3", "llama2" (Meta's formats)
    name: str | None = None  # the model's own name, if the file gives one
    notes: list[str] = field(default_factory=list)  # things the loader noticed and the user may want to know
    sampling: dict = field(default_factory=dict)  # the model's own sampling settings (generation_config.json)

    def release_tensors(self) -> None:
        """Let go of what reads the files (memory maps, converted copies) once the model holds every
        weight. The records stay, with their types and byte ranges (streamed layers read those);
        load() and raw() then say why they cannot."""
        released = {}
        for name, record in self.tensors.items():
            if id(record) not in released:
                load = _released(self.path)
                released[id(record)] = replace(record, load=load, raw=load if record.raw is not None else None)
            self.tensors[name] = released[id(record)]


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, with the shape the config implies ([out, in] for a matrix)."""
    D, V, F, Hd = args.dim, args.vocab_size, args.hidden_dim, args.head_dim
    shapes = {"tok_embeddings.weight": (V, D), "norm.weight": (D,), "output.weight": (V, D)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention_norm.weight"] = (D,)
        shapes[p + "attention.wq.weight"] = (args.n_heads * Hd, D)
        shapes[p + "attention.wk.weight"] = (args.n_kv_heads * Hd, D)
        shapes[p + "attention.wv.weight"] = (args.n_kv_heads * Hd, D)
        shapes[p + "attention.wo.weight"] = (D, args.n_heads * Hd)
        shapes[p + "ffn_norm.weight"] = (D,)
        shapes[p + "feed_forward.w1.weight"] = (F, D)
        shapes[p + "feed_forward.w2.weight"] = (D, F)
        shapes[p + "feed_forward.w3.weight"] = (F, D)
    return shapes
