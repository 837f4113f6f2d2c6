"""Layers read from disk on every forward pass, for models larger than the memory they may use.

A streamed layer is a `StreamedBlock` in the model's list of layers; model.py calls it like any other
block. Behind it, a reader thread goes through the streamed layers in order, again and again:

    take a free buffer -> read the layer's stored bytes into it (large reads, in file order)
    -> tell the OS to drop those file pages from its cache -> build the layer from the bytes
    (quantized blocks stay quantized, 16-bit weights are used in place) -> hand it over

while the main thread computes the layer before. Two buffers, so memory stays bounded: one layer is
being computed while the next is read. Dropping the pages after each read (posix_fadvise DONTNEED)
keeps the page cache from filling with streamed weights and pushing out the resident part.

On a GPU the buffers are pinned host memory; the bytes are copied to a GPU buffer on a side stream,
and the layer is built there. Layers the planner holds in RAM skip the disk read.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import threading
import time
import weakref
from dataclasses import replace
from functools import partial

import torch
from torch import nn

from ..errors import PlainLlamaError
from .cpu.decode_block import kernel_block
from .memory import forget, give_freed_memory_back, keep
from .planner import STREAM_BUFFERS

ALIGN = 64  # each tensor starts at a multiple of this in a buffer: aligned for every dtype and the kernels
READ_CHUNK = 64 << 20  # bytes per read call


class LayerBytes:
    """One layer's tensors as read into a buffer, offered the way a Checkpoint offers its own
    (`tensors`, what WeightBuilder.fill reads): load() decodes the bytes, raw() gives them as they are."""

    def __init__(self, checkpoint, placed: dict[str, torch.Tensor]):
        self.tensors = {}
        for name, raw in placed.items():
            record = checkpoint.tensors[name]
            self.tensors[name] = replace(
                record,
                load=partial(record.stored.decode, raw),
                raw=partial(_same, raw) if record.raw is not None else None,
                stored=None,
            )


def _same(t):
    return t


class Slot:
    """A buffer for one layer's stored bytes (pinned on a GPU machine), and its GPU twin."""

    def __init__(self, nbytes: int, device: torch.device):
        on_gpu = device.type == "cuda"
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=on_gpu)
        self.kept = keep(self.host)  # reused on every pass: never handed back to the OS by memory.release
        self.device = torch.empty(nbytes, dtype=torch.uint8, device=device) if device.type != "cpu" else None


class StreamStats:
    """What the progress line shows."""

    def __init__(self):
        self.bytes_read = 0
        self.read_seconds = 0.0
        self.layers_done = 0
        self.tokens = 0  # tokens through the model, counted at the first streamed layer of each pass
        self.started = time.perf_counter()

    @property
    def disk_speed(self) -> float:
        return self.bytes_read / self.read_seconds if self.read_seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.tokens / elapsed if elapsed else 0.0


