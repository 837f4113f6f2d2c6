"""`plainllama inspect "PROMPT"`: the tokenization, each generated step's candidates, and the logit
lens of the last prompt position, in the terminal; `--html` writes the interactive report."""

from __future__ import annotations

import json
import os
import sys

from ..errors import PlainLlamaError
from ..inspection.report import write_report
from .options import load_model


def show(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def format_trace(trace, tokenizer) -> str:
    lines = [f"tokens ({len(trace.tokens)}, {trace.prompt_length} in the prompt):"]
    lines.append("  " + " ".join(f"{show(t.piece)}:{t.id}" for t in trace.tokens[: trace.prompt_length]))
    if trace.steps:
        lines.append("")
        lines.append("generated, with the candidates at each step:")
        for i, step in enumerate(trace.steps, 1):
            candidates = "  ".join(f"{show(tokenizer.piece(t))} {p:6.1%}" for t, p in step.candidates)
            lines.append(f"  {i:>3}  {show(tokenizer.piece(step.chosen)):<16} {candidates}")
    position = trace.prompt_length - 1
    final = trace.predictions[position]
    known = trace.first_layer_knowing(position)
    lines.append("")
    lines.append(
        f"logit lens after {show(trace.tokens[position].piece)} (the next-token guess if the model stopped after "
        "each layer):"
    )
    for i, layer in enumerate(trace.layers):
        top, p = layer.lens_top[position][0]
        marker = "   <- first layer with the final answer on top" if i == known else ""
        lines.append(
            f"  layer {i:>3}  {show(tokenizer.piece(top)):<18} {p:6.1%}   final answer "
            f"{show(tokenizer.piece(final))}: {float(layer.lens_final_prob[position]):6.1%}{marker}"
        )
    return "\n".join(lines)


def run_inspect(llm, prompt: str, max_new_tokens: int, top_k: int, html_path: str | None, chat: bool) -> str:
    prompt_ids = llm.encode_chat([{"role": "user", "content": prompt}]) if chat else llm.tokenizer.encode(prompt)
    trace = llm.trace(prompt_ids, max_new_tokens=max_new_tokens, top_k=top_k)
    if html_path:
        write_report(trace, llm.tokenizer, html_path, f"{prompt} ({llm.checkpoint.name or llm.checkpoint.path})")
    return format_trace(trace, llm.tokenizer)


def run_command(args) -> int:
    if args.top_k < 1:
        raise PlainLlamaError(f"--top-k must be >= 1, got {args.top_k}")
    if args.html:  # before a load that may take minutes
        folder = os.path.dirname(os.path.abspath(args.html))
        if not os.path.isdir(folder):
            raise PlainLlamaError(f"--html {args.html}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise PlainLlamaError(f"--html {args.html}: the folder {folder} is not writable")
    llm = load_model(args)
    print(run_inspect(llm, args.prompt, args.max_new_tokens, args.top_k, args.html, args.chat))
    if args.html:
        print(f"wrote {args.html}", file=sys.stderr)
    return 0
