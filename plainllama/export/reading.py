"""The source model's tensors, one at a time, in the order a writer asks for them.

Where a tensor's bytes are one range of a file (GGUF, safetensors), they are read with plain file
reads into a fresh buffer rather than through the file's memory map: every page of a mapped file
that has been touched counts in the process's memory until the map is closed, which after the last
tensor is the whole model. A read buffer is freed as soon as its tensor has been written, so peak
memory stays near the largest tensor whatever the model's size."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..errors import PlainLlamaError
from ..formats.checkpoint import Checkpoint, CheckpointTensor


def read_tensor(record: CheckpointTensor) -> torch.Tensor:
    """The tensor as stored (float32 for quantized types), as record.load() gives it."""
    stored = record.stored
    if stored is None:  # Meta's .pth records, whose loader maps the file (issue 21 reads them by offset)
        return record.load()
    buffer = torch.empty(stored.nbytes, dtype=torch.uint8)
    at = 0
    for path, offset, nbytes in stored.ranges:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                got = f.readinto(buffer[at : at + nbytes].numpy().data)
        except OSError as e:
            raise PlainLlamaError(f"{path}: cannot read ({e.strerror})") from None
        if got != nbytes:
            raise PlainLlamaError(f"{path}: the file ended early (it changed or was truncated while converting)")
        at += nbytes
    return stored.decode(buffer)


def tensors_in_order(
    checkpoint: Checkpoint, names: list[str], dtype: torch.dtype, written: Callable[[int], None] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor in `dtype`) for each name, reading one tensor at a time; `written(nbytes)` is
    told of each tensor once the writer has taken it (to draw progress)."""
    for name in names:
        tensor = read_tensor(checkpoint.tensors[name]).to(dtype)
        yield name, tensor
        if written is not None:
            written(tensor.nbytes)
