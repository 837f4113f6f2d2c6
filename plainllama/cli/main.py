"""The `plainllama` command line: every subcommand and its options. The commands themselves are the
other files of this folder, one each, imported only when run (a command's imports are not paid by
another's, nor by --help)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from typing import NoReturn

from ..errors import PlainLlamaError


GENERATE_EXAMPLES = """examples:
  plainllama generate "The capital of France is" -n 32
  plainllama generate --chat "What do llamas eat?" --system "Answer briefly."
  echo "Once upon a time" | plainllama generate --temperature 0.8 --top-p 0.95 --seed 1
  plainllama generate -f prompt.txt -m model.gguf --max-memory 4G --json
  plainllama generate "def fib(n):" --beams 4 --num-return 2
  plainllama generate --prompts-file prompts.jsonl --throughput
  plainllama generate "Hello" -m big.gguf --draft-model small.gguf --speculate-k 4"""


def build_parser() -> argparse.ArgumentParser:
    from .options import SETTABLE, add_model_options, add_sampling_options

    from .. import __version__

    parser = argparse.ArgumentParser(prog="plainllama", description="Run Llama-family models you can read.")
    parser.add_argument("--version", action="version", version=f"plainllama {__version__}")
    sub = parser.add_subparsers(dest="command")
    gen = sub.add_parser(
        "generate",
        help="continue a prompt",
        description="Continue PROMPT; the text streams to stdout, timings go to stderr.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=GENERATE_EXAMPLES,
    )
    prompt = gen.add_argument_group("prompt")
    prompt.add_argument(
        "prompt", nargs="?", default=None, help="the text to continue; - (or no PROMPT with text piped in) reads stdin"
    )
    prompt.add_argument("-f", "--file", default=None, metavar="PROMPT_FILE", help="read the prompt from this file")
    prompt.add_argument(
        "-e",
        "--escape",
        action="store_true",
        help="turn \\n, \\t and \\\\ in the prompt, --system and --stop into characters",
    )
    prompt.add_argument("--chat", action="store_true", help="send PROMPT as a user message in the model's chat format")
    prompt.add_argument("--system", default=None, help="system prompt (with --chat)")
    prompt.add_argument("--system-file", default=None, help="read the system prompt from this file (with --chat)")
    add_model_options(gen.add_argument_group("model"))
    add_sampling_options(gen.add_argument_group("sampling"), gen.add_argument_group("stopping"))
    output = gen.add_argument_group("output")
    output.add_argument(
        "--json", action="store_true", help="print one JSON object (ids, text, timings) instead of streaming"
    )
    output.add_argument(
        "--logprobs",
        type=int,
        default=None,
        help="with --json: each token's log-probability and the N most likely alternatives",
    )
    beams = gen.add_argument_group("beam search")
    beams.add_argument("--beams", type=int, default=None, help="beam search with N beams (deterministic)")
    # beam options default to None, so that giving one without --beams can be told apart (and refused)
    beams.add_argument("--num-return", type=int, default=None, help="with --beams: print the N best (default: 1)")
    beams.add_argument(
        "--length-penalty",
        type=float,
        default=None,
        help="with --beams: scores are divided by length**this (default: 1)",
    )
    beams.add_argument(
        "--early-stopping",
        default=None,
        choices=["true", "false", "never"],
        help="with --beams: when to stop (as in transformers; default: false)",
    )
    beams.add_argument(
        "--no-repeat-ngram-size", type=int, default=None, help="with --beams: never repeat an n-gram of this size"
    )
    batches = gen.add_argument_group("batches")
    batches.add_argument(
        "--prompts-file",
        default=None,
        help="generate for every prompt in this file (one per line, or JSONL with a 'prompt' field) as one batch",
    )
    batches.add_argument(
        "--throughput",
        action="store_true",
        help="with --prompts-file: print only the totals (tokens/s over all prompts), not each text",
    )
    speculative = gen.add_argument_group("speculative decoding")
    speculative.add_argument(
        "--draft-model", default=None, help="speculative decoding with this smaller model (same vocabulary)"
    )
    speculative.add_argument(
        "--speculate-k", type=int, default=4, help="tokens the draft model proposes per step (default: 4)"
    )

    gen.set_defaults(command_module="generate")

    chat = sub.add_parser(
        "chat",
        help="talk with a model",
        description="An interactive conversation. "
        + "/reset clears it, /bye or Ctrl+D ends it, Ctrl+C stops an answer.",
    )
    add_model_options(chat)
    add_sampling_options(chat)
    # sampling settings not given stay None: the model's own, then the chat defaults, fill them (chat.py)
    chat.set_defaults(max_new_tokens=512, **dict.fromkeys(SETTABLE))
    chat.add_argument("--system", default=None, help="system prompt")
    chat.set_defaults(command_module="chat")

    serve = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (continuous batching)",
        description="Load the model once and serve OpenAI's API: POST /v1/chat/completions and /v1/completions "
        "(streamed or not), GET /v1/models, /health and /metrics. Every running request is decoded in one pass "
        "over the weights per step; new requests join between steps.",
        epilog="examples:\n"
        "  plainllama serve -m model.gguf --port 8000\n"
        '  curl localhost:8000/v1/chat/completions -d \'{"messages": [{"role": "user", "content": "Hi"}]}\'',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="the port to listen on (default: 8000)")
    serve.add_argument(
        "--max-batch", type=int, default=16, metavar="N", help="requests decoded together at most (default: 16)"
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        default=256,
        metavar="N",
        help="requests waiting for a place in the batch at most; beyond, 429 with Retry-After (default: 256)",
    )
    serve.add_argument(
        "--prefix-cache",
        default="512M",
        metavar="SIZE",
        help="memory for the keys and values of recent prompts, so that a request that starts with one (a chat's "
        "history) prefills only what follows; 0 turns it off (default: 512M)",
    )
    serve.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the model's id in the API (default: the model file's or folder's name)",
    )
    serve.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on Ctrl+C or SIGTERM, how long running requests may finish before they are cancelled (default: 10)",
    )
    serve.set_defaults(command_module="serve")

    inspect = sub.add_parser(
        "inspect",
        help="see how the model turns a prompt into the next token",
        description="The tokenization, each generated step's top candidates and the logit lens, in the terminal; "
        "--html writes an interactive page.",
    )
    inspect.add_argument("prompt", help="the text whose next tokens are shown")
    add_model_options(inspect)
    inspect.add_argument("-n", "--max-new-tokens", type=int, default=8, help="tokens to generate and show (default: 8)")
    inspect.add_argument("--top-k", type=int, default=5, help="candidates shown per step and per layer (default: 5)")
    inspect.add_argument("--html", default=None, metavar="REPORT.html", help="also write a self-contained HTML report")
    inspect.add_argument("--chat", action="store_true", help="send PROMPT as a user message in the model's chat format")
    inspect.set_defaults(command_module="inspect")

    info = sub.add_parser(
        "info",
        help="describe a model",
        description="Format, shape, parameter count, tensor types, memory, tokenizer and chat format of MODEL.",
    )
    info.add_argument("model", nargs="?", default=None, help="model file or folder (default: the bundled model)")
    info.add_argument("-m", "--model", dest="model_option", default=None, help="the same as MODEL")
    info.add_argument("--json", action="store_true", help="print the description as one JSON object")
    info.set_defaults(command_module="info")

    bench = sub.add_parser(
        "bench",
        help="measure prefill, decode, load time, memory and bandwidth",
        description="Prefill and decode speed, time to first token, load time, peak RSS, and the memory bandwidth "
        "decoding achieves against this machine's measured read bandwidth.",
    )
    add_model_options(bench)
    bench.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for prefill (default: 512)")
    bench.add_argument("--decode-tokens", type=int, default=128, help="tokens to decode (default: 128)")
    bench.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the best counts (default: 3)")
    bench.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    bench.set_defaults(command_module="bench")

    convert = sub.add_parser(
        "convert",
        help="write a model as a Hugging Face folder, a Meta folder or a GGUF file",
        description="Write SRC (any supported format) as DST, one tensor at a time: memory stays near the largest "
        "tensor, whatever the model's size. Quantized GGUF weights are dequantized.",
        epilog="examples:\n"
        "  plainllama convert -m Meta-Llama-3.1-8B/ llama-3.1-8b.gguf --to gguf --dtype q8_0\n"
        "  plainllama convert -m model.gguf model-hf/ --to hf --shard-size 2G",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument(
        "src", nargs="?", default=None, help="the model to convert: a GGUF file, a Meta or a Hugging Face folder"
    )
    convert.add_argument(
        "dst", nargs="?", default=None, help="what to write: a folder (new, or empty) for hf and meta; a new .gguf file"
    )
    convert.add_argument("-m", "--model", default=None, help="the model to convert (then DST is the only positional)")
    convert.add_argument("--to", required=True, choices=["hf", "meta", "gguf"], help="the format to write")
    convert.add_argument(
        "--dtype",
        default="auto",
        help="auto (the source's 16-bit type where its matrices have one; else float32 for hf and meta, float16 "
        "for gguf), float32, bfloat16, float16; for gguf also q8_0",
    )
    convert.add_argument(
        "--shard-size",
        default=None,
        metavar="SIZE",
        help="--to hf: cut the safetensors into files of at most SIZE (e.g. 2G, 500M), with an index, as "
        "transformers does (default: 5 GB)",
    )
    convert.set_defaults(command_module="convert")
    return parser


@contextlib.contextmanager
def interrupt_deferred():
    """Ctrl+C is noted, not raised, until the block ends, then raised as KeyboardInterrupt.

    Importing PyTorch runs Python code called from C++ (pybind11); a KeyboardInterrupt raised there
    either ends the process from C++ (`terminate called after throwing ... pybind11::error_already_set`)
    or is swallowed by a C++ catch and the Ctrl+C is lost (the first seen once in CI; the second in 2 of
    40 tries of Ctrl+C at 0.2-1.5 s into `plainllama generate`, 0 of 80 with this)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread has signal handlers
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    if previous is None:  # a handler installed outside Python; the default is the nearest Python equivalent
        previous = signal.default_int_handler
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


