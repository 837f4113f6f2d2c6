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
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto); on the CPU, an explicit dtype converts every weight to it")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="CPU: hold float weights (Meta, HF, F16/F32 GGUF) as 8- or 4-bit blocks (GGUF Q8_0 / Q4_1 rules)")
    p.add_argument("--dequantize", action="store_true",
                   help="CPU: convert quantized and 16-bit weights to floats instead of computing with them as stored")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="RAM this process may use (e.g. 4G); layers that do not fit are streamed from disk on every pass")
    p.add_argument("--max-gpu-memory", default=None, metavar="SIZE", help="GPU memory to use (default: what is free)")
    p.add_argument("--context", type=int, default=None, metavar="TOKENS",
                   help="KV cache the memory plan reserves, in tokens, all prompts of a batch together (default: 2048)")
    p.add_argument("--compile", action="store_true",
                   help="run decode steps on PyTorch's operators through torch.compile (float weights, GPUs; cached "
                        "under ~/.cache/plainllama/inductor; off by default: it does not pay on the CPU, where packed weights use C kernels)")


def load_model(args, path=None):
    from .api import load

    llm = load(path or args.model, device=args.device, dtype=args.dtype, quantize=args.quantize, dequantize=args.dequantize,
               max_memory=args.max_memory, max_gpu_memory=args.max_gpu_memory, context=args.context,
               compile=args.compile, report=lambda text: print(text, file=sys.stderr))
    if llm.streamer is not None and sys.stderr.isatty():
        from .progress import StreamProgress

        llm.streamer.on_layer = StreamProgress(sys.stderr)
    return llm


