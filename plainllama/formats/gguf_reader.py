"""Reading a GGUF file's header: typed metadata, the tensor table, and a memory map of the data.

Layout (little-endian; llama.cpp's docs/gguf.md):

    "GGUF"  version:u32  tensor_count:u64  kv_count:u64
    kv_count x   key:string  value_type:u32  value
    tensor_count x   name:string  n_dims:u32  dims:u64[n_dims]  type:u32  offset:u64
    padding to `general.alignment` (default 32), then the tensor data; each offset counts from there

A string is a u64 byte length and UTF-8 bytes; an array is an element type:u32, a count:u64 and
the elements. We parse this ourselves rather than with the `gguf` package's reader, which builds a
numpy view per string and takes ~3 s on a 49k-token vocabulary (here: ~0.1 s). The tests check this
parser against that reader field by field.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ..errors import PlainLlamaError
from .gguf_quants import SUPPORTED_TYPES, block_size, byte_size

# Metadata value types -> struct format of a scalar (8 string, 9 array handled apart)
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
NUMPY_TYPES = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
STRING, ARRAY = 8, 9
MAX_ARRAY_DEPTH = 4  # llama.cpp's own files nest arrays one deep at most

# ggml tensor type ids (ggml.h) -> names. Only some can be read (quants.SUPPORTED_TYPES); the rest
# are named so that the error message can say which one a file uses.
GGML_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    9: "Q8_1",
    10: "Q2_K",
    11: "Q3_K",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    30: "BF16",
    34: "TQ1_0",
    35: "TQ2_0",
    39: "MXFP4",
}


@dataclass
class TensorInfo:
    name: str
    type_name: str
    shape: tuple[int, ...]  # PyTorch order: outermost first ([out, in] for a matrix)
    offset: int  # absolute position in the file
    count: int  # number of elements


@dataclass
class GGUFFile:
    path: str
    version: int
    metadata: dict
    tensors: dict[str, TensorInfo]
    data: np.ndarray  # the whole file, memory-mapped read-only, as uint8
    data_start: int  # where tensor data begins


class _Cursor:
    def __init__(self, path: str, buf: np.ndarray):
        self.path, self.buf, self.pos = path, buf, 0
        self.raw = memoryview(buf)  # type: ignore[arg-type]  # numpy arrays are buffers; its stubs do not say so

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise PlainLlamaError(
                f"{self.path}: the header ends early (needs {n} bytes at byte {self.pos}, file is {len(self.buf)}); "
                "the file is truncated or corrupt"
            )
        view = self.raw[self.pos : self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.scalar("<Q")
        try:
            return bytes(self.take(length)).decode("utf-8")
        except UnicodeDecodeError:
            raise PlainLlamaError(
                f"{self.path}: a header string at byte {self.pos - length} is not valid UTF-8; the file is corrupt"
            ) from None

    def value(self, kind: int, depth: int = 0):
        if kind in SCALAR_FORMATS:
            return self.scalar(SCALAR_FORMATS[kind])
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item_kind, count = self.scalar("<I"), self.scalar("<Q")
            if item_kind in NUMPY_TYPES:
                dtype = np.dtype(NUMPY_TYPES[item_kind]).newbyteorder("<")
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
            if item_kind == STRING:
                return [self.string() for _ in range(count)]
            if item_kind == ARRAY:
                if depth >= MAX_ARRAY_DEPTH:
                    raise PlainLlamaError(
                        f"{self.path}: metadata arrays nested more than {MAX_ARRAY_DEPTH} deep at byte {self.pos}; "
                        "the file is corrupt"
                    )
                return [self.value(ARRAY, depth + 1) for _ in range(count)]
        raise PlainLlamaError(
            f"{self.path}: unknown metadata value type {kind} at byte {self.pos}; the file is corrupt"
        )


def read_gguf(path: str) -> GGUFFile:
    try:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
        raise PlainLlamaError(f"{path}: cannot map the file ({e})") from None
    cur = _Cursor(path, buf)
    if bytes(cur.take(4)) != b"GGUF":
        raise PlainLlamaError(f"{path}: not a GGUF file (bad magic)")
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise PlainLlamaError(f"{path}: unsupported GGUF version {version} (plainllama reads versions 2 and 3)")
    tensor_count, kv_count = cur.scalar("<Q"), cur.scalar("<Q")
    # Each entry takes at least 8+4 bytes: counts larger than the file are corruption, not a reason to loop for hours.
    if tensor_count > len(buf) // 12 or kv_count > len(buf) // 12:
        raise PlainLlamaError(
            f"{path}: the header claims {tensor_count} tensors and {kv_count} metadata entries, more than a file of "
            f"{len(buf)} bytes can hold; the file is truncated or corrupt"
        )

    metadata = {}
    for _ in range(kv_count):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))

    infos = []
    for _ in range(tensor_count):
        name = cur.string()
        n_dims = cur.scalar("<I")
        if n_dims > 4:
            raise PlainLlamaError(f"{path}: tensor {name!r} claims {n_dims} dimensions; the file is corrupt")
        dims = [cur.scalar("<Q") for _ in range(n_dims)]
        type_id, offset = cur.scalar("<I"), cur.scalar("<Q")
        infos.append((name, dims, type_id, offset))

    alignment = metadata.get("general.alignment", 32)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise PlainLlamaError(f"{path}: metadata general.alignment must be a power of two, got {alignment!r}")
    data_start = -(-cur.pos // alignment) * alignment

    tensors = {}
    expected_offset: int | None = 0  # ggml's rule: each tensor's data follows the one before, aligned
    for name, dims, type_id, offset in infos:
        if name in tensors:
            raise PlainLlamaError(f"{path}: tensor {name!r} is listed twice; the tensor table is corrupt")
        count = 1
        for d in dims:
            count *= d
        shape = tuple(reversed(dims))  # ggml lists the innermost dimension first
        type_name = GGML_TYPES.get(type_id, f"unknown type id {type_id}")
        if expected_offset is not None:
            if offset != expected_offset:
                raise PlainLlamaError(
                    f"{path}: tensor {name!r} has its data at offset {offset}, but the tensors before it end at "
                    f"{expected_offset}; the tensor table is corrupt (a moved offset or a changed type)"
                )
            if type_name in SUPPORTED_TYPES and count % block_size(type_name) == 0:
                expected_offset += -(-byte_size(type_name, count) // alignment) * alignment
            else:  # a type or shape refused later by name: the rest of the table cannot be checked
                expected_offset = None
        tensors[name] = TensorInfo(name, type_name, shape, data_start + offset, count)
    return GGUFFile(path, version, metadata, tensors, buf, data_start)
