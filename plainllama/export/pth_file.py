"""Meta's consolidated.00.pth written one tensor at a time.

torch.save takes the whole state dict at once, so a model must be in memory whole to be saved.
Here it is saved in two passes. First torch.save itself writes the file under
torch.serialization.skip_data(): the pickle, every record and the zip directory, with each
storage's bytes left as empty space; the tensors it is given are torch.empty() allocations that are
never touched, so they take address space but no memory. Then each tensor's bytes are written into
its record, one tensor at a time, and the record's CRC-32 (which skip_data leaves at zero) is set in
the zip directory, so that zip tools find the archive intact. The result is the file torch.save
would have written (the tests load it with torch.load(weights_only=True) and check it with
Python's zipfile).

torch.save numbers the storages 0, 1, 2, ... in the order the pickler meets them, which for a dict
of tensors is the dict's order with shared storages (a tied output projection) counted once."""

from __future__ import annotations

import struct
import zipfile
import zlib
from collections.abc import Iterable

import torch

from ..errors import PlainLlamaError

LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field
DESCRIPTOR_SIGNATURE = 0x08074B50
CENTRAL_SIGNATURE = 0x02014B50


def write_pth(path: str, layout: dict[str, tuple[tuple[int, ...], torch.dtype, str]], tensors: Iterable) -> None:
    """layout: name -> (shape, dtype, name of the tensor whose storage it shares, itself if none), in
    the order to save; `tensors` then yields (name, tensor) for each name that owns its storage."""
    placeholders: dict[str, torch.Tensor] = {}
    for name, (shape, dtype, owner) in layout.items():
        placeholders[name] = placeholders[owner] if owner != name else torch.empty(shape, dtype=dtype)
    with torch.serialization.skip_data():
        torch.save(placeholders, path)
    owners = [name for name, (_, _, owner) in layout.items() if owner == name]
    with zipfile.ZipFile(path) as archive:
        records = {info.filename.split("/", 1)[1]: info for info in archive.infolist()}
        start_dir = archive.start_dir
    crcs = {}
    with open(path, "r+b") as f:
        for key, (name, tensor) in enumerate(tensors):
            info = records[f"data/{key}"]
            if name != owners[key] or info.file_size != placeholders[name].untyped_storage().nbytes():
                raise PlainLlamaError(f"{path}: record data/{key} does not hold {name} as expected")
            data = tensor.to(layout[name][1]).contiguous().reshape(-1).view(torch.uint8).numpy().data
            if len(data) != info.file_size:
                raise PlainLlamaError(f"{path}: {name} has {len(data)} bytes, its record {info.file_size}")
            f.seek(info.header_offset)
            local = f.read(LOCAL_HEADER)
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            f.seek(info.header_offset + LOCAL_HEADER + name_length + extra_length)
            f.write(data)
            crcs[info.filename] = crc = zlib.crc32(data)
            if info.flag_bits & 0x08:  # a data descriptor follows the bytes: CRC (after its optional signature)
                (signature,) = struct.unpack("<I", f.read(4))
                if signature != DESCRIPTOR_SIGNATURE:
                    f.seek(-4, 1)
                f.write(struct.pack("<I", crc))
        if len(crcs) != len(owners):
            raise PlainLlamaError(f"{path}: {len(crcs)} of {len(owners)} tensors written")
        set_directory_crcs(f, start_dir, crcs)


def set_directory_crcs(f, start_dir: int, crcs: dict[str, int]) -> None:
    """Write each named record's CRC-32 into its entry of the zip's central directory."""
    f.seek(start_dir)
    while True:
        entry_at = f.tell()
        fixed = f.read(46)
        if len(fixed) < 46 or struct.unpack("<I", fixed[:4])[0] != CENTRAL_SIGNATURE:
            return
        name_length, extra_length, comment_length = struct.unpack("<HHH", fixed[28:34])
        name = f.read(name_length).decode("utf-8")
        if name in crcs:
            f.seek(entry_at + 16)
            f.write(struct.pack("<I", crcs[name]))
        f.seek(entry_at + 46 + name_length + extra_length + comment_length)