def logit_bias(text: str) -> dict[int, float]:
    """"ID:BIAS,ID:BIAS" or a JSON object {"ID": BIAS}."""
    try:
        if text.lstrip().startswith("{"):
            return {int(k): float(v) for k, v in json.loads(text).items()}
        return {int(k): float(v) for k, v in (pair.split(":") for pair in text.split(",") if pair.strip())}
    except (ValueError, json.JSONDecodeError):
        raise argparse.ArgumentTypeError(f"expected ID:BIAS[,ID:BIAS...] or a JSON object, got {text!r}") from None


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-new-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default); higher is more random")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample only from the smallest set of tokens with this much probability")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens less likely than this fraction of the most likely one")
    p.add_argument("--typical-p", type=float, default=None, help="locally typical sampling with this probability mass")
    p.add_argument("--repetition-penalty", type=float, default=None, help="above 1 discourages tokens already in the text")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="subtract this times each token's count so far")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="subtract this from every token generated so far")
    p.add_argument("--logit-bias", type=logit_bias, default=None, help="ID:BIAS[,ID:BIAS...] added to those tokens' logits")
    p.add_argument("--seed", type=int, default=None, help="make sampling repeatable")
    p.add_argument("--stop", action="append", default=[], help="end the text at this string (repeatable); it is not printed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plainllama", description="Run Llama-family models you can read.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="continue a prompt", description="Continue PROMPT; the text streams to stdout, timings go to stderr.")
    gen.add_argument("prompt", nargs="?", default=None, help="the text to continue")
    add_model_options(gen)
    add_sampling_options(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object (ids, text, timings) instead of streaming")
    gen.add_argument("--chat", action="store_true", help="send PROMPT as a user message in the model's chat format")
    gen.add_argument("--system", default=None, help="system prompt (with --chat)")
    gen.add_argument("--logprobs", type=int, default=None, help="with --json: each token's log-probability and the N most likely alternatives")
    gen.add_argument("--beams", type=int, default=None, help="beam search with N beams (deterministic)")
    gen.add_argument("--num-return", type=int, default=1, help="with --beams: print the N best")
    gen.add_argument("--length-penalty", type=float, default=1.0, help="with --beams: scores are divided by length**this")
    gen.add_argument("--early-stopping", default="false", choices=["true", "false", "never"], help="with --beams: when to stop (as in transformers)")
    gen.add_argument("--no-repeat-ngram-size", type=int, default=0, help="with --beams: never repeat an n-gram of this size")
    gen.add_argument("--prompts-file", default=None, help="generate for every prompt in this file (one per line, or JSONL with a 'prompt' field) as one batch")
    gen.add_argument("--throughput", action="store_true",
                     help="with --prompts-file: print only the totals (tokens/s over all prompts), not each text")
    gen.add_argument("--draft-model", default=None, help="speculative decoding with this smaller model (same vocabulary)")
    gen.add_argument("--speculate-k", type=int, default=4, help="tokens the draft model proposes per step (default: 4)")
    gen.set_defaults(run=run_generate)

    chat = sub.add_parser("chat", help="talk with a model", description="An interactive conversation. " + "/reset clears it, /bye or Ctrl+D ends it, Ctrl+C stops an answer.")
    add_model_options(chat)
    add_sampling_options(chat)
    chat.set_defaults(max_new_tokens=512)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.set_defaults(run=run_chat)

    inspect = sub.add_parser("inspect", help="see how the model turns a prompt into the next token",
                             description="The tokenization, each generated step's top candidates and the logit lens, in the terminal; --html writes an interactive page.")
    inspect.add_argument("prompt")
    add_model_options(inspect)
    inspect.add_argument("-n", "--max-new-tokens", type=int, default=8, help="tokens to generate and show (default: 8)")
    inspect.add_argument("--top-k", type=int, default=5, help="candidates shown per step and per layer (default: 5)")
    inspect.add_argument("--html", default=None, metavar="REPORT.html", help="also write a self-contained HTML report")
    inspect.add_argument("--chat", action="store_true", help="send PROMPT as a user message in the model's chat format")
    inspect.set_defaults(run=run_inspect)

    info = sub.add_parser("info", help="describe a model", description="Format, shape, parameter count, tensor types, memory, tokenizer and chat format of MODEL.")
    info.add_argument("model", nargs="?", default=None, help="model file or folder (default: the bundled model)")
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=run_info)

    bench = sub.add_parser("bench", help="measure prefill, decode, load time, memory and bandwidth",
                           description="Prefill and decode speed, time to first token, load time, peak RSS, and the memory bandwidth "
                                       "decoding achieves against this machine's measured read bandwidth.")
    add_model_options(bench)
    bench.add_argument("--prompt-tokens", type=int, default=512, help="prompt length for prefill (default: 512)")
    bench.add_argument("--decode-tokens", type=int, default=128, help="tokens to decode (default: 128)")
    bench.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the best counts (default: 3)")
    bench.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    bench.set_defaults(run=run_bench)

    convert = sub.add_parser("convert", help="write a model as a Hugging Face or Meta folder",
                             description="Write SRC (any supported format) to the folder DST. GGUF weights are dequantized.")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--to", required=True, choices=["hf", "meta"])
    convert.add_argument("--dtype", default="auto", help="auto (the source's float type; float32 for quantized GGUF), float32, bfloat16, float16")
    convert.set_defaults(run=run_convert)
    return parser


def run_inspect(args) -> int:
    from .inspect_cli import run_inspect as inspect

    if args.top_k < 1:
        raise PlainLlamaError(f"--top-k must be >= 1, got {args.top_k}")
    llm = load_model(args)
    print(inspect(llm, args.prompt, args.max_new_tokens, args.top_k, args.html, args.chat))
    if args.html:
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


def run_bench(args) -> int:
    from .bench import format_table, run

    if args.prompt_tokens < 1 or args.decode_tokens < 2 or args.repeats < 1:
        raise PlainLlamaError("bench needs --prompt-tokens >= 1, --decode-tokens >= 2 and --repeats >= 1")
    result = run(args.model, args.prompt_tokens, args.decode_tokens, args.repeats, device=args.device, dtype=args.dtype,
                 quantize=args.quantize, dequantize=args.dequantize, compile=args.compile)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def run_info(args) -> int:
    from .default_model import default_model_path
    from .formats import open_checkpoint
    from .info import describe, format_text

    info = describe(open_checkpoint(args.model or default_model_path()))
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


def run_convert(args) -> int:
    import torch

    from .devices import DTYPES
    from .export import write_folder
    from .formats import open_checkpoint

    checkpoint = open_checkpoint(args.src)
    if args.dtype == "auto":
        stored = {t for t in checkpoint.tensor_types.values()}
        dtype = torch.bfloat16 if stored <= {"bfloat16", "bf16", "BF16"} else torch.float16 if stored <= {"float16", "f16", "F16"} else torch.float32
    elif args.dtype in DTYPES:
        dtype = DTYPES[args.dtype]
    else:
        raise PlainLlamaError(f"--dtype {args.dtype}: expected auto, {', '.join(DTYPES)}")
    write_folder(checkpoint, args.dst, args.to, dtype)
    print(f"wrote {args.dst} ({args.to}, {str(dtype).removeprefix('torch.')})", file=sys.stderr)
    return 0


def sampling_settings(args) -> dict:
    return dict(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, typical_p=args.typical_p,
        repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty, logit_bias=args.logit_bias or {}, seed=args.seed,
    )


def read_prompts(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise PlainLlamaError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise PlainLlamaError(f"{path}: not a text file (byte {e.start} is not UTF-8); expected one prompt per line") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("{"):
            try:
                prompts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise PlainLlamaError(f"{path}: line {number} is not a JSON object with a 'prompt'") from None
        else:
            prompts.append(line)
    if not prompts:
        raise PlainLlamaError(f"{path}: no prompts in the file")
    return prompts


def check_generate_options(args) -> None:
    if (args.prompt is None) == (args.prompts_file is None):
        raise PlainLlamaError("give a PROMPT or --prompts-file, not both or neither")
    if args.beams is not None and (args.draft_model or args.prompts_file or args.temperature):
        raise PlainLlamaError("--beams is deterministic and runs one prompt: not with --draft-model, --prompts-file or --temperature")
    if args.prompts_file and args.draft_model:
        raise PlainLlamaError("--draft-model runs one prompt at a time: not with --prompts-file")
    if args.throughput and not args.prompts_file:
        raise PlainLlamaError("--throughput measures a batch: give --prompts-file")


def run_beams(llm, prompt, args) -> int:
    early = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    beams = llm.beam_search(prompt, args.beams, args.max_new_tokens, args.length_penalty, early, args.no_repeat_ngram_size, args.num_return)
    if args.json:
        print(json.dumps({"beams": [{"tokens": b.tokens, "text": llm.tokenizer.decode([t for t in b.tokens if t not in llm.tokenizer.end_ids]),
                                     "score": b.score} for b in beams]}, ensure_ascii=False))
    else:
        for i, b in enumerate(beams):
            text = llm.tokenizer.decode([t for t in b.tokens if t not in llm.tokenizer.end_ids])
            print(f"[{i + 1}] score {b.score:.4f}:{text}" if len(beams) > 1 else text)
    return 0


def run_batch(llm, prompts: list[str], args) -> int:
    import time

    start = time.perf_counter()
    results = llm.generate_batch(prompts, max_new_tokens=args.max_new_tokens, stop=args.stop, **sampling_settings(args))
    seconds = time.perf_counter() - start
    generated = sum(len(r.tokens) for r in results)
    if args.throughput:
        prompt_tokens = sum(len(r.prompt_tokens) for r in results)
        streamer = llm.streamer
        streamed = f", {streamer.stats.bytes_read / 1e9:.1f} GB read from disk" if streamer is not None else ""
        print(f"{len(prompts)} prompts: {prompt_tokens} prompt tokens + {generated} generated in {seconds:.1f}s = "
              f"{(prompt_tokens + generated) / seconds:.2f} tokens/s in all, {generated / seconds:.2f} generated tokens/s{streamed}")
        return 0
    for prompt, r in zip(prompts, results, strict=True):
        if args.json:
            print(json.dumps({"prompt": prompt, "prompt_tokens": r.prompt_tokens, "tokens": r.tokens, "text": r.text, "finish_reason": r.finish_reason}, ensure_ascii=False))
        else:
            print(json.dumps(prompt + r.text, ensure_ascii=False))
    print(f"[{len(prompts)} prompts, {generated} tokens in {seconds:.1f}s: {generated / seconds:.1f} tok/s]", file=sys.stderr)
    return 0


def run_chat(args) -> int:
    from .repl import run_chat as repl

    llm = load_model(args)
    return repl(llm, args.system, args.max_new_tokens, sampling_settings(args), args.stop)


def run_generate(args) -> int:
    check_generate_options(args)
    prompts = read_prompts(args.prompts_file) if args.prompts_file else None  # before a load that may take minutes
    llm = load_model(args)
    if prompts is not None:
        return run_batch(llm, prompts, args)
    prompt = args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
        prompt = llm.encode_chat(messages)
    if args.beams is not None:
        return run_beams(llm, prompt, args)
    draft = load_model(args, args.draft_model) if args.draft_model else None
    stream = llm.stream(prompt, max_new_tokens=args.max_new_tokens, stop=args.stop, logprobs=args.logprobs, draft=draft,
                        speculate_k=args.speculate_k, **sampling_settings(args))
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
        if result.logprobs is not None:
            record["logprobs"] = [{"token": lp.token, "text": llm.tokenizer.piece(lp.token), "logprob": lp.logprob,
                                   "top": [{"token": i, "text": llm.tokenizer.piece(i), "logprob": v} for i, v in lp.top]} for lp in result.logprobs]
        if result.draft_acceptance is not None:
            record["draft_acceptance"] = result.draft_acceptance
        print(json.dumps(record, ensure_ascii=False))
        return 0
    if result.finish_reason == "context":
        print(f"[stopped: the model's context of {llm.args.context_length} tokens is full]", file=sys.stderr)
    print(
        f"[prompt {t.prompt_tokens} tokens: {t.prefill_tokens_per_second:.1f} tok/s | "
        f"generated {len(result.tokens)} tokens: {t.decode_tokens_per_second:.1f} tok/s | "
        f"{llm.device}, {str(llm.dtype).removeprefix('torch.')}, loaded in {llm.load_seconds:.1f}s"
        + (f", draft accepted {result.draft_acceptance:.0%}" if result.draft_acceptance is not None else "") + "]",
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
        print("\n[interrupted]", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0  # the reader went away (`plainllama generate ... | head`)


if __name__ == "__main__":
    sys.exit(main())
