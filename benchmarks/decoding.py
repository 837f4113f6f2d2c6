"""Batching and speculative decoding on the default model, measured side by side in one run.

    .venv/bin/python benchmarks/decoding.py

1. A batch of 8 prompts (one forward pass per step for all) against the same 8 prompts one by one.
2. Speculative decoding, greedy, against the target alone, for two pairs built here:
   - target: the default model with its feed-forward widened 4x by zero neurons (the same function at
     ~3x the cost: a "larger model converted from it"); draft: the default model. Acceptance is
     near 100% by construction, so this shows the speed-up the mechanism allows.
   - target: the default model; draft: its first 6 layers (a realistic cheap draft, poorly aligned).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from dataclasses import replace

import torch

import plainllama
from plainllama.default_model import default_model_path
from plainllama.export.meta import write_meta
from plainllama.formats import open_checkpoint

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a valley high in the Andes,",
    "def fibonacci(n):",
    "Llamas are members of the camelid family. They",
    "The three primary colors are",
    "In 1969, the first humans",
    "A good recipe for bread needs",
    "The most important rule of programming is",
]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def widened(folder: str, factor: int = 4) -> str:
    """The default model with factor x feed-forward width; the extra neurons have zero weights."""
    checkpoint = open_checkpoint(default_model_path())
    old = checkpoint.args.hidden_dim
    checkpoint.args.hidden_dim = old * factor

    def pad(record, dim):
        def load():
            t = record.load()
            shape = list(t.shape)
            shape[dim] = old * (factor - 1)
            return torch.cat([t, torch.zeros(shape, dtype=t.dtype)], dim=dim)

        return load

    for name, record in list(checkpoint.tensors.items()):
        if name.endswith(("feed_forward.w1.weight", "feed_forward.w3.weight")):
            checkpoint.tensors[name] = replace(record, load=pad(record, 0), raw=None, stored=None)
        elif name.endswith("feed_forward.w2.weight"):
            checkpoint.tensors[name] = replace(record, load=pad(record, 1), raw=None, stored=None)
    write_meta(checkpoint, folder, torch.float32)
    return folder


def main():
    llm = plainllama.load(device="cpu")
    n = 64
    print(
        f"model: {os.path.basename(default_model_path())}, float32, torch threads {torch.get_num_threads()}, {n} new "
        "tokens per prompt"
    )

    llm.generate(PROMPTS[0], max_new_tokens=4)  # warm-up
    singles, t_single = timed(lambda: [llm.generate(p, max_new_tokens=n) for p in PROMPTS])
    batch, t_batch = timed(lambda: llm.generate_batch(PROMPTS, max_new_tokens=n))
    tokens_single = sum(len(r.tokens) for r in singles)
    tokens_batch = sum(len(r.tokens) for r in batch)
    same = all(a.tokens == b.tokens for a, b in zip(singles, batch, strict=True))
    print(
        f"batch of 8:   {tokens_batch / t_batch:6.1f} tok/s   8 single runs: {tokens_single / t_single:6.1f} tok/s   "
        f"ratio {tokens_batch / t_batch / (tokens_single / t_single):.2f}x   identical tokens: {same}"
    )

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from gguf_files import truncated_copy

    with tempfile.TemporaryDirectory() as tmp:
        big = plainllama.load(widened(os.path.join(tmp, "wide")), device="cpu")
        small_draft = plainllama.load(
            str(truncated_copy(default_model_path(), os.path.join(tmp, "draft6.gguf"), 6)), device="cpu"
        )
        for label, target, draft in (
            ("4x-wide target, default draft", big, llm),
            ("default target, 6-layer draft", llm, small_draft),
        ):
            for k in (2, 4, 6):
                plain, t_plain = timed(
                    lambda target=target: [target.generate(p, max_new_tokens=n) for p in PROMPTS[:4]]
                )
                fast, t_fast = timed(
                    lambda target=target, draft=draft, k=k: [
                        target.generate(p, max_new_tokens=n, draft=draft, speculate_k=k) for p in PROMPTS[:4]
                    ]
                )
                acceptance = sum(f.draft_acceptance for f in fast) / len(fast)
                same = all(a.tokens == b.tokens for a, b in zip(plain, fast, strict=True))
                print(
                    f"{label}, k={k}: acceptance {acceptance:5.1%}   speed-up {t_plain / t_fast:.2f}x   identical "
                    f"greedy output: {same}"
                )


if __name__ == "__main__":
    main()
