"""Options shared by several commands, each defined once: the load options (every command that
loads a model) and the sampling options (built from SamplingSettings' fields, whose help they carry)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..sampling_settings import SamplingSettings


def add_model_options(p) -> None:  # a parser or an argument group
    p.add_argument(
        "-m", "--model", default=None, help="model file or folder (default: the bundled SmolLM2-135M-Instruct)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto, float32, bfloat16 or float16 (default: auto); "
        "on the CPU, an explicit dtype converts every weight to it",
    )
    p.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        default=None,
        help="CPU: hold float weights (Meta, HF, F16/F32 GGUF) as 8- or 4-bit blocks (GGUF Q8_0 / Q4_1 rules)",
    )
    p.add_argument(
        "--dequantize",
        action="store_true",
        help="CPU: convert quantized and 16-bit weights to floats instead of computing with them as stored",
    )
    p.add_argument(
        "--max-memory",
        default=None,
        metavar="SIZE",
        help="RAM this process may use (e.g. 4G); layers that do not fit are streamed from disk on every pass",
    )
    p.add_argument("--max-gpu-memory", default=None, metavar="SIZE", help="GPU memory to use (default: what is free)")
    p.add_argument(
        "--context",
        type=int,
        default=None,
        metavar="TOKENS",
        help="the context in tokens (default: the model's): generation stops there, a chat trims its turns to it, "
        "and the memory plan reserves its KV cache (all prompts of a batch together; default 2048)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="threads for the products (default: one per core); on a busy machine, fewer than the cores are faster",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=None,
        metavar="N",
        help="tensor parallelism: run N processes on this machine, each holding 1/N of every layer "
        "(generate, chat, serve, bench; for several machines start the command with torchrun instead)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="run decode steps on PyTorch's operators through torch.compile (float weights, GPUs; cached "
        "under ~/.cache/plainllama/inductor; off by default: it does not pay on the CPU, where packed weights use C "
        "kernels)",
    )


def load_options(args) -> dict:
    """The keyword arguments of plainllama.load() that the model options give."""
    return dict(
        threads=args.threads,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        dequantize=args.dequantize,
        max_memory=args.max_memory,
        max_gpu_memory=args.max_gpu_memory,
        context=args.context,
        compile=args.compile,
    )


def load_model(args, path=None, prefix_cache: int | str = 0):
    """The model, its plan reported on stderr. `prefix_cache`: memory the plan sets aside for the
    serve/chat engine's prefix cache (plainllama.load)."""
    from ..api import load

    llm = load(
        path or args.model,
        **load_options(args),
        prefix_cache=prefix_cache,
        report=lambda text: print(text, file=sys.stderr),
    )
    if llm.streamer is not None and sys.stderr.isatty():
        from .progress import OutputTracker, StreamProgress

        output = None
        if sys.stdout.isatty():  # the answer shows on the same terminal as the progress line
            output = sys.stdout = OutputTracker(sys.stdout)
        llm.streamer.on_layer = StreamProgress(sys.stderr, output)
    return llm


def logit_bias(text: str) -> dict[int, float]:
    """ "ID:BIAS,ID:BIAS" or a JSON object {"ID": BIAS}."""
    try:
        if text.lstrip().startswith("{"):
            return {int(k): float(v) for k, v in json.loads(text).items()}
        return {int(k): float(v) for k, v in (pair.split(":") for pair in text.split(",") if pair.strip())}
    except (ValueError, json.JSONDecodeError):
        raise argparse.ArgumentTypeError(f"expected ID:BIAS[,ID:BIAS...] or a JSON object, got {text!r}") from None


# the settings the chat's /set changes, and whose command-line defaults the chat leaves open
SETTABLE = tuple(setting.name for setting in dataclasses.fields(SamplingSettings) if setting.name != "logit_bias")

PARSERS = {"logit_bias": logit_bias}  # settings whose command-line form is not their Python type


def add_sampling_options(p, stopping=None) -> None:
    """The sampling settings on `p`; -n and --stop on `stopping` (an argument group), or on `p` too."""
    stopping = stopping if stopping is not None else p
    stopping.add_argument(
        "-n", "--max-new-tokens", type=int, default=128, help="most tokens to generate (default: 128)"
    )
    for setting in dataclasses.fields(SamplingSettings):
        has_factory = setting.default is dataclasses.MISSING
        default = setting.default_factory() if has_factory else setting.default  # type: ignore[operator]
        p.add_argument(
            "--" + setting.name.replace("_", "-"),
            type=PARSERS.get(setting.name, setting.metadata["type"]),
            default=default,
            help=setting.metadata["help"],
        )
    stopping.add_argument(
        "--stop", action="append", default=[], help="end the text at this string (repeatable); it is not printed"
    )


def sampling_settings(args) -> dict:
    """The SamplingSettings fields given on the command line, as keyword arguments."""
    return {setting.name: getattr(args, setting.name) for setting in dataclasses.fields(SamplingSettings)}