# Commands that run under tensor parallelism (every rank runs the same command in step; rank 0 talks)
PARALLEL_COMMANDS = ("generate", "chat", "serve", "bench")


def started_as_ranks() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a single process."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1  # parallel/ranks.py names the bad variable when the model loads


def check_ranks(args, world: int) -> None:
    tp = getattr(args, "tp", None)
    if tp is not None and tp < 1:
        raise PlainLlamaError(f"--tp must be >= 1, got {tp}")
    if tp is not None and world > 1 and tp != world:
        raise PlainLlamaError(f"--tp {tp}, but this process was started as one of {world} ranks (WORLD_SIZE)")
    if max(world, tp or 1) > 1 and args.command_module not in PARALLEL_COMMANDS:
        raise PlainLlamaError(
            f"`plainllama {args.command}` does not run under tensor parallelism (--tp and torchrun run "
            f"{', '.join(PARALLEL_COMMANDS)})"
        )


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if code != 0 and started_as_ranks()[1] > 1:
        _exit_at_once(code)
    return code


def _exit_at_once(code: int) -> NoReturn:
    """End a failed rank, skipping the interpreter's and C++'s clean-up. Its group may be broken (a
    peer died): leaving it could wait on the dead peer, and a normal exit with gloo's threads still
    running aborts the process (`terminate called without an active exception`, SIGABRT) after the
    error was already printed (seen in CI)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed stream: nothing more can be said on it
            stream.flush()
    os._exit(code)


def _main(argv: list[str] | None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:  # Ctrl+C while PyTorch is still being imported
        return 130
    if args.command is None:  # bare `plainllama`
        parser.print_help()
        return 0
    logging.basicConfig(format="plainllama: %(levelname)s: %(message)s", level=logging.WARNING, stream=sys.stderr)
    rank, world = started_as_ranks()
    errors, said = sys.stderr, "plainllama: error: " if rank == 0 else f"plainllama: rank {rank}: error: "
    try:
        check_ranks(args, world)
        if world == 1 and (getattr(args, "tp", None) or 1) > 1:
            from ..parallel.launch import run_ranks

            return run_ranks(args.tp, sys.argv[1:] if argv is None else argv)
        if rank > 0:  # a follower: rank 0 prints the answer and the timings; followers only their errors
            sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115  # for the process's life
        with interrupt_deferred():  # the command's imports (PyTorch among them)
            command = importlib.import_module(f"{__package__}.{args.command_module}")
        code = command.run_command(args)
        if world > 1:  # leave the group before exiting: gloo's threads still running at exit abort the process
            from ..parallel.ranks import leave

            leave()
        return code
    except PlainLlamaError as e:
        print(f"{said}{e}", file=errors)
        return 1
    except MemoryError:
        print(f"{said}out of memory (try a smaller model, --dtype bfloat16, or a quantized file)", file=errors)
        return 1
    except RuntimeError as e:  # PyTorch's out-of-memory is a RuntimeError (torch.OutOfMemoryError), not a MemoryError
        if "out of memory" in str(e).lower():
            print(f"{said}out of memory: {str(e).strip().splitlines()[0]}", file=errors)
            return 1
        if world > 1:  # a collective failed: a peer died, or hung past the deadline
            address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(
                f"plainllama: error: rank {rank} of {world} lost contact with the other ranks (group at {address}): "
                f"{reason}; another rank stopped, or its machine is unreachable",
                file=errors,
            )
            return 1
        raise
    except KeyboardInterrupt:
        print("\n[interrupted]", file=errors)
        return 130
    except BrokenPipeError:
        return 0  # the reader went away (`plainllama generate ... | head`)


if __name__ == "__main__":
    sys.exit(main())
