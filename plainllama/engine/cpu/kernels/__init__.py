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
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_matmul.c", "amx_matmul.c", "decode_layer.c")]


def cache_dir() -> Path:
    return Path(os.environ.get("PLAINLLAMA_CACHE") or Path.home() / ".cache" / "plainllama")


def _cpu_signature() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def _build(compiler: str) -> Path:
    key = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES) + compiler.encode() + _cpu_signature().encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_matmul-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", *map(str, SOURCES), "-o", str(built)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise OSError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "compiler failed")
        os.replace(built, target)  # atomic: a concurrent run sees the old state or the whole file
    return target


@lru_cache(maxsize=None)
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
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    for name, args in {
        "q4_matmul": [p, i, i, p, p, p, i, p],
        "q8_matmul": [p, i, i, p, p, i, p],
        "f16_matmul": [p, i, i, p, i, p],
        "bf16_matmul": [p, i, i, p, i, p],
        "q4_to_bf16": [p, p, p, i, i, p],
        "q8_to_bf16": [p, p, i, i, p],
        "f16_to_bf16": [p, ctypes.c_size_t, p],
        "read_bytes": [p, ctypes.c_size_t],
        "decode_layer": [p, p, i, p, p, i, p, p, ctypes.c_long, i, p, p],
        "amx_matmul": [p, i, i, i, p, p, p, i, p, p],
        "amx_available": [],
        "rms_norm_rows": [p, p, ctypes.c_long, i, ctypes.c_float, p],
        "rotate_rows": [p, ctypes.c_long, i, i, i, i, p, p, i],
        "swiglu_rows": [p, ctypes.c_long, i, p],
    }.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, (f if name == "read_bytes" else i)
    return lib


def available() -> bool:
    return _library() is not None


@lru_cache(maxsize=None)
def amx() -> bool:
    """Whether amx_matmul runs here: the library was built for a CPU with AMX and Linux lets this
    process use the tile registers."""
    return available() and _library().amx_available() == 1


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def function(name: str):
    """The C function `name`, for callers that keep it (and their pointers) to skip lookups per call."""
    return getattr(_library(), name)


def check(code: int, what: str):
    if code == -1:
        raise MemoryError(f"{what}: out of memory for its working buffers")
    if code == -2:
        raise RuntimeError(f"{what}: this CPU or kernel does not allow AMX")
    if code != 0:
        raise ValueError(f"{what}: the input width is not a multiple of 64")


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
