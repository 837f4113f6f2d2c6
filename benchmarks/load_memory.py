"""Peak memory while loading, against the size of the weights in the target dtype.

    .venv/bin/python benchmarks/load_memory.py [--dim 2048 --layers 8]

Writes a random-weight Llama checkpoint (bfloat16, like Meta's and most HF uploads) in Meta and HF
format, then, each in a fresh process, loads it with plainllama in bfloat16 and in float32 and runs
one forward pass. Reported: peak RSS (VmHWM) minus the process's RSS before loading (torch
imported), next to the weights' size in that dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

# Peak RSS from /proc (VmHWM), not ru_maxrss: a child process inherits its parent's ru_maxrss.
CHILD = r"""
import json, sys, torch
import plainllama
def kib(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
baseline = kib("VmRSS")
llm = plainllama.load(sys.argv[1], device="cpu", dtype=sys.argv[2])
llm.logits([1, 2, 3])  # reads every layer and the output matrix; logits stay small
peak = kib("VmHWM")
weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in llm.model.parameters()}.values())
print(json.dumps({"peak_mib": (peak - baseline) / 1024, "weights_mib": weights / 2**20}))
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()

    from plainllama.formats.meta import feed_forward_width

    hidden = feed_forward_width(args.dim, 256, None)
    folder = tempfile.mkdtemp(prefix="plainllama-mem-")
    vocab = 128256  # Llama 3's: the tokenizer.model that ships with llama-models is used
    state = {
        "tok_embeddings.weight": torch.randn(vocab, args.dim) * 0.02,
        "norm.weight": torch.ones(args.dim),
        "output.weight": torch.randn(vocab, args.dim) * 0.02,
    }
    for i in range(args.layers):
        p = f"layers.{i}."
        for name, shape in (
            ("attention.wq", (args.dim, args.dim)),
            ("attention.wk", (args.dim, args.dim)),
            ("attention.wv", (args.dim, args.dim)),
            ("attention.wo", (args.dim, args.dim)),
            ("feed_forward.w1", (hidden, args.dim)),
            ("feed_forward.w2", (args.dim, hidden)),
            ("feed_forward.w3", (hidden, args.dim)),
        ):
            state[p + name + ".weight"] = torch.randn(shape) * 0.02
        state[p + "attention_norm.weight"] = torch.ones(args.dim)
        state[p + "ffn_norm.weight"] = torch.ones(args.dim)
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    n_heads = args.dim // 64
    meta = os.path.join(folder, "meta")
    os.makedirs(meta)
    torch.save(state, os.path.join(meta, "consolidated.00.pth"))
    json.dump(
        {
            "dim": args.dim,
            "n_layers": args.layers,
            "n_heads": n_heads,
            "vocab_size": vocab,
            "multiple_of": 256,
            "norm_eps": 1e-5,
        },
        open(os.path.join(meta, "params.json"), "w"),
    )
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from meta_files import llama3_tokenizer_model  # any tokenizer.model serves; this one ships with llama-models

    os.symlink(llama3_tokenizer_model(), os.path.join(meta, "tokenizer.model"))

    hf = os.path.join(folder, "hf")
    subprocess.run(
        [sys.executable, "-m", "plainllama", "convert", meta, hf, "--to", "hf"], check=True, capture_output=True
    )

    print(f"model: dim {args.dim}, {args.layers} layers, vocab {vocab}; files in {folder}")
    print(f"{'format':<8}{'load as':<10}{'weights MiB':>13}{'peak RSS MiB':>14}{'ratio':>8}")
    for fmt, path in (("meta", meta), ("hf", hf)):
        for dtype in ("bfloat16", "float32"):
            out = subprocess.run([sys.executable, "-c", CHILD, path, dtype], check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            ratio = r["peak_mib"] / r["weights_mib"]
            print(f"{fmt:<8}{dtype:<10}{r['weights_mib']:>13.0f}{r['peak_mib']:>14.0f}{ratio:>8.2f}")


if __name__ == "__main__":
    main()
