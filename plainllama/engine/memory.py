"""Giving memory back while a model loads, and placing the weights a decode step streams.

A memory-mapped checkpoint's pages count as the process's memory once read. When a tensor is
converted into new memory (bfloat16 file -> float32 model), its source pages are not needed any
more, but stay mapped until the whole file is closed: loading in float32 would peak at the float32
weights plus the file. `release` tells the kernel those pages can go now (madvise MADV_DONTNEED).
For a file mapping this only drops them from this process; read again, they come back from the file.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import sys
import threading
from contextlib import contextmanager, suppress

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


# ---- reusing freed memory within a prompt ---------------------------------------------------
#
# A prompt's forward pass makes and frees tensors of tens of megabytes in every layer (each
# product's output: 46 MB per layer of a 1B model at 512 tokens). glibc serves blocks that large
# with mappings of their own, returned to the system when freed, so every new one is page-faulted
# in again, zero-filled: 800 MiB of faults per 512-token prompt of the 1B file, ~1.4 us each here.
# Within a prompt, the allocator keeps what is freed and hands it out again (the next layer's
# tensors have the same sizes); afterwards it all goes back, as before. Measured on AMD Zen 5
# (1B Q4_K_M, 512 tokens, alternating in one process, best of 4): 3906 -> 3565 ms.

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters
MMAP_MAX_DEFAULT, TRIM_THRESHOLD_DEFAULT = 65536, 128 << 10  # glibc's defaults
_reuse_lock = threading.Lock()
_reusing = 0  # blocks open, over all threads


def reusing_now() -> bool:
    return _reusing > 0


@contextmanager
def reusing_freed_memory():
    """Within this block (on any thread), freed memory stays with the allocator for reuse instead of
    going back to the system; when the last such block ends, all of it goes back (malloc_trim)."""
    global _reusing
    if _libc is None or not hasattr(_libc, "mallopt") or not hasattr(_libc, "malloc_trim"):
        yield
        return
    with _reuse_lock:
        if _reusing == 0:
            _libc.mallopt(M_MMAP_MAX, 0)  # large blocks from the heap too, not their own mappings
            _libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # and none of it trimmed when freed
        _reusing += 1
    try:
        yield
    finally:
        with _reuse_lock:
            _reusing -= 1
            if _reusing == 0:
                _libc.mallopt(M_MMAP_MAX, MMAP_MAX_DEFAULT)
                _libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_DEFAULT)
                _libc.malloc_trim(0)


def reuse_freed_memory_in_prompts(model: torch.nn.Module) -> None:
    """Run `model`'s forward passes over more than one token inside `reusing_freed_memory`. Only for
    models whose layers all stay in memory: streamed layers are built on every pass, within a
    memory budget that counts on freed memory leaving at once."""
    windows: dict[int, object] = {}  # id of the call's thread -> its open block

    def enter(module, args, kwargs):
        tokens = args[0] if args else kwargs.get("tokens")
        if tokens is not None and tokens.dim() == 2 and tokens.shape[1] > 1:
            window = reusing_freed_memory()
            window.__enter__()
            windows[threading.get_ident()] = window

    def leave(module, args, kwargs, output):
        window = windows.pop(threading.get_ident(), None)
        if window is not None:
            window.__exit__(None, None, None)

    model.register_forward_pre_hook(enter, with_kwargs=True)
    model.register_forward_hook(leave, with_kwargs=True, always_call=True)


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


# ---- weights on transparent huge pages ------------------------------------------------------
#
# A decode step reads every weight once, front to back: hundreds of megabytes per token. With 4 KiB
# pages that is a TLB miss every 4 KiB, and the CPU's stream prefetchers stop at each page boundary;
# on 2 MiB pages they run on. Measured on AMD Zen 5 (2 threads, a Q4_0 product [16384 x 2048] over
# 8 copies, alternating in one process): 20.9 -> 28.7 and 24.3 -> 29.0 GB/s. Linux gives huge pages
# to anonymous memory only where asked (transparent_hugepage=madvise, the usual default), and only
# when the memory is first touched, so the weights are placed in fresh mappings advised before they
# are written. Only for the layers that stay in memory: streamed layers are built on every pass,
# where finding free 2 MiB pages can make the kernel compact memory first.

HUGE_PAGE = 2 << 20
HUGE_PAGES_FROM = HUGE_PAGE  # smaller tensors cannot hold one
_placing = threading.local()


@contextmanager
def weights_on_huge_pages():
    """Within this block, on this thread, `empty_for_weights` places large tensors on huge pages."""
    before = getattr(_placing, "huge", False)
    _placing.huge = True
    try:
        yield
    finally:
        _placing.huge = before


def _address(mapping: mmap.mmap) -> int:
    view = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(view)
    finally:
        del view  # the buffer export, or the mapping could never be closed


def empty_for_weights(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype), on transparent huge pages inside `weights_on_huge_pages` when the
    tensor is large and the system can: a mapping of its own (freed with the tensor), advised
    MADV_HUGEPAGE before anything touches it, the tensor starting on a 2 MiB boundary. The mapping
    ends where the tensor does, so its last partial 2 MiB stays on small pages (nothing is
    allocated beyond the tensor's bytes)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not getattr(_placing, "huge", False) or nbytes < HUGE_PAGES_FROM or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    try:  # private: a shared anonymous mapping is shared memory, whose huge pages are a separate setting
        mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:  # e.g. the process's limit on mappings (vm.max_map_count): torch's allocator, which
        return torch.empty(shape, dtype=dtype)  # reports a real lack of memory in its own words
    start = -_address(mapping) % HUGE_PAGE
    with suppress(OSError):  # no huge pages here: small ones serve the same
        mapping.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
    return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=start).view(dtype).view(shape)


__all__ = [
    "empty_for_weights",
    "forget",
    "give_freed_memory_back",
    "keep",
    "release",
    "reuse_freed_memory_in_prompts",
    "reusing_freed_memory",
    "reusing_now",
    "weights_on_huge_pages",
]
