"""`plainllama convert`: write any supported model as a Hugging Face or Meta folder."""

from __future__ import annotations

import sys

import torch

from ..engine.devices import DTYPES
from ..errors import PlainLlamaError
from ..export import write_folder
from ..formats import open_checkpoint


def run_command(args) -> int:
    if args.model is not None:
        if args.dst is not None:
            raise PlainLlamaError("with -m/--model, give only the destination folder (-m SRC DST or SRC DST)")
        src, dst = args.model, args.src
    else:
        src, dst = args.src, args.dst
    if src is None or dst is None:
        raise PlainLlamaError("give the model to convert and the folder to write: convert SRC DST --to hf|meta")
    args.dst = dst
    checkpoint = open_checkpoint(src)
    if args.dtype == "auto":
        # the matrices' stored precision where the target has it (a bfloat16 source stays bfloat16,
        # its float32 norms with it); quantized types are written as float32
        stored = {t.type for name, t in checkpoint.tensors.items() if not name.endswith("norm.weight")}
        dtype = torch.bfloat16 if stored == {"BF16"} else torch.float16 if stored == {"F16"} else torch.float32
    elif args.dtype in DTYPES:
        dtype = DTYPES[args.dtype]
    else:
        raise PlainLlamaError(f"--dtype {args.dtype}: expected auto, {', '.join(DTYPES)}")
    write_folder(checkpoint, args.dst, args.to, dtype)
    print(f"wrote {args.dst} ({args.to}, {str(dtype).removeprefix('torch.')})", file=sys.stderr)
    return 0
