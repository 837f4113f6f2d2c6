"""Checkpoint -> ready model: built without memory, then given its tensors one by one.

The model is first built on PyTorch's `meta` device, where parameters have shapes but no storage.
Each tensor is then read, converted to the target dtype and device, and assigned into the model in
place of the empty parameter (`load_state_dict(assign=True)`), so there is never a second,
randomly initialised copy of the weights, nor a float32 copy of a bfloat16 model.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .errors import PlainLlamaError
from .formats import Checkpoint
from .formats.checkpoint import expected_shapes
from .memory import release
from .model import FUSED, Transformer, fused_name
from .packed import (PackedEmbedding, PackedLinear, PackedWeight, StackedLinear, can_quantize, pack_gguf, quantize_int4,
                     quantize_int8)

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


def _packed_weight(checkpoint: Checkpoint, name: str, shape: tuple[int, int], weights: str) -> PackedWeight | None:
    """The [N, K] matrix `name` in a packed layout, or None to keep it as a float tensor."""
    if name in checkpoint.raw_tensors:  # GGUF: quantized blocks and 16-bit floats as stored
        raw = checkpoint.raw_tensors[name]()
        packed = pack_gguf(raw, checkpoint.tensor_types[name], shape)
        if packed is not None:
            release(raw, next(iter(packed.buffers())))
            return packed
    stored = checkpoint.tensors[name]()
    if weights in ("int8", "int4") and can_quantize(stored.shape):
        packed = (quantize_int8 if weights == "int8" else quantize_int4)(stored)
        release(stored, packed.qs)
        return packed
    half_layouts = {torch.float16: "f16", torch.bfloat16: "bf16"}
    if stored.dtype in half_layouts and stored.shape[1] % 32 == 0:
        return PackedWeight(half_layouts[stored.dtype], tuple(stored.shape), {"w": stored})
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


def build_model(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device, weights: str = "float") -> Transformer:
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights={weights!r}: expected one of {WEIGHT_MODES}")
    if weights != "float" and device.type != "cpu":
        raise PlainLlamaError(f"compressed weights ({weights}) run on the CPU only; on {device.type} they are converted to {str(dtype).removeprefix('torch.')}")
    with torch.device("meta"), skip_random_init():
        model = Transformer(checkpoint.args)
    shapes = expected_shapes(checkpoint.args)  # matrices are the 2-D ones: projections and embeddings
    groups: dict[str, list[str]] = {}  # model tensor -> the checkpoint tensors it is made of
    for name in checkpoint.tensors:
        groups.setdefault(fused_name(name), []).append(name)
    state = {}
    converted = {}  # source -> tensor, so tied weights become one shared tensor
    packed_by_source = {}  # the same for packed weights

    def as_float(name):
        source = checkpoint.tensors[name]
        if source not in converted:
            stored = source()
            converted[source] = stored.to(device=device, dtype=dtype)
            release(stored, converted[source])  # the stored bytes are not needed any more
        return converted[source]

    try:
        for target, names in groups.items():
            names = _row_order(target, names)
            if weights != "float" and len(shapes[names[0]]) == 2:
                packs = []
                for name in names:
                    source = checkpoint.tensors[name]
                    if source not in packed_by_source:
                        packed_by_source[source] = _packed_weight(checkpoint, name, shapes[name], weights)
                    packs.append(packed_by_source[source])
                if all(p is not None for p in packs):
                    model.set_submodule(target.removesuffix(".weight"), _packed_module(target, packs, dtype))
                    continue
                # a part that cannot be packed (float32, or an odd width): the whole group stays float
            parts = [as_float(name) for name in names]
            state[target] = parts[0] if len(parts) == 1 else torch.cat(parts)
            if len(parts) > 1:
                for name, part in zip(names, parts):
                    release(part, state[target])
                    converted.pop(checkpoint.tensors[name], None)
    except (torch.OutOfMemoryError, MemoryError):
        raise PlainLlamaError(
            f"{checkpoint.path}: not enough memory on {device} to hold the weights in {str(dtype).removeprefix('torch.')}"
        ) from None
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
