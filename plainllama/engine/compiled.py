"""torch.compile for decode steps that run on PyTorch's own operators: `load(..., compile=True)`,
`--compile` on the command line.

Which steps: one new token per row with a KV cache (decoding, beams, batches). Prompts stay eager: a
prompt is a few large products, where compiling has nothing to remove. Layers whose decode steps
already run in compiled C (decode_block.py: packed weights on the CPU) are unaffected; what is left
is float weights (`--dtype float32`, `--dequantize`, a CPU without the kernels) and GPUs.

Off unless asked for, because it pays only in long sessions: on this project's 2-core CPU machines,
the default model as float32 decodes 1.14-1.23x faster compiled (30.9 vs 27.0, 40.4 vs 32.9 tok/s,
benchmarks/compile_decode.py), but the first compiled step takes 32-35 s in a fresh process, and
still ~5 s when the compiled code comes from the cache: it breaks even after ~1000 tokens. (On GPUs,
where per-step launch overhead is what compiling removes, it should pay sooner; not measured here.)
Inductor's compiled code is kept under ~/.cache/plainllama/inductor (TORCHINDUCTOR_CACHE_DIR, unless
already set), so later runs reuse it instead of compiling again.
"""

from __future__ import annotations

import os
import sys

import torch

from .cpu import kernels
from ..model import Transformer


class CompiledForward:
    """A model's forward whose one-token steps run compiled. `steps` counts the steps that did;
    `failed` is set (and said once) when compiling failed and the model carries on eagerly."""

    def __init__(self, model: Transformer):
        self.model, self.eager = model, model.forward
        self.compiled = torch.compile(self.eager)
        self.steps, self.failed = 0, False

    def __call__(self, tokens, start_pos=0, cache=None, last_only=False, pad=None):
        # tracing.py's hooks must see eager modules
        hooked = any(layer._forward_hooks or layer.attention._forward_hooks for layer in self.model.layers)
        if tokens.shape[1] != 1 or cache is None or hooked or self.failed:
            return self.eager(tokens, start_pos, cache, last_only, pad)
        try:
            out = self.compiled(tokens, start_pos, cache, last_only, pad)
        except Exception as error:  # inductor raises many kinds (compiler missing, unsupported op)
            self.failed = True
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            print(f"plainllama: torch.compile failed ({first_line[:200]}); running without it", file=sys.stderr)
            return self.eager(tokens, start_pos, cache, last_only, pad)
        self.steps += 1
        return out


def compile_decode(model: Transformer) -> Transformer:
    """Route `model`'s one-token steps through torch.compile; returns the model."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(kernels.cache_dir() / "inductor"))
    model.forward = CompiledForward(model)  # type: ignore[method-assign]  # this model's forward, on this instance only
    return model
