"""Which device and dtype to run on when the user says "auto"."""

from __future__ import annotations

import torch

from ..errors import PlainLlamaError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PlainLlamaError("--device cuda: no CUDA GPU is available to this PyTorch")
    if name == "mps" and not torch.backends.mps.is_available():
        raise PlainLlamaError("--device mps: Apple's Metal backend is not available here")
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise PlainLlamaError(f"--device {name}: expected auto, cpu, cuda or mps")
    try:
        return torch.device(name)
    except RuntimeError:
        raise PlainLlamaError(f"--device {name}: expected auto, cpu, cuda, cuda:N or mps") from None


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # On a CPU, float32 matrix products are the fastest stock kernels and exact; GPUs run half
        # precision at several times the speed and memory bandwidth per weight.
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if name not in DTYPES:
        raise PlainLlamaError(f"--dtype {name}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]
