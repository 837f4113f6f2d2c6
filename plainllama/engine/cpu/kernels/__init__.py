"""The CPU kernels in cpu_matmul.c (matrix products for a few rows; cpu_matmul_avx2.c at the AVX2
level), q6_matmul.c (the same for Q6_K, Q3_K and Q2_K weights kept as stored), amx_matmul.c (products for prompts,
on CPUs with AMX) and decode_layer.c (a whole layer's decode step), compiled on first use into one
library and called through ctypes.

Compiled on the user's machine with `-march=native`, so it uses what that CPU has, up to the level
PLAINLLAMA_ISA caps it at (LEVELS: `amx`, the default, uses everything; `avx512` leaves Intel's
matrix units out; `avx2` builds cpu_matmul_avx2.c, the kernels for CPUs without AVX-512; `none`
turns the kernels off, as PLAINLLAMA_KERNELS=0 does). The library is cached
under ~/.cache/plainllama (or $PLAINLLAMA_CACHE) by a hash of the source, the compiler, the CPU and
the level, rebuilt when any of them changes, and rebuilt once if the cached file cannot be loaded.
No torch headers are involved, so the build takes about a second. Where it cannot be built (no C
compiler, a CPU without AVX2, not x86), `available()` is False, `isa()` is "none", and every
caller takes its PyTorch path instead (packed weights: engine/cpu/torch_products.py); a build that
failed says why, once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
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

from ....errors import PlainLlamaError

# cpu_matmul.c (AVX-512) and cpu_matmul_avx2.c hold the same functions; which one a build compiles
# depends on the instruction sets the compiler is allowed (the other compiles to nothing); q6_matmul.c
# holds both widths itself.
SOURCES = [
    Path(__file__).with_name(name)
    for name in (
        "cpu_matmul.c",
        "cpu_matmul_avx2.c",
        "q6_matmul.c",
        "float32_rows.c",
        "amx_matmul.c",
        "prompt_attention.c",
        "prompt_attention_f32.c",
        "decode_layer.c",
        "q8_lanes.c",
        "q4_lanes.c",
    )
]
HEADER = Path(__file__).with_name("plainllama.h")  # the contract: layouts, status codes, structs, prototypes
INTERNAL_HEADERS = [
    Path(__file__).with_name(name)
    for name in ("row_groups.h", "vectors.h", "unpack.h", "amx.h", "exp16.h", "q8_lanes.h", "q4_lanes.h")
]


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


# Instruction-set levels, each including the ones before it, and the compiler flags that cap a build
# at that level (on top of -march=native: a level above what the CPU has builds what the CPU has).
# "avx2": AVX2, FMA and F16C, plus AVX-VNNI where the CPU has it; -mno-avx512f turns off every
# AVX-512 extension, so cpu_matmul_avx2.c is compiled instead of cpu_matmul.c.
LEVELS = ("none", "avx2", "avx512", "amx")
NO_AMX = ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]
LEVEL_FLAGS = {"avx2": ["-mno-avx512f", *NO_AMX], "avx512": NO_AMX, "amx": []}

log = logging.getLogger("plainllama")
FALLBACK = "PyTorch's weight-only operators multiply the compressed weights (slower)"


def requested_level() -> str:
    """The level PLAINLLAMA_ISA asks for (default: the best the CPU has)."""
    if os.environ.get("PLAINLLAMA_KERNELS", "1") == "0":
        return "none"
    level = os.environ.get("PLAINLLAMA_ISA", "amx").strip().lower() or "amx"
    if level not in LEVELS:
        raise PlainLlamaError(f"PLAINLLAMA_ISA={level}: expected one of {', '.join(reversed(LEVELS))}")
    return level


def _build(compiler: str, level: str) -> Path:
    key = hashlib.sha256(
        b"".join(s.read_bytes() for s in [*SOURCES, HEADER, *INTERNAL_HEADERS])
        + compiler.encode()
        + _cpu_signature().encode()
        + level.encode()
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
            *LEVEL_FLAGS[level],
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
def _library_at(level: str):
    """The library built at `level` (None where it cannot be), loaded once per process and level."""
    if (
        level not in LEVEL_FLAGS
        or platform.machine() not in ("x86_64", "AMD64")
        or not sys.platform.startswith("linux")
    ):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        log.warning("the C kernels are off: no C compiler (cc or gcc) found; %s", FALLBACK)
        return None
    try:
        path = _build(compiler, level)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:  # a cached file cut short or overwritten: build it again, once
            path.unlink(missing_ok=True)
            lib = ctypes.CDLL(str(_build(compiler, level)))
    except OSError as e:
        log.warning("the C kernels are off (%s); %s", e, FALLBACK)
        return None
    for name, (restype, argtypes) in PROTOTYPES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _library():
    # PLAINLLAMA_ISA is read on each call, so that the tests can run every kernel at each level the
    # CPU has in one process; a model keeps the functions it was built with (function() below).
    return _library_at(requested_level())


def available() -> bool:
    return _library() is not None


@cache
def _amx_at(level: str) -> bool:
    lib = _library_at(level)
    return lib is not None and lib.amx_available() == 1


def amx() -> bool:
    """Whether amx_matmul runs here: the library was built for a CPU with AMX and Linux lets this
    process use the tile registers."""
    return _amx_at(requested_level())


def isa() -> str:
    """The level the kernels run at here, as the library itself says: "amx", "avx512", "avx2" or "none"."""
    lib = _library()
    if lib is None:
        return "none"
    return "amx" if amx() else {3: "avx512", 2: "avx2"}[lib.kernel_level()]


def levels() -> list[str]:
    """Every level whose kernels this machine builds and runs, best last, each named once by what it
    built (a cap above the CPU's own level builds the same library as the CPU's level)."""
    found: list[str] = []
    for level in LEVELS[1:]:
        lib = _library_at(level)
        if lib is None:
            continue
        name = "amx" if _amx_at(level) else {3: "avx512", 2: "avx2"}[lib.kernel_level()]
        if name not in found:
            found.append(name)
    return found


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


def _unpacking(name: str, out: torch.Tensor):
    """The C function that unpacks `name` rows into `out`'s dtype: {name}_to_bf16 or {name}_to_f32."""
    suffix = {torch.bfloat16: "bf16", torch.float32: "f32"}[out.dtype]
    return getattr(_library(), f"{name}_to_{suffix}")


