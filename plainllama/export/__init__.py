"""Writing models out: `plainllama convert` (a Hugging Face folder or a Meta folder) from any input.

The folder is written under a temporary name beside the destination and renamed into place once
every file is complete, so a failure part-way (a full disk, Ctrl+C) never leaves a folder that
looks like a model but is missing tensors."""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

from ..errors import PlainLlamaError
from ..formats.checkpoint import Checkpoint, expected_shapes

SPARE_BYTES = 64 << 20  # tokenizer and config files, and room the filesystem needs


def output_bytes(checkpoint: Checkpoint, dtype: torch.dtype) -> int:
    """Bytes the tensors take when written in `dtype` (a tied output projection is stored once)."""
    shapes = expected_shapes(checkpoint.args)
    if checkpoint.args.tie_embeddings:
        del shapes["output.weight"]
    return sum(torch.Size(shape).numel() for shape in shapes.values()) * dtype.itemsize


def write_folder(checkpoint: Checkpoint, destination: str, to: str, dtype: torch.dtype) -> None:
    from safetensors import SafetensorError

    from .hf import write_hf
    from .meta import write_meta

    if os.path.exists(destination) and (not os.path.isdir(destination) or os.listdir(destination)):
        raise PlainLlamaError(f"{destination}: exists and is not an empty folder; choose a new folder")
    parent = os.path.dirname(os.path.abspath(destination))
    try:
        os.makedirs(parent, exist_ok=True)
        # Written first, so that a place that takes no files (read-only, not permitted, a special file
        # system) says so, rather than that it lacks free space.
        partial = tempfile.mkdtemp(prefix=f".{os.path.basename(destination)}.partial-", dir=parent)
        needed, free = output_bytes(checkpoint, dtype) + SPARE_BYTES, shutil.disk_usage(parent).free
    except OSError as e:
        raise PlainLlamaError(f"{destination}: cannot write there ({e.strerror})") from None
    if needed > free:
        os.rmdir(partial)
        raise PlainLlamaError(
            f"{destination}: the converted model needs about {needed / 1e9:.2f} GB, but only {free / 1e9:.2f} GB is "
            "free there"
        )
    try:
        (write_hf if to == "hf" else write_meta)(checkpoint, partial, dtype)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        os.replace(partial, destination)  # atomic; replaces an empty folder
    except (
        OSError,
        SafetensorError,
        RuntimeError,
    ) as e:  # the writers' own errors wrap the OS's (torch.save: RuntimeError)
        shutil.rmtree(partial, ignore_errors=True)
        raise PlainLlamaError(
            f"{destination}: writing failed, nothing was left behind ({str(e).splitlines()[0]})"
        ) from None
    except BaseException:  # Ctrl+C, or a model the format cannot express
        shutil.rmtree(partial, ignore_errors=True)
        raise
