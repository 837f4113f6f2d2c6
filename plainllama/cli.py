"""The `plainllama` command. Each subcommand is a thin layer over the Python API (api.py)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import PlainLlamaError


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None, help="model file or folder (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-new-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default); higher is more random")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample only from the smallest set of tokens with this much probability")
    p.add_argument("--seed", type=int, default=None, help="make sampling repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plainllama", description="Run Llama-family models you can read.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="continue a prompt", description="Continue PROMPT; the text streams to stdout, timings go to stderr.")
    gen.add_argument("prompt", help="the text to continue")
    add_model_options(gen)
    add_sampling_options(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object (ids, text, timings) instead of streaming")
    gen.add_argument("--chat", action="store_true", help="send PROMPT as a user message in the model's chat format")
    gen.add_argument("--system", default=None, help="system prompt (with --chat)")
    gen.set_defaults(run=run_generate)

    chat = sub.add_parser("chat", help="talk with a model", description="An interactive conversation. " + "/reset clears it, /bye or Ctrl+D ends it, Ctrl+C stops an answer.")
    add_model_options(chat)
    add_sampling_options(chat)
    chat.set_defaults(max_new_tokens=512)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.set_defaults(run=run_chat)

    info = sub.add_parser("info", help="describe a model", description="Format, shape, parameter count, tensor types, memory, tokenizer and chat format of MODEL.")
    info.add_argument("model", nargs="?", default=None, help="model file or folder (default: the bundled model)")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=run_info)

    convert = sub.add_parser("convert", help="write a model as a Hugging Face or Meta folder",
                             description="Write SRC (any supported format) to the folder DST. GGUF weights are dequantized.")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--to", required=True, choices=["hf", "meta"])
    convert.add_argument("--dtype", default="auto", help="auto (the source's float type; float32 for quantized GGUF), float32, bfloat16, float16")
    convert.set_defaults(run=run_convert)
    return parser


def run_info(args) -> int:
    from .default_model import default_model_path
    from .formats import open_checkpoint
    from .info import describe, format_text

    info = describe(open_checkpoint(args.model or default_model_path()))
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


def run_convert(args) -> int:
    import os

    import torch

    from .devices import DTYPES
    from .export.hf import write_hf
    from .export.meta import write_meta
    from .formats import open_checkpoint

    checkpoint = open_checkpoint(args.src)
    if os.path.exists(args.dst) and os.listdir(args.dst):
        raise PlainLlamaError(f"{args.dst}: exists and is not empty; choose a new folder")
    if args.dtype == "auto":
        stored = {t for t in checkpoint.tensor_types.values()}
        dtype = torch.bfloat16 if stored <= {"bfloat16", "bf16", "BF16"} else torch.float16 if stored <= {"float16", "f16", "F16"} else torch.float32
    elif args.dtype in DTYPES:
        dtype = DTYPES[args.dtype]
    else:
        raise PlainLlamaError(f"--dtype {args.dtype}: expected auto, {', '.join(DTYPES)}")
    (write_hf if args.to == "hf" else write_meta)(checkpoint, args.dst, dtype)
    print(f"wrote {args.dst} ({args.to}, {str(dtype).removeprefix('torch.')})", file=sys.stderr)
    return 0


def sampling_settings(args) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def run_chat(args) -> int:
    from .api import load
    from .repl import run_chat as repl

    llm = load(args.model, device=args.device, dtype=args.dtype)
    return repl(llm, args.system, args.max_new_tokens, sampling_settings(args))


def run_generate(args) -> int:
    from .api import load

    llm = load(args.model, device=args.device, dtype=args.dtype)
    prompt = args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
        prompt = llm.encode_chat(messages)
    stream = llm.stream(prompt, max_new_tokens=args.max_new_tokens, **sampling_settings(args))
    if args.json:
        for _ in stream:
            pass
    else:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    result = stream.result
    t = result.timings
    if args.json:
        record = {
            "model": llm.checkpoint.path,
            "device": str(llm.device),
            "dtype": str(llm.dtype).removeprefix("torch."),
            "prompt_tokens": result.prompt_tokens,
            "tokens": result.tokens,
            "text": result.text,
            "finish_reason": result.finish_reason,
            "load_seconds": round(llm.load_seconds, 3),
            **t.as_dict(),
        }
        print(json.dumps(record, ensure_ascii=False))
        return 0
    if result.finish_reason == "context":
        print(f"[stopped: the model's context of {llm.args.context_length} tokens is full]", file=sys.stderr)
    print(
        f"[prompt {t.prompt_tokens} tokens: {t.prefill_tokens_per_second:.1f} tok/s | "
        f"generated {len(result.tokens)} tokens: {t.decode_tokens_per_second:.1f} tok/s | "
        f"{llm.device}, {str(llm.dtype).removeprefix('torch.')}, loaded in {llm.load_seconds:.1f}s]",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="plainllama: %(levelname)s: %(message)s", level=logging.WARNING, stream=sys.stderr)
    try:
        return args.run(args)
    except PlainLlamaError as e:
        print(f"plainllama: error: {e}", file=sys.stderr)
        return 1
    except MemoryError:
        print("plainllama: error: out of memory (try a smaller model, --dtype bfloat16, or a quantized file)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0  # the reader went away (`plainllama generate ... | head`)


if __name__ == "__main__":
    sys.exit(main())
