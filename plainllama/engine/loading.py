"""Checkpoint -> ready model: built without memory, then given its tensors one by one.

The model is first built on PyTorch's `meta` device, where parameters have shapes but no storage.
Each tensor is then read, converted to the target dtype and device, and assigned into the model in
place of the empty parameter (`load_state_dict(assign=True)`), so there is never a second,
randomly initialised copy of the weights, nor a float32 copy of a bfloat16 model.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import PlainLlamaError
from ..formats import Checkpoint
from ..formats.checkpoint import CheckpointTensor, expected_shapes
from .memory import give_freed_memory_back, release, reuse_freed_memory_in_prompts, weights_on_huge_pages
from .cpu.decode_block import cache_dtype, kernel_block
from ..model import FUSED, Transformer, TransformerBlock, fused_name
from .cpu.packed import (
    Holding,
    PackedEmbedding,
    PackedLinear,
    PackedWeight,
    StackedLinear,
    adjacent,
    holding,
    joined,
    pack_gguf,
    quantize_int4,
    quantize_int8,
)
from .cpu import kernels
from .planner import MemoryPlan, parse_size, plan_memory
from ..formats.gguf_quants import dequantize
from .streaming import LayerStreamer

# How the weight matrices are held (see packed.py):
#   "float"   every tensor converted to the model's dtype (the exact reference path; GPUs)
#   "packed"  matrices stay as stored: quantized blocks stay quantized, 16-bit floats stay 16-bit
#   "int8", "int4"  as "packed", and float matrices are quantized to 8 or 4 bits
WEIGHT_MODES = ("float", "packed", "int8", "int4")


@contextmanager
def skip_random_init():
    """Modules fill their weights with random numbers when built; these are about to be replaced,
    and on the meta device the first `normal_` alone costs ~1 s (it loads torch's symbolic-shape
    machinery). The init functions do nothing while this is active."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_")
    saved = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


SMALL_TENSOR_BYTES = 1 << 20


def _read_small(record: CheckpointTensor) -> torch.Tensor | None:
    """A small tensor (a norm's weights) read from its file into memory of its own, or None to use
    the checkpoint's view of the file mapping. The page cache holds a file in folios of up to 2 MiB,
    and touching one byte through a mapping maps its whole folio into the process, where it counts
    as the process's memory: the 33 norms of a 16-layer Q4_0 model used in place from the mapping
    took 40 MiB there, for 130 KB of weights."""
    where = record.stored
    if where is None or where.nbytes > SMALL_TENSOR_BYTES:
        return None
    raw = torch.empty(where.nbytes, dtype=torch.uint8)
    at = 0
    for path, offset, nbytes in where.ranges:
        with open(path, "rb", buffering=0) as f:
            got = os.preadv(f.fileno(), [raw[at : at + nbytes].numpy()], offset)  # type: ignore[list-item]  # numpy arrays are buffers
        if got != nbytes:
            raise PlainLlamaError(f"{path}: ended while reading a tensor (the file was truncated after it was opened)")
        at += nbytes
    return where.decode(raw)


def _packed_weight(record: CheckpointTensor, held: Holding, shape: tuple[int, int]) -> PackedWeight | None:
    """The [N, K] matrix in the packed layout `held` says, or None where it stays a float tensor."""
    if held.how == "gguf":  # GGUF: quantized blocks and 16-bit floats as stored
        assert record.raw is not None  # holding() says "gguf" only for records with raw bytes
        raw = record.raw()
        packed = pack_gguf(raw, record.type, shape)
        release(raw, next(iter(packed.buffers())))
        return packed
    if held.how == "quantize":
        # a float GGUF tensor: its file bytes, quantized a slice at a time
        stored = dequantize(record.raw(), record.type, shape) if record.raw is not None else record.load()
        packed = (quantize_int8 if held.layout == "q8" else quantize_int4)(stored)
        release(stored, packed.qs)  # the source pages: not needed any more
        return packed
    if held.how == "half":
        assert held.layout is not None
        return PackedWeight(held.layout, shape, {"w": record.load()})
    return None


def _row_order(target: str, names: list[str]) -> list[str]:
    """The checkpoint names stacked into `target`, in the order of their rows."""
    for stacked, parts in FUSED.items():
        if target.endswith("." + stacked):
            prefix = target[: -len(stacked)]
            return [prefix + part for part in parts]
    return names


def _packed_module(target: str, packs: list[PackedWeight], dtype: torch.dtype) -> nn.Module:
    if target == "tok_embeddings.weight":
        return PackedEmbedding(packs[0], dtype)
    if len(packs) == 1:
        return PackedLinear(packs[0])
    if len({(p.layout, p.part_names) for p in packs}) == 1:
        stacked = PackedWeight.stack(packs)
        for part in packs:  # parts that were views of the file: their pages are not needed any more
            for name in part.part_names:
                release(getattr(part, name), getattr(stacked, name))
        return PackedLinear(stacked)
    return StackedLinear([PackedLinear(p) for p in packs])  # e.g. Q4_K queries beside Q6_K values


