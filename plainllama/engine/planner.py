"""The memory planner: before anything is built, what the model needs, what the machine has, and so
which layers stay in memory and which are read from disk on every forward pass (streaming.py).

    needs = runtime (Python, PyTorch: the process as it is now)
          + fixed weights (embeddings, final norm, output projection: always in memory)
          + KV cache for `context` tokens (all rows of a batch together) + activations of one pass
          + two streaming buffers (the layer in use and the next one being read), if anything streams
          + as many layers as fit; the rest stream.

On a GPU the same sums run twice: VRAM decides which layers live on the GPU; of the others, RAM
decides which are held in pinned RAM and which are read from disk, then copied over on each pass.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

import torch

from ..errors import PlainLlamaError
from .cpu.decode_block import cache_dtype

GiB = 1 << 30
DEFAULT_CONTEXT = 2048  # tokens of KV cache reserved when the caller does not say (Ollama's long-standing default)
STREAM_BUFFERS = 2  # the layer being computed and the next one being read


def parse_size(text: str) -> int:
    """ "4G", "512M", "1.5GiB", "2000000000" -> bytes (K, M, G, T are powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise PlainLlamaError(f"memory size {text!r}: expected a number with an optional K, M, G or T (e.g. 4G, 512M)")
    if len(m.group(1)) > 30:  # beyond any memory there is; float() would make it infinite
        raise PlainLlamaError(
            f"memory size {text[:40]!r}...: a number of {len(m.group(1))} digits is not a memory size"
        )
    if not m.group(2) and float(m.group(1)) < 1024:
        raise PlainLlamaError(
            f"memory size {text!r}: give a unit (K, M, G or T, e.g. {m.group(1)}G); a bare number is bytes"
        )
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def gb(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / (1 << 20):.0f} MiB"


def _kib_field(path: str, key: str) -> int | None:
    """A "Key:  N kB" line of a /proc file, in bytes; None where there is no such file (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def process_rss() -> int:
    """This process's resident memory now (Linux /proc; elsewhere the peak, from getrusage)."""
    rss = _kib_field("/proc/self/status", "VmRSS")
    if rss is not None:
        return rss
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024


def available_ram() -> int:
    """Memory the machine can give without swapping: MemAvailable on Linux (free memory plus page
    cache that can be dropped), else the physical memory."""
    available = _kib_field("/proc/meminfo", "MemAvailable")
    return available if available is not None else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class LayerSize:
    held: int  # bytes once built, when resident
    stored: int  # bytes in the file: what streaming reads on every pass
    converted: (
        int  # bytes built beside the read buffer when streamed (0 where the model uses the stored bytes as they are)
    )


@dataclass
class MemoryPlan:
    device: str
    budget: int  # RAM the process may use in all (--max-memory, or what the machine has)
    runtime: int  # the process before the weights: Python, PyTorch, tokenizer
    fixed: int  # embeddings, final norm, output projection
    kv_cache: int
    activations: int
    context: int  # tokens of KV cache reserved (all rows of a batch together)
    layers: list[LayerSize]
    resident: list[int]  # layers held on the device
    streamed: list[int]  # layers read from disk on every forward pass
    in_ram: list[int] = field(default_factory=list)  # GPU only: stored bytes held in pinned RAM, copied per pass
    buffers: int = 0  # the streaming buffers (in RAM; pinned on a GPU machine)
    gpu_budget: int = 0
    gpu_buffers: int = 0  # the GPU's streaming buffers: a layer's stored bytes and the layer built from them
    disk_speed: float | None = None  # bytes/s, measured on the file with its pages dropped from the cache
    explicit: bool = False  # the caller set a memory cap: requests are held to the reserved context
    prefix_cache: int = 0  # a server's or chat's prefix cache (server/prefix_cache.py): kept prompts' keys and values

    @property
    def stream_bytes(self) -> int:
        """Bytes read from disk per forward pass."""
        return sum(self.layers[i].stored for i in self.streamed)

    def expected_seconds_per_pass(self) -> float | None:
        return self.stream_bytes / self.disk_speed if self.disk_speed and self.streamed else None

    def summary(self) -> str:
        n = len(self.layers)
        uses = (
            f"fixed weights {gb(self.fixed)} + KV cache {gb(self.kv_cache)} ({self.context} tokens) + activations "
            f"{gb(self.activations)}"
            + (f" + prefix cache {gb(self.prefix_cache)}" if self.prefix_cache else "")
            + f" + {len(self.resident)} layers {gb(sum(self.layers[i].held for i in self.resident))}"
        )
        if self.gpu_budget:
            lines = [
                f"memory plan ({self.device}): GPU budget {gb(self.gpu_budget)} = {uses}"
                + (f" + streaming buffers {gb(self.gpu_buffers)}" if self.gpu_buffers else ""),
                f"  RAM budget {gb(self.budget)} = runtime {gb(self.runtime)}"
                + (f" + pinned read buffers {gb(self.buffers)}" if self.buffers else ""),
            ]
        else:
            lines = [
                f"memory plan ({self.device}): budget {gb(self.budget)} = runtime {gb(self.runtime)} + {uses}"
                + (f" + streaming buffers {gb(self.buffers)}" if self.buffers else "")
            ]
        if self.in_ram:
            lines.append(
                f"  {len(self.in_ram)} layers held in pinned RAM "
                f"({gb(sum(self.layers[i].stored for i in self.in_ram))}), copied to the GPU on each pass"
            )
        if self.streamed:
            speed = f"disk reads {self.disk_speed / 1e9:.2f} GB/s" if self.disk_speed else "disk speed not measured"
            seconds = self.expected_seconds_per_pass()
            expect = f", so about {1 / seconds:.2f} tokens/s decoding one sequence" if seconds else ""
            lines.append(
                f"  {len(self.streamed)} of {n} layers streamed from disk: {self.stream_bytes / 1e9:.2f} GB per "
                f"forward pass; {speed}{expect}"
            )
        else:
            lines.append(f"  all {n} layers in memory")
        return "\n".join(lines)

    def check_request(self, rows: int, length: int) -> None:
        """A generation of `rows` sequences of up to `length` tokens must fit the reserved KV cache."""
        if (self.explicit or self.streamed or self.in_ram) and rows * length > self.context:
            raise PlainLlamaError(
                f"this request needs a KV cache for {rows} x {length} = {rows * length} tokens, "
                f"but the memory plan reserved {self.context}; load with a larger --context (and enough --max-memory)"
            )


def activation_bytes(args, tokens: int) -> int:
    """The largest temporaries of one forward pass over `tokens` tokens (float32): the residual
    stream and a normalized copy, q/k/v, and the feed-forward's gate, up and their product. PyTorch's
    CPU attention works in blocks and never holds all scores (measured: 49 MB at 2048 tokens, 32 heads).
    Packed weights add a reused buffer: the prompt's rows as bfloat16 tiles for amx_matmul (2 bytes
    per token and input feature, the widest input being the feed-forward's) or an 8 MB unpacked slice."""
    per_token = 4 * args.dim + 2 * (args.n_heads + 2 * args.n_kv_heads) * args.head_dim + 3 * args.hidden_dim
    tiles = tokens * max(args.dim, args.hidden_dim) * 2
    return (
        tokens * per_token * 4 + tiles + args.vocab_size * 4 * 8 + (8 << 20)
    )  # + a few rows of logits, the unpack slice


def kv_bytes(args, tokens: int, dtype: torch.dtype) -> int:
    return 2 * args.n_layers * tokens * args.n_kv_heads * args.head_dim * dtype.itemsize


def layer_sizes(builder) -> list[LayerSize]:
    records = builder.checkpoint.tensors
    sizes = []
    for i in range(builder.args.n_layers):
        held = read = converted = 0
        for names in builder.layer_groups(i).values():
            nbytes, as_stored = builder.held_nbytes(names)
            held += nbytes
            if all(records[n].stored is not None for n in names):
                read += sum(-(-records[n].stored.nbytes // 64) * 64 for n in names)
            if not as_stored:
                # built beside the read bytes; a stacked group's parts are built first, then joined,
                # except GGUF blocks of one type, packed as one matrix (WeightBuilder._pack_stacked_raw)
                converted += nbytes * (2 if len(names) > 1 and not builder.packs_as_one_matrix(names) else 1)
        sizes.append(LayerSize(held, read, converted))
    return sizes


def fixed_bytes(builder) -> int:
    """The weights outside the layers. An embedding used as stored costs only the rows looked up."""
    total, seen = 0, set()
    for target, names in builder.groups.items():
        if target.startswith("layers."):
            continue
        source = builder.checkpoint.tensors[names[0]].load
        if source in seen:
            continue  # tied: the output projection is the embedding
        seen.add(source)
        nbytes, as_stored = builder.held_nbytes(names)
        tied = builder.args.tie_embeddings
        total += 0 if target == "tok_embeddings.weight" and as_stored and not tied else nbytes
    return total


def measure_disk_speed(stored: list, limit: int = 256 << 20) -> float | None:
    """Bytes/s reading these file ranges with their pages first dropped from the page cache, in the
    streamer's own way (large reads). None where the OS cannot drop pages (not Linux)."""
    if not hasattr(os, "posix_fadvise") or not stored:
        return None
    buffer = bytearray(min(64 << 20, limit))
    total, seconds = 0, 0.0
    for path, offset, nbytes in (r for where in stored for r in where.ranges):
        fd = os.open(path, os.O_RDONLY)
        try:
            length = min(nbytes, limit - total)
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
            start, done = time.perf_counter(), 0
            while done < length:
                view = memoryview(buffer)[: min(len(buffer), length - done)]
                got = os.preadv(fd, [view], offset + done)
                if got <= 0:
                    break
                done += got
            seconds += time.perf_counter() - start
            total += done
        finally:
            os.close(fd)
        if total >= limit:
            break
    return total / seconds if seconds > 0 and total >= 4 << 20 else None


def plan_memory(
    builder,
    max_memory: int | None = None,
    max_gpu_memory: int | None = None,
    context: int | None = None,
    prefix_cache: int | str = 0,
) -> MemoryPlan:
    """Which layers stay resident and which stream, from the model's sizes and the memory there is.
    `prefix_cache`: bytes a prefix cache may hold beside the KV cache (`plainllama serve`), or
    "context": one context's KV cache (a chat's, whose history never exceeds the context)."""
    args, checkpoint, device = builder.args, builder.checkpoint, builder.device
    context = min(DEFAULT_CONTEXT, args.context_length) if context is None else context
    if context < 1:
        raise PlainLlamaError(f"--context must be >= 1, got {context}")
    layers = layer_sizes(builder)
    runtime = process_rss()
    # What the machine can give, leaving the OS a margin; --max-memory caps it but cannot raise it:
    # a cap above the machine's memory would plan layers into memory the OS kills the process for.
    free = available_ram()
    machine = runtime + free - min(GiB, free // 10)
    budget = machine if max_memory is None else min(max_memory, machine)
    kv = kv_bytes(args, context, cache_dtype(device, builder.dtype, builder.weights))
    prefix = kv if prefix_cache == "context" else int(prefix_cache)
    if prefix < 0:
        raise PlainLlamaError(f"the prefix cache's size must be >= 0, got {prefix}")
    activations = activation_bytes(args, context)
    fixed = fixed_bytes(builder)
    on_gpu = device.type != "cpu"
    can_stream = all(
        checkpoint.tensors[n].stored is not None
        for names in builder.groups.values()
        for n in names
        if n.startswith("layers.")
    )
    biggest_stream = max(layer.stored + (0 if on_gpu else layer.converted) for layer in layers)

    plan = MemoryPlan(
        str(device),
        budget,
        runtime,
        fixed,
        kv,
        activations,
        context,
        layers,
        [],
        [],
        explicit=max_memory is not None or max_gpu_memory is not None,
        prefix_cache=prefix,
    )
    # The prefix cache lives where the KV caches do; from here on it is counted as part of them.
    kv += prefix
    n = args.n_layers
    if on_gpu:
        if max_gpu_memory is not None:
            gpu_budget = max_gpu_memory
        elif device.type == "cuda":
            gpu_budget = int(torch.cuda.mem_get_info(device)[0] * 0.95)
        else:  # MPS shares the machine's RAM: the RAM budget decides
            gpu_budget = budget - runtime
        plan.gpu_budget = gpu_budget
        gpu_room = gpu_budget - fixed - kv - activations
        held = [layer.held for layer in layers]
        count = _fit(held, gpu_room)
        if count < n:  # stream: two layer buffers on the GPU come first
            gpu_buffers = STREAM_BUFFERS * max(layer.held + layer.stored for layer in layers)
            if gpu_room - gpu_buffers < 0:
                raise PlainLlamaError(
                    f"not enough GPU memory for even one streamed layer: {gb(gpu_budget)} available, but the fixed "
                    f"weights take {gb(fixed)}, "
                    f"the KV cache {gb(kv)}, activations {gb(activations)} and two layer buffers {gb(gpu_buffers)}"
                )
            count = _fit(held, gpu_room - gpu_buffers)
            plan.gpu_buffers = gpu_buffers
        plan.resident = list(range(count))
        rest = list(range(count, n))
        if rest:
            if not can_stream:
                raise _cannot_stream(checkpoint)
            ram_room = budget - runtime - STREAM_BUFFERS * biggest_stream
            plan.buffers = STREAM_BUFFERS * biggest_stream
            in_ram = _fit([layers[i].stored for i in rest], ram_room)
            plan.in_ram, plan.streamed = rest[:in_ram], rest[in_ram:]
    else:
        room = budget - runtime - fixed - kv - activations
        count = _fit([layer.held for layer in layers], room)
        if count < n:
            if not can_stream:
                raise _cannot_stream(
                    checkpoint, budget, runtime + fixed + kv + activations + sum(layer.held for layer in layers)
                )
            buffers = STREAM_BUFFERS * biggest_stream
            if room - buffers < 0:
                raise PlainLlamaError(
                    f"not enough memory for even one streamed layer: the budget is {gb(budget)}, but the runtime "
                    f"takes {gb(runtime)}, "
                    f"the fixed weights {gb(fixed)}, the KV cache {gb(kv - prefix)} ({context} tokens)"
                    + (f", the prefix cache {gb(prefix)}" if prefix else "")
                    + ", activations "
                    f"{gb(activations)} and two layer "
                    f"buffers {gb(buffers)} ({gb(biggest_stream)} each): at least "
                    f"{gb(runtime + fixed + kv + activations + buffers)} is needed"
                )
            count = _fit([layer.held for layer in layers], room - buffers)
            plan.buffers = buffers
        plan.resident, plan.streamed = list(range(count)), list(range(count, n))
    if plan.streamed:
        plan.disk_speed = measure_disk_speed(
            [
                checkpoint.tensors[name].stored
                for i in plan.streamed
                for names in builder.layer_groups(i).values()
                for name in names
            ]
        )
    return plan


def _fit(sizes: list[int], room: int) -> int:
    """How many of the first layers fit in `room` bytes."""
    count = 0
    for size in sizes:
        if size > room:
            break
        room -= size
        count += 1
    return count


def _cannot_stream(checkpoint, budget: int | None = None, needed: int | None = None) -> PlainLlamaError:
    sizes = f" (it needs about {gb(needed)}, the budget is {gb(budget)})" if needed and budget is not None else ""
    return PlainLlamaError(
        f"{checkpoint.path}: the model does not fit in memory{sizes}, and layers can only be streamed from disk out "
        "of GGUF files, safetensors files with float32/float16/bfloat16 tensors and Meta checkpoints whose tensors "
        "each lie in one record of their .pth files; "
        "convert it with `plainllama convert --to hf`"
    )
