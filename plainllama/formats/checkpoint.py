"""What every format loader returns: the model's shape, its tensors in our naming, its tokenizer.

Tensors are given as zero-argument functions so that nothing is read or converted until the model
is built, one tensor at a time (see loading.py): peak memory stays near the size of the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

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


@dataclass
class Checkpoint:
    format: str  # "gguf", ...
    path: str
    args: ModelArgs
    # name in Meta's naming (e.g. "layers.0.attention.wq.weight") -> function returning the tensor
    # as stored (float32 for quantized weights, else the stored float dtype)
    tensors: dict[str, Callable[[], torch.Tensor]]
    tensor_types: dict[str, str]  # name -> stored type ("Q4_1", "F32", ...)
    tokenizer: Tokenizer
    chat_template: str | None = None  # a Jinja chat template carried by the files (GGUF, HF)
    chat_format: str | None = None  # or a built-in one: "llama3", "llama2" (Meta's formats)
    name: str | None = None  # the model's own name, if the file gives one
    notes: list[str] = field(default_factory=list)  # things the loader noticed and the user may want to know
    # name -> function returning the stored bytes (uint8, 1-D) of a block-quantized or 16-bit tensor,
    # for loaders that keep weights compressed (packed.py); only formats with such types give them
    raw_tensors: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    # name -> where its bytes are stored, for formats whose tensors are plain byte ranges of a file
    # (GGUF, safetensors); layers can then be streamed from disk (streaming.py)
    stored: dict[str, StoredTensor] = field(default_factory=dict)


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
