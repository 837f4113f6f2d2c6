"""safetensors files written one tensor at a time.

The safetensors library's save_file takes every tensor at once, so a model must be in memory
whole to be saved. The format is simple enough to write as it streams: 8 bytes giving the header's
length, a JSON header naming each tensor's dtype, shape and byte range (counted from the header's
end), then the bytes, in that order. The header needs only the shapes, which the config gives, so
it is written first and each tensor's bytes follow as the tensor is read. The safetensors library
reads the result (the tests load every file written here with it)."""

from __future__ import annotations

import json
import struct

import torch

from ..errors import PlainLlamaError

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def header_bytes(entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, shape in entries:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: str, entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, tensors) -> None:
    """Write the header for `entries` ([(name, shape)], all in `dtype`), then take that many
    (name, tensor) from the iterator `tensors`, each written as it arrives."""
    with open(path, "wb") as f:
        f.write(header_bytes(entries, dtype, {"format": "pt"}))
        for want_name, want_shape in entries:
            name, tensor = next(tensors)
            if (name, tuple(tensor.shape), tensor.dtype) != (want_name, tuple(want_shape), dtype):
                raise PlainLlamaError(
                    f"{path}: tensor {name} {list(tensor.shape)} {tensor.dtype} arrived where the header says "
                    f"{want_name} {list(want_shape)} {dtype}"
                )
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