def q4_to_float(qs, d, m, out: torch.Tensor, qh=None, sc=None, mn=None) -> torch.Tensor:
    """q4 rows (q5 with their fifth bits `qh`; K-quant scales `sc`, `mn`) -> [N, K] written into
    `out` (bfloat16, rounded to nearest even, or float32, exact)."""
    N, K = qs.shape[0], qs.shape[1] * 2
    _unpacking("q4", out)(_ptr(qs), _ptr(qh), _ptr(d), _ptr(m), _ptr(sc), _ptr(mn), N, K, _ptr(out))
    return out


def q8_to_float(qs, d, out: torch.Tensor) -> torch.Tensor:
    """q8 rows -> [N, K] written into `out` (bfloat16 or float32)."""
    _unpacking("q8", out)(_ptr(qs), _ptr(d), qs.shape[0], qs.shape[1], _ptr(out))
    return out


def q6_to_float(qs, sc, d, out: torch.Tensor) -> torch.Tensor:
    """q6 rows -> [N, K] written into `out` (bfloat16 or float32)."""
    N, K = out.shape
    check(_unpacking("q6", out)(_ptr(qs), _ptr(sc), _ptr(d), N, K, _ptr(out)), f"q6 unpacking to {out.dtype}")
    return out


def q3_to_float(qs, sc, d, out: torch.Tensor) -> torch.Tensor:
    """q3 rows -> [N, K] written into `out` (bfloat16 or float32)."""
    N, K = out.shape
    check(_unpacking("q3", out)(_ptr(qs), _ptr(sc), _ptr(d), N, K, _ptr(out)), f"q3 unpacking to {out.dtype}")
    return out


def q2_to_float(qs, sc, d, m, out: torch.Tensor) -> torch.Tensor:
    """q2 rows -> [N, K] written into `out` (bfloat16 or float32)."""
    N, K = out.shape
    check(_unpacking("q2", out)(_ptr(qs), _ptr(sc), _ptr(d), _ptr(m), N, K, _ptr(out)), f"q2 unpacking to {out.dtype}")
    return out


def f16_to_bf16(w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """float16 -> bfloat16 (rounded to nearest even) written into `out`; w.numel() a multiple of 16."""
    _library().f16_to_bf16(_ptr(w), w.numel(), _ptr(out))
    return out


def read_bytes(buffer: torch.Tensor) -> float:
    """Read every byte of `buffer` with all threads (for measuring memory bandwidth)."""
    return _library().read_bytes(_ptr(buffer), buffer.numel() * buffer.element_size())
