"""Writing models out: `plainllama convert` to a Hugging Face folder, a Meta folder or a GGUF file.

Tensors are read and written one at a time (reading.py), so memory stays near the largest tensor
whatever the model's size. The result is written under a temporary name beside the destination
and renamed into place once complete, so a failure part-way (a full disk, Ctrl+C) never leaves
something that looks like a model but is missing tensors."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable

import torch

from ..errors import PlainLlamaError
from ..formats.checkpoint import Checkpoint, expected_shapes

SPARE_BYTES = 64 << 20  # tokenizer and config files, and room the filesystem needs
# Above this, safetensors output is cut into shards: transformers 4's default max_shard_size ("5GB"),
# the shard size of most models on the Hugging Face Hub (transformers 5 raised its default to 50 GB).
DEFAULT_SHARD_BYTES = 5 * 10**9  # (write_hf's default too)


def output_bytes(checkpoint: Checkpoint, to: str, precision: torch.dtype | str) -> int:
    """Bytes the tensors take when written (a tied output projection is stored once)."""
    if to == "gguf":
        from .gguf import output_bytes as gguf_bytes

        return gguf_bytes(checkpoint, str(precision))
    shapes = expected_shapes(checkpoint.args)
    if checkpoint.args.tie_embeddings:
        del shapes["output.weight"]
    assert isinstance(precision, torch.dtype)
    return sum(torch.Size(shape).numel() for shape in shapes.values()) * precision.itemsize


def write_model(
    checkpoint: Checkpoint,
    destination: str,
    to: str,
    precision: torch.dtype | str,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    written: Callable[[int], None] | None = None,
) -> None:
    """`to`: "hf" or "meta" (a folder; `precision` a torch dtype) or "gguf" (a file; `precision` one
    of export.gguf.TYPES). `written(nbytes)` is told of each tensor as it is written."""
    from safetensors import SafetensorError

    if to == "gguf":
        if os.path.exists(destination):
            raise PlainLlamaError(f"{destination}: exists; choose a new file name")
    elif os.path.exists(destination) and (not os.path.isdir(destination) or os.listdir(destination)):
        raise PlainLlamaError(f"{destination}: exists and is not an empty folder; choose a new folder")
    parent = os.path.dirname(os.path.abspath(destination))
    try:
        os.makedirs(parent, exist_ok=True)
        # Made first, so that a place that takes no files (read-only, not permitted, a special file
        # system) says so, rather than that it lacks free space.
        prefix = f".{os.path.basename(destination)}.partial-"
        if to == "gguf":
            handle, partial = tempfile.mkstemp(prefix=prefix, dir=parent)
            os.close(handle)
        else:
            partial = tempfile.mkdtemp(prefix=prefix, dir=parent)
        needed, free = output_bytes(checkpoint, to, precision) + SPARE_BYTES, shutil.disk_usage(parent).free
    except OSError as e:
        raise PlainLlamaError(f"{destination}: cannot write there ({e.strerror})") from None
    if needed > free:
        remove(partial)
        raise PlainLlamaError(
            f"{destination}: the converted model needs about {needed / 1e9:.2f} GB, but only {free / 1e9:.2f} GB is "
            "free there"
        )
    try:
        write_partial(checkpoint, partial, to, precision, shard_bytes, written)
        umask = os.umask(0)
        os.umask(umask)
        # mkdtemp/mkstemp make it private; the result is an ordinary folder or file
        os.chmod(partial, (0o777 if to != "gguf" else 0o666) & ~umask)
        os.replace(partial, destination)  # atomic; replaces an empty folder
    except (OSError, SafetensorError, RuntimeError, ValueError) as e:
        # the writers' own errors wrap the OS's (torch.save: RuntimeError; gguf's writer: ValueError)
        remove(partial)
        raise PlainLlamaError(
            f"{destination}: writing failed, nothing was left behind ({str(e).splitlines()[0]})"
        ) from None
    except BaseException:  # Ctrl+C, or a model the format cannot express
        remove(partial)
        raise


def write_partial(checkpoint, partial, to, precision, shard_bytes, written) -> None:
    if to == "gguf":
        from .gguf import write_gguf

        write_gguf(checkpoint, partial, str(precision), written)
    elif to == "hf":
        from .hf import write_hf

        assert isinstance(precision, torch.dtype)
        write_hf(checkpoint, partial, precision, shard_bytes, written)
    else:
        from .meta import write_meta

        assert isinstance(precision, torch.dtype)
        write_meta(checkpoint, partial, precision, written)


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)
