"""Numerics against llama.cpp (through llama-cpp-python) on the same GGUF files.

llama.cpp multiplies quantized weights by activations that it quantizes to 8 bits on the fly, so on a
quantized file its logits differ from an exact float computation by up to ~1.5 (on logits of size
~30); the test therefore asks for the same predictions and a small mean difference. On float32
files both compute in float32 and agree closely; those files also carry what transformers' GGUF
loader ignores: rope_freqs (Llama 3.1 frequency scaling) and tied embeddings.
"""

import numpy as np
import pytest
import torch

import plainllama
from gguf_files import write_llama_gguf
from helpers import llama_cpp_logits, oracle
from plainllama.model import llama3_rope_factors

llama_cpp = oracle("llama_cpp", "llama-cpp-python is installed by `scripts/setup.sh --test`")


def test_default_model_agrees_with_llama_cpp(llm, model_path):
    text = "Llamas are members of the camelid family. They are social animals that live in herds, and"
    ids = llm.tokenizer.encode(text)
    ours, theirs = llm.logits(ids), llama_cpp_logits(model_path, ids)
    ours_top, their_top = ours.argmax(-1), theirs.argmax(-1)
    agree = (ours_top == their_top).float().mean().item()
    assert agree >= 0.75, f"top-1 agreement {agree:.2f}"
    # Where the two pick different tokens, it is a near-tie for both (measured: gaps under 0.06).
    for i in torch.nonzero(ours_top != their_top).flatten().tolist():
        a, b = ours_top[i], their_top[i]
        assert ours[i, a] - ours[i, b] < 0.2 and theirs[i, b] - theirs[i, a] < 0.2
    assert (ours - theirs).abs().mean().item() < 0.25
    # Probabilities of the next token: close in total variation despite the 8-bit activations.
    tv = 0.5 * (ours.softmax(-1) - theirs.softmax(-1)).abs().sum(-1).max().item()
    assert tv < 0.1, f"total variation {tv:.3f}"


@pytest.mark.parametrize("case", ["plain", "tied", "llama3_rope"])
def test_float32_model_matches_llama_cpp(tmp_path, vocab, case):
    kwargs = {}
    if case == "tied":
        kwargs["tied"] = True
    if case == "llama3_rope":
        # A short original context makes the scaling bite within a 120-token test.
        kwargs["rope_freqs"] = llama3_rope_factors(
            64, 10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context_length=64
        )
    path = write_llama_gguf(
        tmp_path / f"{case}.gguf", vocab, dim=128, n_heads=2, n_kv_heads=1, hidden_dim=256, **kwargs
    )
    model = plainllama.load(str(path), device="cpu", dtype="float32")
    ids = list(np.random.default_rng(0).integers(100, 40000, size=120))
    ours, theirs = model.logits(ids), llama_cpp_logits(path, ids)
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=1e-3)
