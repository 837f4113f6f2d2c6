"""Numerics against Hugging Face transformers loading the same GGUF file in float32.

transformers dequantizes GGUF tensors with the `gguf` package and runs its own LlamaForCausalLM;
both sides then compute in float32, so logits agree to float rounding.
"""

import pytest
import torch

import plainllama
from conftest import hf_load_gguf
from gguf_files import write_llama_gguf

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Llamas are members of the camelid family. They live in the Andes, where they",
    "1, 2, 3, 5, 8, 13,",
    "<|im_start|>user\nWhat is 7 times 6?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_hf_transformers(llm, hf_model, prompt):
    ids = llm.tokenizer.encode(prompt, parse_special=True)
    ours = llm.logits(ids)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0].float()
    assert ours.shape == theirs.shape == (len(ids), llm.args.vocab_size)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_greedy_continuation_matches_hf_transformers(llm, hf_model, prompt):
    ids = llm.tokenizer.encode(prompt, parse_special=True)
    ours = llm.generate(ids, max_new_tokens=48)
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]),
            max_new_tokens=48,
            do_sample=False,
            eos_token_id=sorted(llm.tokenizer.end_ids),
            pad_token_id=2,
        )
    theirs = out[0, len(ids) :].tolist()
    theirs = [t for t in theirs if t not in llm.tokenizer.end_ids]
    assert len(ours.tokens) >= 32 or ours.finish_reason == "stop"
    assert ours.tokens == theirs


# Every tensor type plainllama reads, in a small random-weight model (dims multiple of 256 so the
# K formats fit), against transformers reading the same file.
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("type_name", TYPES)
def test_every_tensor_type_matches_hf_transformers(tmp_path, vocab, type_name):
    path = write_llama_gguf(
        tmp_path / f"tiny-{type_name}.gguf",
        vocab,
        matrix_type=type_name,
        embedding_type="Q8_0",
        tied=type_name in ("Q4_K", "F16"),
    )
    ours_llm = plainllama.load(str(path), device="cpu", dtype="float32")
    hf = hf_load_gguf(path)
    ids = ours_llm.tokenizer.encode("Random weights still have exact arithmetic.")
    ours = ours_llm.logits(ids)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype, max_tv", [("bfloat16", 0.1), ("float16", 0.02)])
def test_half_precisions_stay_close_to_hf_float32(hf_model, dtype, max_tv):
    """bfloat16 keeps 8 bits of mantissa, float16 11: the next-token distributions must stay within
    a small total variation of transformers' float32 ones (measured: 0.04 and 0.006)."""
    half = plainllama.load(device="cpu", dtype=dtype)
    assert half.model.output.weight.dtype == getattr(torch, dtype)
    ids = half.tokenizer.encode(PROMPTS[2])
    ours = half.logits(ids)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0].float()
    tv = 0.5 * (ours.softmax(-1) - theirs.softmax(-1)).abs().sum(-1).max().item()
    assert tv < max_tv
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.9