class LayerStreamer:
    def __init__(self, builder, plan):
        self.builder, self.plan = builder, plan
        give_freed_memory_back()  # before anything is built: the plan counts on freed memory leaving
        self.checkpoint = builder.checkpoint
        self.device = builder.device
        self.order = sorted(plan.streamed + plan.in_ram)
        self.groups = {i: builder.layer_groups(i) for i in self.order}  # model tensor -> checkpoint names, per layer
        self.placement = {i: self._place(i) for i in self.order}
        size = max(end for placed in self.placement.values() for _, _, end in placed.values())
        self.free: queue.Queue = queue.Queue()
        try:
            self.slots = [Slot(size, self.device) for _ in range(STREAM_BUFFERS)]
            for slot in self.slots:
                self.free.put(slot)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
            raise PlainLlamaError(
                f"cannot allocate the streaming buffers ({STREAM_BUFFERS} x {size / 1e9:.2f} GB): {e}"
            ) from None
        pinned = self.device.type == "cuda"  # page-locked, so the copies to the GPU run asynchronously
        self.in_ram = {
            i: self._read_into(i, torch.empty(size, dtype=torch.uint8, pin_memory=pinned)) for i in plan.in_ram
        }
        self.ready: queue.Queue = queue.Queue()
        self.stats = StreamStats()
        self.on_layer = None  # called after each streamed layer (the CLI's progress line)
        self._files: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        atexit.register(_close_ref, weakref.ref(self))

    def _place(self, i: int) -> dict[str, tuple[int, int, int]]:
        """name -> (file offset, start, end in the buffer); the parts of a stacked matrix one after
        another in row order, so that stacking them is a view (packed.joined), not a copy."""
        placed, at = {}, 0
        for names in self.groups[i].values():
            for name in names:
                where = self.checkpoint.tensors[name].stored
                placed[name] = (where.offset, at, at + where.nbytes)
                at = -(-(at + where.nbytes) // ALIGN) * ALIGN
        return placed

    def block(self, i: int) -> StreamedBlock:
        return StreamedBlock(self, i)

    # ---- the reader thread ------------------------------------------------------------------

    def _fd(self, path: str) -> int:
        if path not in self._files:
            fd = os.open(path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._files[path] = fd
        return self._files[path]

    def _read_into(self, i: int, buffer: torch.Tensor) -> torch.Tensor:
        """Read layer i's stored bytes into `buffer`, in file order."""
        placed = self.placement[i]
        names = sorted(placed, key=lambda n: (self.checkpoint.tensors[n].stored.path, placed[n][0]))
        view = memoryview(buffer.numpy())  # type: ignore[arg-type]  # numpy arrays are buffers; its stubs do not say so
        start = time.perf_counter()
        total = 0
        for name in names:
            _, at, end = placed[name]
            for path, offset, nbytes in self.checkpoint.tensors[name].stored.ranges:  # one, or a part per shard
                fd = self._fd(path)
                done = 0
                while done < nbytes:
                    n = min(READ_CHUNK, nbytes - done)
                    got = os.preadv(fd, [view[at + done : at + done + n]], offset + done)
                    if got <= 0:
                        raise PlainLlamaError(
                            f"{path}: ended while reading {name} (the file was truncated after loading)"
                        )
                    done += got
                at += done
                total += done
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        self.stats.bytes_read += total
        self.stats.read_seconds += time.perf_counter() - start
        return buffer

    def _build(self, i: int, raw: torch.Tensor) -> nn.Module:
        placed = {name: raw[begin:end] for name, (_, begin, end) in self.placement[i].items()}
        block = self.builder.new_block()
        self.builder.fill(block, self.groups[i], LayerBytes(self.checkpoint, placed), prefix=f"layers.{i}.")
        return kernel_block(block)  # the same arithmetic as a resident layer, so the same logits

    def _load(self, i: int, slot: Slot) -> nn.Module:
        host = self.in_ram[i] if i in self.in_ram else self._read_into(i, slot.host)
        if slot.device is None:
            return self._build(i, host)
        n = max(end for _, _, end in self.placement[i].values())
        if self._side is None:  # Apple's MPS: no side streams; the copy and the build run in order
            slot.device[:n].copy_(host[:n])
            return self._build(i, slot.device)
        with torch.cuda.stream(self._side):
            slot.device[:n].copy_(host[:n], non_blocking=True)
            block = self._build(i, slot.device)
        self._side.synchronize()  # the host buffer may be reused and the block used on the main stream
        return block

    def _run(self, first: int):
        position = self.order.index(first)
        while not self._stop.is_set():
            slot = self.free.get()
            if slot is None or self._stop.is_set():
                return
            i = self.order[position]
            position = (position + 1) % len(self.order)
            try:
                self.ready.put((i, slot, self._load(i, slot)))
            except BaseException as e:  # handed to the main thread, which raises it
                self.ready.put((i, slot, e))
                return

    # ---- the main thread --------------------------------------------------------------------

    def take(self, i: int) -> tuple[Slot, nn.Module]:
        """Layer i, built; blocks until the reader has it."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, args=(i,), name="plainllama-layer-reader", daemon=True)
            self._thread.start()
        while True:
            j, slot, block = self.ready.get()
            if isinstance(block, BaseException):
                self.free.put(slot)
                raise block
            if j == i:
                return slot, block
            self.free.put(slot)  # a layer of an interrupted pass: skip ahead to the one wanted

    def finished(self) -> None:
        """Wait until the GPU has run the layer's kernels. Call it before letting go of the layer or
        its buffer: what the reader built on its side stream goes back to that stream's memory pool
        when freed, and the next layer's copy may land there while the main stream still reads it."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def give_back(self, slot: Slot) -> None:
        self.free.put(slot)

    def close(self) -> None:
        self._stop.set()
        self.free.put(None)
        if self._thread is not None:
            self._thread.join(timeout=5)
        for fd in self._files.values():
            os.close(fd)
        self._files = {}
        for slot in self.slots:
            forget(slot.kept)


def _close_ref(ref):
    streamer = ref()
    if streamer is not None:
        streamer.close()


class StreamedBlock(nn.Module):
    """Stands in for TransformerBlock i: fetches the layer from the streamer, runs it, lets it go."""

    def __init__(self, streamer: LayerStreamer, index: int):
        super().__init__()
        self.index = index
        self._streamer = [streamer]  # in a list: not a submodule, so .to()/.eval() do not walk into it

    def forward(self, x, cos, sin, mask, cache, start_pos):
        with self.built(x.shape[0] * x.shape[1]) as block:
            return block(x, cos, sin, mask, cache, start_pos)

    @contextlib.contextmanager
    def built(self, tokens: int):
        """The layer, read and built, for one pass of `tokens` tokens; let go of at the end."""
        streamer = self._streamer[0]
        if self.index == streamer.order[0]:
            streamer.stats.tokens += tokens
        slot, block = streamer.take(self.index)
        try:
            yield block
        finally:
            streamer.finished()
            del block
            streamer.give_back(slot)
            streamer.stats.layers_done += 1
            if streamer.on_layer is not None:
                streamer.on_layer(streamer, self.index)

    def on_cpu(self) -> bool:
        return self._streamer[0].device.type == "cpu"

    def extra_repr(self) -> str:
        return f"layer {self.index}, read from disk on each pass"
