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
from .memory import release
from .model import Transformer


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


def build_model(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device) -> Transformer:
    with torch.device("meta"), skip_random_init():
        model = Transformer(checkpoint.args)
    state = {}
    converted = {}  # source -> tensor, so tied weights become one shared tensor
    try:
        for name, source in checkpoint.tensors.items():
            if source not in converted:
                stored = source()
                converted[source] = stored.to(device=device, dtype=dtype)
                release(stored, converted[source])  # the stored bytes are not needed any more
            state[name] = converted[source]
    except (torch.OutOfMemoryError, MemoryError):
        raise PlainLlamaError(
            f"{checkpoint.path}: not enough memory on {device} to hold the weights in {str(dtype).removeprefix('torch.')}"
        ) from None
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
