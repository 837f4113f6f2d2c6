"""Checkpoint formats: each module turns its files into a Checkpoint (config, tensors in Meta's
naming, tokenizer). The format is recognised from the files' content, never from their names."""

from __future__ import annotations

import os

from ..errors import PlainLlamaError
from . import gguf, hf, meta
from .checkpoint import Checkpoint


def open_checkpoint(path: str) -> Checkpoint:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise PlainLlamaError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        if meta.looks_like(path):
            return meta.load_meta(path)
        if hf.looks_like(path):
            return hf.load_hf(path)
        found = sorted(
            f
            for f in os.listdir(path)
            if os.path.isfile(os.path.join(path, f)) and gguf.looks_like(os.path.join(path, f))
        )
        if len(found) == 1:
            return gguf.load_gguf(os.path.join(path, found[0]))
        if len(found) > 1:
            raise PlainLlamaError(f"{path}: holds several GGUF files ({', '.join(found)}); name one")
        raise PlainLlamaError(
            f"{path}: no model files found in this folder (expected a GGUF file, Meta's params.json with "
            "consolidated.NN.pth, or Hugging Face's config.json)"
        )
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise PlainLlamaError(f"{path}: cannot read ({e.strerror})") from None
    if head.startswith(gguf.MAGIC):
        return gguf.load_gguf(path)
    raise PlainLlamaError(f"{path}: not a model file plainllama can read: {gguf.describe_non_gguf(head)}")


__all__ = ["Checkpoint", "open_checkpoint"]