class WeightBuilder:
    """Builds the model's tensors from a checkpoint's, one group at a time: all at once for a
    resident model, or one layer per forward pass for a layer streamed from disk (streaming.py),
    whose bytes then come from a read buffer instead of the checkpoint's mapped files."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device, weights: str):
        if weights not in WEIGHT_MODES:
            raise ValueError(f"weights={weights!r}: expected one of {WEIGHT_MODES}")
        if weights != "float" and device.type != "cpu":
            raise PlainLlamaError(
                f"compressed weights ({weights}) run on the CPU only; on {device.type} they are converted to "
                f"{str(dtype).removeprefix('torch.')}"
            )
        self.checkpoint, self.args = checkpoint, checkpoint.args
        self.dtype, self.device, self.weights = dtype, device, weights
        self.shapes = expected_shapes(checkpoint.args)  # matrices are the 2-D ones: projections and embeddings
        grouped: dict[str, list[str]] = {}  # model tensor -> the checkpoint tensors it is made of
        for name in checkpoint.tensors:
            grouped.setdefault(fused_name(name), []).append(name)
        self.groups = {target: _row_order(target, names) for target, names in grouped.items()}

    def layer_groups(self, i: int) -> dict[str, list[str]]:
        prefix = f"layers.{i}."
        return {t: names for t, names in self.groups.items() if t.startswith(prefix)}

    def holding(self, record: CheckpointTensor, name: str) -> Holding:
        return holding(record.type, self.shapes[name], self.weights, self.dtype, record.raw is not None)

    def held_nbytes(self, names: list[str]) -> tuple[int, bool]:
        """(bytes these checkpoint tensors take once built, whether all of them are their stored bytes)."""
        held = [self.holding(self.checkpoint.tensors[n], n) for n in names]
        return sum(h.nbytes for h in held), all(h.as_stored for h in held)

    def packs_as_one_matrix(self, names: list[str], sources=None) -> bool:
        """Whether the parts of a stacked matrix (q, k, v) are packed as one matrix straight from
        their GGUF blocks: two or more parts of one type, each held "gguf". (When streamed, their
        blocks then lie one after another in the read buffer: _pack_stacked_raw.)"""
        records = [(sources or self.checkpoint).tensors[n] for n in names]
        return (
            len(names) > 1
            and len({r.type for r in records}) == 1
            and all(self.holding(r, n).how == "gguf" for r, n in zip(records, names, strict=True))
        )

    def fill(
        self, module: nn.Module, groups: dict[str, list[str]], sources, prefix: str = "", shared: dict | None = None
    ) -> None:
        """Build the model tensors `groups` from `sources` (anything with a checkpoint's `tensors`
        records) and put them into `module`, whose names are relative to
        `prefix`. `shared` remembers built sources, so tied weights become one tensor."""
        shared = {} if shared is None else shared
        state = {}

        def as_float(name):
            record = sources.tensors[name]
            if record.load not in shared:
                small = _read_small(record)
                stored = record.load() if small is None else small
                shared[record.load] = stored.to(device=self.device, dtype=self.dtype)
                release(stored, shared[record.load])  # the stored bytes are not needed any more
            return shared[record.load]

        def packed(name):
            record = sources.tensors[name]
            key = ("packed", record.load)
            if key not in shared:
                shared[key] = _packed_weight(record, self.holding(record, name), self.shapes[name])
            return shared[key]

        try:
            for target, names in groups.items():
                local = target[len(prefix) :]
                if self.weights != "float" and len(self.shapes[names[0]]) == 2:
                    whole = self._pack_stacked_raw(sources, names)
                    if whole is not None:
                        module.set_submodule(local.removesuffix(".weight"), PackedLinear(whole))
                        continue
                    packs = [packed(name) for name in names]
                    if all(p is not None for p in packs):
                        module.set_submodule(local.removesuffix(".weight"), _packed_module(target, packs, self.dtype))
                        continue
                    # a part that cannot be packed (float32, or an odd width): the whole group stays float
                parts = [as_float(name) for name in names]
                state[local] = parts[0] if len(parts) == 1 else joined(parts)
                if len(parts) > 1:
                    for name, part in zip(names, parts, strict=True):
                        release(part, state[local])
                        shared.pop(sources.tensors[name].load, None)
        except (torch.OutOfMemoryError, MemoryError):
            raise PlainLlamaError(
                f"{self.checkpoint.path}: not enough memory on {self.device} to hold the weights in "
                f"{str(self.dtype).removeprefix('torch.')}"
            ) from None
        module.load_state_dict(state, strict=False, assign=True)

    def _pack_stacked_raw(self, sources, names: list[str]) -> PackedWeight | None:
        """A stacked matrix whose parts' GGUF blocks lie one after another (a layer read for
        streaming) and share a type is one matrix of blocks: packed at once, without packing the
        parts and then copying them together."""
        if not self.packs_as_one_matrix(names, sources):
            return None
        raws = [sources.tensors[n].raw() for n in names]
        if not adjacent(raws):
            return None
        shape = (sum(self.shapes[n][0] for n in names), self.shapes[names[0]][1])
        return pack_gguf(joined(raws), sources.tensors[names[0]].type, shape)

    def new_block(self) -> TransformerBlock:
        """An empty layer (shapes, no storage), to be filled."""
        with torch.device("meta"), skip_random_init():
            return TransformerBlock(self.args)


def weight_mode(device: torch.device, dtype: str, quantize: str | None, dequantize: bool) -> str:
    """How the weights are held (WEIGHT_MODES), from the user's switches. An explicit dtype
    ("float32", ...) without --quantize means every weight in that dtype, as it always did."""
    if quantize not in (None, "int8", "int4"):
        raise PlainLlamaError(f"--quantize {quantize}: expected int8 or int4")
    if quantize and dequantize:
        raise PlainLlamaError("--quantize and --dequantize contradict each other; choose one")
    if device.type != "cpu":
        if quantize:
            raise PlainLlamaError(
                f"--quantize runs on the CPU only; on {device.type} the weights are converted to its dtype"
            )
        return "float"
    if quantize:
        return quantize
    if dequantize or dtype != "auto":
        return "float"
    # Compressed weights: the C kernels multiply them where they run, PyTorch's weight-only
    # operators elsewhere (torch_products.py), both faster than float32 and a fraction of its memory.
    return "packed"


def load_planned(
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    device: torch.device,
    weights: str,
    max_memory: int | str | None = None,
    max_gpu_memory: int | str | None = None,
    context: int | None = None,
    report=None,
    prefix_cache: int | str = 0,
) -> tuple[Transformer, MemoryPlan]:
    """The model built within a memory plan (planner.py: what stays in memory, what streams from
    disk), and the plan. `report(text)` receives the plan when anything streams or a cap was given."""
    builder = WeightBuilder(checkpoint, dtype, device, weights)
    if weights in ("int8", "int4") and not any(
        builder.holding(record, name).how == "quantize" for name, record in checkpoint.tensors.items()
    ):
        types = ", ".join(sorted({record.type for record in checkpoint.tensors.values()}))
        raise PlainLlamaError(
            f"--quantize {weights}: {checkpoint.path} holds no float matrices to quantize (its tensors are {types}); "
            "its quantized weights are used as stored without --quantize"
        )
    plan = plan_memory(
        builder,
        parse_size(max_memory) if isinstance(max_memory, str) else max_memory,
        parse_size(max_gpu_memory) if isinstance(max_gpu_memory, str) else max_gpu_memory,
        context,
        prefix_cache,
    )
    if report is not None and (plan.explicit or plan.streamed or plan.in_ram):
        report(plan.summary())
    model = build_model(checkpoint, dtype, device, weights, plan)
    # The model now holds every weight: the loader's handles go, releasing the source files' memory
    # maps (and any converted copies) instead of keeping them alive beside the model. (Streamed
    # layers need only the records' byte ranges, which stay.)
    checkpoint.release_tensors()
    return model, plan


def build_model(
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    device: torch.device,
    weights: str = "float",
    plan: MemoryPlan | None = None,
) -> Transformer:
    """The model with every weight in place; with a `plan`, its streamed layers read from disk on each pass."""
    builder = WeightBuilder(checkpoint, dtype, device, weights)
    with torch.device("meta"), skip_random_init():
        model = Transformer(checkpoint.args)
    streamed = plan.streamed if plan is not None else []
    if streamed:
        streamer = LayerStreamer(builder, plan)
    torch_forms = device.type == "cpu" and weights != "float" and not kernels.available()
    if torch_forms:
        give_freed_memory_back()  # the stored parts, let go as each matrix is converted, leave the process
    shared: dict = {}
    with weights_on_huge_pages():  # the layers that stay in memory (memory.py says why)
        builder.fill(
            model, {t: n for t, n in builder.groups.items() if not t.startswith("layers.")}, checkpoint, shared=shared
        )
    if torch_forms:
        _torch_products(model)  # the output projection (a tied table keeps its rows for the lookups)
    for i in range(checkpoint.args.n_layers):
        if i in streamed:
            model.layers[i] = streamer.block(i)
        else:
            block = builder.new_block()
            with weights_on_huge_pages():
                builder.fill(block, builder.layer_groups(i), checkpoint, prefix=f"layers.{i}.")
            if torch_forms:
                _torch_products(block)
            model.layers[i] = kernel_block(block)  # decode steps in one C call where the weights allow
    empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise PlainLlamaError(f"{checkpoint.path}: no weights for {', '.join(empty[:4])}")
    if device.type == "cpu" and not streamed:
        reuse_freed_memory_in_prompts(model)  # memory.py says why
    model.kv_dtype = cache_dtype(device, dtype, weights)
    return model.eval()


def _torch_products(module: nn.Module) -> None:
    """Where the C kernels do not run, the compressed matrices of `module` take PyTorch's weight-only
    forms (torch_products.py) as soon as they are built, one layer at a time, not at the first token
    (streamed layers build theirs on each pass)."""
    for linear in module.modules():
        if isinstance(linear, PackedLinear):
            linear.packed.torch_product()
