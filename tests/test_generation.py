"""Sampling and the generation loop on the default model.

The oracle for greedy decoding is the model's own logits: each generated token must be the argmax of
a full forward pass over everything before it (no cache), so the cached loop is checked against
the uncached computation."""

import pytest
import torch

import plainllama
from gguf_files import write_llama_gguf
from plainllama import PlainLlamaError
from plainllama.sampling import Sampler

PROMPT = "Once upon a time, in a valley high in the Andes,"


def test_cached_greedy_loop_equals_uncached_argmax(llm):
    prompt_ids = llm.tokenizer.encode(PROMPT)
    out = llm.generate(PROMPT, max_new_tokens=12)
    assert len(out.tokens) == 12 and out.finish_reason == "length"
    full = llm.logits(prompt_ids + out.tokens)
    expected = full[len(prompt_ids) - 1 : -1].argmax(-1).tolist()
    assert out.tokens == expected


def test_seeded_sampling_is_reproducible(llm):
    settings = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=1234)
    a, b = llm.generate(PROMPT, **settings), llm.generate(PROMPT, **settings)
    assert a.tokens == b.tokens
    others = {tuple(llm.generate(PROMPT, **{**settings, "seed": s}).tokens) for s in range(4)}
    assert len(others) > 1  # different seeds do give different text at temperature 1


def test_top_k_1_equals_greedy(llm):
    greedy = llm.generate(PROMPT, max_new_tokens=16)
    top1 = llm.generate(PROMPT, max_new_tokens=16, temperature=1.5, top_k=1, seed=7)
    assert top1.tokens == greedy.tokens


def test_sampler_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    probs = logits.softmax(-1)  # [0.636, 0.234, 0.086, 0.032, 0.012]

    def kept(sampler):
        return torch.isfinite(sampler.filtered(logits)).nonzero().flatten().tolist()

    assert kept(Sampler(temperature=1.0, top_k=2)) == [0, 1]
    assert kept(Sampler(temperature=1.0, top_p=0.5)) == [0]  # the top token alone already holds 0.636
    assert kept(Sampler(temperature=1.0, top_p=0.8)) == [0, 1]  # 0.636 < 0.8 <= 0.870
    assert kept(Sampler(temperature=1.0, top_p=float(probs[:3].sum()) + 1e-4)) == [0, 1, 2, 3]
    # Temperature rescales the logits before the softmax.
    torch.testing.assert_close(Sampler(temperature=2.0).filtered(logits), logits / 2)
    # Draws follow the distribution: 4000 seeded draws at temperature 1 land near the probabilities.
    s = Sampler(temperature=1.0, seed=0)
    counts = torch.bincount(torch.tensor([s(logits) for _ in range(4000)]), minlength=5).float() / 4000
    assert (counts - probs).abs().max() < 0.03


@pytest.mark.parametrize(
    "settings, option",
    [
        (dict(temperature=-1.0), "--temperature"),
        (dict(temperature=1.0, top_p=0.0), "--top-p"),
        (dict(temperature=1.0, top_p=1.5), "--top-p"),
        (dict(temperature=1.0, top_k=0), "--top-k"),
    ],
)
def test_nonsense_settings_are_rejected(llm, settings, option):
    with pytest.raises(PlainLlamaError, match=option):
        llm.generate(PROMPT, max_new_tokens=4, **settings)


def test_stops_at_end_token(llm):
    # A chat turn: the instruct model answers and closes with <|im_end|>, which is not part of the text.
    prompt = "<|im_start|>user\nSay only the word yes.<|im_end|>\n<|im_start|>assistant\n"
    ids = llm.tokenizer.encode(prompt, parse_special=True)
    out = llm.generate(ids, max_new_tokens=64)
    assert out.finish_reason == "stop"
    assert not set(out.tokens) & llm.tokenizer.end_ids
    assert "<|im_end|>" not in out.text and out.text.strip()


def test_stream_pieces_add_up_to_the_result(llm):
    stream = llm.stream("Emoji are fun: 🦙🦙", max_new_tokens=24, temperature=0.8, seed=3)
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text
    assert stream.result.text == llm.tokenizer.decode(stream.result.tokens)
    assert stream.result.timings.prompt_tokens == len(llm.tokenizer.encode("Emoji are fun: 🦙🦙"))


def test_context_limit(tmp_path, vocab):
    # A model with a 64-token context (random weights) shows the limit without a long prefill.
    path = write_llama_gguf(
        tmp_path / "short-context.gguf", vocab, dim=64, n_heads=2, n_kv_heads=1, hidden_dim=128, context_length=64
    )
    small = plainllama.load(str(path), device="cpu")
    with pytest.raises(PlainLlamaError, match="64 tokens, but the model's context holds 64"):
        small.generate([504] * 64, max_new_tokens=4)
    # A prompt that leaves room for 3 tokens stops after 3, saying why, without an index error. The end
    # tokens are forbidden, so that a random model cannot end the text first.
    never_end = {token: -1e9 for token in small.tokenizer.end_ids}
    out = small.generate([504] * 61, max_new_tokens=10, logit_bias=never_end)
    assert out.finish_reason == "context" and len(out.tokens) == 3


def test_kv_cache_is_sized_to_the_request(llm, monkeypatch):
    from plainllama.generation import generate as generation

    sizes = []
    real = generation.KVCache

    def recording(args, batch, length, dtype, device):
        sizes.append(length)
        return real(args, batch, length, dtype, device)

    monkeypatch.setattr(generation, "KVCache", recording)
    llm.generate("Hi there", max_new_tokens=5)
    assert sizes == [len(llm.tokenizer.encode("Hi there")) + 5]
