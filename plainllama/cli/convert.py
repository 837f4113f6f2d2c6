"""`plainllama convert`: write any supported model as a Hugging Face folder, a Meta folder or a GGUF file."""

from __future__ import annotations

import sys
import time

import torch

from ..engine.devices import DTYPES
from ..engine.planner import parse_size
from ..errors import PlainLlamaError
from ..export import DEFAULT_SHARD_BYTES, output_bytes, write_model
from ..formats import open_checkpoint

GGUF_TYPES = {"float16": "F16", "f16": "F16", "bfloat16": "BF16", "bf16": "BF16", "q8_0": "Q8_0"}
UPDATES_PER_SECOND = 4


class ConvertProgress:
    """[converting: 1.20/2.47 GB written] on stderr, over itself, when stderr is a terminal (the
    output of a conversion is a file, so nothing else shares the line)."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream = total, stream
        self.done, self.last, self.width = 0, 0.0, 0
        self.shown = stream.isatty()

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if self.shown and (now - self.last >= 1 / UPDATES_PER_SECOND or self.done >= self.total):
            self.last = now
            self.draw(f"[converting: {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB written]")

    def draw(self, text: str) -> None:
        if self.shown and (text or self.width):
            self.stream.write("\r" + text.ljust(self.width) + ("\r" if not text else ""))
            self.stream.flush()
            self.width = len(text)


def precision_for(checkpoint, to: str, requested: str) -> torch.dtype | str:
    """The dtype (hf, meta) or GGUF tensor type (gguf) to write."""
    # the matrices' stored precision where the target has it (a bfloat16 source stays bfloat16, its
    # float32 norms with it)
    stored = {t.type for name, t in checkpoint.tensors.items() if not name.endswith("norm.weight")}
    if to == "gguf":
        if requested == "auto":
            return "BF16" if stored == {"BF16"} else "F16"
        if requested.lower() not in GGUF_TYPES:
            raise PlainLlamaError(f"--dtype {requested}: for gguf expected auto, float16, bfloat16 or q8_0")
        return GGUF_TYPES[requested.lower()]
    if requested == "auto":
        return torch.bfloat16 if stored == {"BF16"} else torch.float16 if stored == {"F16"} else torch.float32
    if requested not in DTYPES:
        raise PlainLlamaError(f"--dtype {requested}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[requested]


def run_command(args) -> int:
    if args.model is not None:
        if args.dst is not None:
            raise PlainLlamaError("with -m/--model, give only the destination (-m SRC DST or SRC DST)")
        src, dst = args.model, args.src
    else:
        src, dst = args.src, args.dst
    if src is None or dst is None:
        raise PlainLlamaError("give the model to convert and where to write it: convert SRC DST --to hf|meta|gguf")
    if args.shard_size is not None and args.to != "hf":
        raise PlainLlamaError(f"--shard-size applies to --to hf only (not --to {args.to})")
    shard_bytes = parse_size(args.shard_size) if args.shard_size is not None else DEFAULT_SHARD_BYTES
    checkpoint = open_checkpoint(src)
    precision = precision_for(checkpoint, args.to, args.dtype)
    progress = ConvertProgress(output_bytes(checkpoint, args.to, precision))
    try:
        write_model(checkpoint, dst, args.to, precision, shard_bytes, progress)
    finally:
        progress.draw("")
    name = precision if isinstance(precision, str) else str(precision).removeprefix("torch.")
    print(f"wrote {dst} ({args.to}, {name})", file=sys.stderr)
    return 0
