"""The CPU kernels in cpu_matmul.c (matrix products for a few rows), amx_matmul.c (products for
prompts, on CPUs with AMX) and decode_layer.c (a whole layer's decode step), compiled on first use
into one library and called through ctypes.

Compiled on the user's machine with `-march=native`, so it uses what that CPU has; the library is
cached under ~/.cache/plainllama (or $PLAINLLAMA_CACHE) by a hash of the source, the compiler and
the CPU, and rebuilt when any of them changes. No torch headers are involved, so the build takes
about a second. Where it cannot be built (no C compiler, a CPU without AVX-512 VNNI, not x86), or
PLAINLLAMA_KERNELS=0, `available()` is False and every caller takes its PyTorch path instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_matmul.c", "amx_matmul.c", "decode_layer.c")]
HEADER = Path(__file__).with_name("plainllama.h")  # the contract: layouts, status codes, structs, prototypes


def _enum(name: str) -> dict[str, tuple[int, str]]:
    """The members of `enum name` in plainllama.h: NAME -> (value, the comment after it)."""
    text = HEADER.read_text()
    found = re.search(r"enum " + name + r" \{(.*?)\};", text, re.S)
    assert found, f"{HEADER} declares no enum {name}"
    body = found.group(1)
    return {
        m[1]: (int(m[2]), (m[3] or "").strip()) for m in re.finditer(r"(\w+) = (-?\d+),[ \t]*(?:/\*(.*?)\*/)?", body)
    }


LAYOUT_CODES = {
    name.removeprefix("LAYOUT_").lower(): value for name, (value, _) in _enum("Layout").items()
}  # {"q4": 0, ...}
STATUS = {value: (name, message) for name, (value, message) in _enum("Status").items()}

C_TYPES = {
    "int": ctypes.c_int,
    "long": ctypes.c_long,
    "size_t": ctypes.c_size_t,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
}


def _prototypes() -> dict[str, tuple[Any, list[Any]]]:
    """Every function plainllama.h declares: name -> (ctypes return type, argument types); any
    pointer is a c_void_p (callers pass tensors' data_ptr())."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    functions = {}
    for restype, name, params in re.findall(r"^(int|double) (\w+)\(([^)]*)\);", text, re.M):
        argtypes = []
        for param in params.split(",") if params.strip() != "void" else []:
            words = param.replace("const", "").replace("*", " * ").split()
            argtypes.append(ctypes.c_void_p if "*" in words else C_TYPES[words[0]])
        functions[name] = (C_TYPES[restype], argtypes)
    return functions


PROTOTYPES = _prototypes()


def cache_dir() -> Path:
    return Path(os.environ.get("PLAINLLAMA_CACHE") or Path.home() / ".cache" / "plainllama")


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next(line for line in cpuinfo if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def _build(compiler: str) -> Path:
    key = hashlib.sha256(
        b"".join(s.read_bytes() for s in [*SOURCES, HEADER]) + compiler.encode() + _cpu_signature().encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"cpu_matmul-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [
            compiler,
            "-O3",
            "-march=native",
            "-fopenmp",
            "-shared",
            "-fPIC",
            *map(str, SOURCES),
            "-o",
            str(built),
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise OSError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "compiler failed")
        os.replace(built, target)  # atomic: a concurrent run sees the old state or the whole file
    return target


@cache
def _library():
    if os.environ.get("PLAINLLAMA_KERNELS", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler or not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except OSError:
        return None
    for name, (restype, argtypes) in PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def available() -> bool:
    return _library() is not None


@cache
def amx() -> bool:
    """Whether amx_matmul runs here: the library was built for a CPU with AMX and Linux lets this
    process use the tile registers."""
    return available() and _library().amx_available() == 1


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def function(name: str):
    """The C function `name`, for callers that keep it (and their pointers) to skip lookups per call."""
    return getattr(_library(), name)


def check(code: int, what: str) -> None:
    """Raise for a kernel's status code (plainllama.h's enum Status)."""
    if code == 0:
        return
    name, message = STATUS.get(code, ("", f"unknown status {code}"))
    raise (MemoryError if name == "STATUS_OUT_OF_MEMORY" else RuntimeError)(f"{what}: {message}")


def q4_to_bf16(qs, d, m, out: torch.Tensor) -> torch.Tensor:
    """q4 rows -> bfloat16 [N, K] written into `out`."""
    N, K = qs.shape[0], qs.shape[1] * 2
    _library().q4_to_bf16(_ptr(qs), _ptr(d), _ptr(m), N, K, _ptr(out))
    return out


def q8_to_bf16(qs, d, out: torch.Tensor) -> torch.Tensor:
    """q8 rows -> bfloat16 [N, K] written into `out`."""
    _library().q8_to_bf16(_ptr(qs), _ptr(d), qs.shape[0], qs.shape[1], _ptr(out))
    return out


def f16_to_bf16(w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """float16 -> bfloat16 (rounded to nearest even) written into `out`; w.numel() a multiple of 16."""
    _library().f16_to_bf16(_ptr(w), w.numel(), _ptr(out))
    return out


def read_bytes(buffer: torch.Tensor) -> float:
    """Read every byte of `buffer` with all threads (for measuring memory bandwidth)."""
    return _library().read_bytes(_ptr(buffer), buffer.numel() * buffer.element_size())
