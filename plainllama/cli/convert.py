"""`plainllama convert`: write any supported model as a Hugging Face or Meta folder."""

from __future__ import annotations

import sys

import torch

from ..engine.devices import DTYPES
from ..errors import PlainLlamaError
from ..export import write_folder
from ..formats import open_checkpoint


def run_command(args) -> int:
    checkpoint = open_checkpoint(args.src)
    if args.dtype == "auto":
        stored = {t.type for t in checkpoint.tensors.values()}
        dtype = torch.bfloat16 if stored == {"BF16"} else torch.float16 if stored == {"F16"} else torch.float32
    elif args.dtype in DTYPES:
        dtype = DTYPES[args.dtype]
    else:
        raise PlainLlamaError(f"--dtype {args.dtype}: expected auto, {', '.join(DTYPES)}")
    write_folder(checkpoint, args.dst, args.to, dtype)
    print(f"wrote {args.dst} ({args.to}, {str(dtype).removeprefix('torch.')})", file=sys.stderr)
    return 0
