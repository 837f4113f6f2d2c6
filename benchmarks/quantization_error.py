"""What keeping weights compressed costs in accuracy: perplexity of the default model on a fixed
text, and the distance of its next-token distributions from the float32 run.

    .venv/bin/python benchmarks/quantization_error.py

Rows: the GGUF file dequantized to float32 (the reference); the same file run as stored (Q4_1/Q8_0
blocks, int8 activations, the default on a CPU); and the float32 weights of that file written as a
Hugging Face folder and loaded with --quantize int8 and int4 (the cost of quantizing a float model).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile

import torch

import plainllama
from plainllama.default_model import default_model_path

TEXT_FILE = os.path.join(os.path.dirname(__file__), "..", "README.md")


def evaluate(llm, ids, reference=None):
    logits = llm.logits(ids)  # [T, V]
    logprobs = logits.float().log_softmax(-1)
    nll = -logprobs[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).mean().item()
    tv = None
    if reference is not None:
        tv = 0.5 * (logprobs.exp() - reference.exp()).abs().sum(-1)
    return math.exp(nll), logprobs, tv


def main():
    path = default_model_path()
    reference_llm = plainllama.load(path, device="cpu", dtype="float32")
    ids = reference_llm.tokenizer.encode(open(TEXT_FILE, encoding="utf-8").read())[:1024]
    ppl, reference, _ = evaluate(reference_llm, ids)
    rows = [("GGUF dequantized to float32 (reference)", ppl, None)]
    ppl, _, tv = evaluate(plainllama.load(path, device="cpu"), ids, reference)
    rows.append(("GGUF as stored (Q4_1 + Q8_0, int8 activations)", ppl, tv))
    with tempfile.TemporaryDirectory() as folder:
        hf = os.path.join(folder, "hf")
        subprocess.run(
            [sys.executable, "-m", "plainllama", "convert", path, hf, "--to", "hf", "--dtype", "float32"], check=True
        )
        ppl, _, tv = evaluate(plainllama.load(hf, device="cpu", dtype="float32"), ids, reference)
        rows.append(("HF folder float32", ppl, tv))
        for mode in ("int8", "int4"):
            ppl, _, tv = evaluate(plainllama.load(hf, device="cpu", quantize=mode), ids, reference)
            rows.append((f"HF folder --quantize {mode}", ppl, tv))
    print(f"{len(ids)} tokens of README.md; total variation from the float32 run's next-token distribution")
    print(f"{'weights':<50}{'perplexity':>12}{'TV mean':>10}{'TV max':>10}")
    for name, ppl, tv in rows:
        extra = f"{tv.mean().item():>10.4f}{tv.max().item():>10.4f}" if tv is not None else f"{'-':>10}{'-':>10}"
        print(f"{name:<50}{ppl:>12.3f}{extra}")


if __name__ == "__main__":
    main()
