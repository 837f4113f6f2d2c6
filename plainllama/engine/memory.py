"""Giving memory back while a model loads.

A memory-mapped checkpoint's pages count as the process's memory once read. When a tensor is
converted into new memory (bfloat16 file -> float32 model), its source pages are not needed any
more, but stay mapped until the whole file is closed: loading in float32 would peak at the float32
weights plus the file. `release` tells the kernel those pages can go now (madvise MADV_DONTNEED).
For a file mapping this only drops them from this process; read again, they come back from the file.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        _libc = None
MADV_DONTNEED = 4
PAGE = mmap.PAGESIZE


_kept: list[tuple[int, int]] = []  # address ranges release() must leave alone


def keep(buffer: torch.Tensor) -> tuple[int, int]:
    """Never release pages of `buffer` (a read buffer reused on every pass: released pages would
    only be faulted back in, zero-filled, on the next read), until `forget` is given the result."""
    kept = (buffer.data_ptr(), buffer.data_ptr() + buffer.numel() * buffer.element_size())
    _kept.append(kept)
    return kept


def forget(kept: tuple[int, int]) -> None:
    if kept in _kept:
        _kept.remove(kept)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def give_freed_memory_back() -> None:
    """Make large freed blocks go back to the OS at once. glibc serves blocks of 128 KiB and more
    with their own mappings, returned when freed, but after the first such free it raises that
    threshold to the freed size: later tensors of that size come from the heap and stay in the
    process when freed (and the layer reader thread has a heap of its own), beyond a memory budget.
    The cost is a page fault per page of each new large tensor, so it is done only when layers
    stream, where the budget is a promise (measurements: docs/performance.md)."""
    if _libc is not None and hasattr(_libc, "mallopt"):
        _libc.mallopt(M_MMAP_THRESHOLD, 128 << 10)


def release(source: torch.Tensor, result: torch.Tensor) -> None:
    """Drop `source`'s pages from memory if `result` does not share them. Only whole pages inside
    the tensor are released, so neighbouring tensors in the same mapping are never touched."""
    if _libc is None or source.device.type != "cpu" or source.numel() == 0:
        return
    start, end = source.data_ptr(), source.data_ptr() + source.numel() * source.element_size()
    r_start, r_end = result.data_ptr(), result.data_ptr() + result.numel() * result.element_size()
    if result.device.type == "cpu" and r_start < end and start < r_end:
        return  # the model uses this memory itself
    if any(k_start < end and start < k_end for k_start, k_end in _kept):
        return
    first = -(-start // PAGE) * PAGE
    last = end // PAGE * PAGE
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


__all__ = ["forget", "give_freed_memory_back", "keep", "release"]
