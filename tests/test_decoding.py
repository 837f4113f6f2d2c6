"""Decoding beyond greedy, against Hugging Face transformers: beam search against
generate(num_beams=...), every sampler against transformers' logits processors/warpers, log-probs
against transformers' logits; batches and speculative decoding against plain generation."""

import subprocess
import sys

import pytest
import torch

import plainllama
from gguf_files import truncated_copy
from plainllama import PlainLlamaError
from plainllama.sampling import Sampler, SamplingSettings
from plainllama.generation.speculative import accept_or_correct
from helpers import oracle

transformers = oracle("transformers")

PROMPTS = ["The capital of France is", "Llamas are members of the camelid family. They", "def add(a, b):"]


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize(
    "settings",
    [
        dict(num_beams=3, length_penalty=1.0),
        dict(num_beams=4, length_penalty=0.0, num_return=2),
        dict(num_beams=3, length_penalty=2.0, early_stopping=True),
        dict(num_beams=3, no_repeat_ngram_size=2),
    ],
)
def test_beam_search_matches_transformers(llm, hf_model, prompt, settings):
    ids = llm.tokenizer.encode(prompt)
    num_return = settings.get("num_return", 1)
    ours = llm.beam_search(ids, max_new_tokens=16, **settings)
    hf_settings = {k: v for k, v in settings.items() if k != "num_return"}
    out = hf_model.generate(
        torch.tensor([ids]),
        max_new_tokens=16,
        do_sample=False,
        num_return_sequences=num_return,
        eos_token_id=sorted(llm.tokenizer.end_ids),
        pad_token_id=2,
        output_scores=True,
        return_dict_in_generate=True,
        **hf_settings,
    )
    assert len(ours) == num_return
    for beam, sequence, score in zip(ours, out.sequences, out.sequences_scores, strict=True):
        theirs = sequence[len(ids) :].tolist()
        assert beam.tokens == theirs[: len(beam.tokens)]
        assert all(t == 2 for t in theirs[len(beam.tokens) :])  # transformers pads finished beams
        assert beam.score == pytest.approx(float(score), abs=1e-3)


# --- samplers: our filtered distributions against transformers' processors ---


def hf_processed(logits: torch.Tensor, history: list[int], **settings) -> torch.Tensor:
    from transformers.generation import logits_process as lp

    steps = []
    if settings.get("repetition_penalty"):
        steps.append(lp.RepetitionPenaltyLogitsProcessor(settings["repetition_penalty"]))
    if settings.get("temperature", 1.0) != 1.0:
        steps.append(lp.TemperatureLogitsWarper(settings["temperature"]))
    if settings.get("top_k"):
        steps.append(lp.TopKLogitsWarper(settings["top_k"]))
    if settings.get("top_p") is not None:
        steps.append(lp.TopPLogitsWarper(settings["top_p"]))
    if settings.get("min_p") is not None:
        steps.append(lp.MinPLogitsWarper(settings["min_p"]))
    if settings.get("typical_p") is not None:
        steps.append(lp.TypicalLogitsWarper(settings["typical_p"]))
    scores = logits[None].clone()
    input_ids = torch.tensor([history])
    for step in steps:
        scores = step(input_ids, scores)
    return scores[0]


SAMPLER_SETTINGS = [
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=20),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=0.8, top_p=0.5),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=1.0, typical_p=0.8),
    dict(temperature=1.0, typical_p=0.2),
    dict(temperature=1.0, repetition_penalty=1.3),
    dict(temperature=0.9, repetition_penalty=1.2, top_k=50, top_p=0.9, min_p=0.02),
]


@pytest.mark.parametrize("settings", SAMPLER_SETTINGS, ids=[str(s) for s in SAMPLER_SETTINGS])
def test_filtered_distribution_matches_transformers(llm, settings):
    ids = llm.tokenizer.encode(
        "The llama is a domesticated South American camelid, widely used as a meat and pack animal by"
    )
    logits = llm.logits(ids)[-1]  # real next-token logits of the default model
    history = ids[-20:]
    sampler = Sampler(SamplingSettings(**settings))
    ours = sampler.filtered(sampler.penalized(logits, history, ()))
    theirs = hf_processed(logits, history, **settings)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))  # the same tokens survive
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1), atol=1e-6, rtol=1e-5)


def test_frequency_presence_penalties_and_logit_bias():
    # OpenAI's definition: logit - count * frequency_penalty - (count > 0) * presence_penalty
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    s = Sampler(SamplingSettings(frequency_penalty=0.5, presence_penalty=0.25, logit_bias={0: 10.0}))
    out = s.penalized(logits, history=[3, 3, 1], generated=[3, 3, 1])
    torch.testing.assert_close(out, torch.tensor([11.0, 2.0 - 0.5 - 0.25, 3.0, 4.0 - 1.0 - 0.25]))
    assert Sampler(SamplingSettings(logit_bias={2: 100.0}))(logits) == 2  # greedy follows the bias


# --- batches, speculation, stop strings, log-probabilities ---


def test_batch_of_prompts_equals_one_by_one(llm):
    prompts = PROMPTS + ["Once upon a time, in a valley high in the Andes, there lived", "1, 2, 3,"]
    batch = llm.generate_batch(prompts, max_new_tokens=20)
    for prompt, result in zip(prompts, batch, strict=True):
        alone = llm.generate(prompt, max_new_tokens=20)
        assert result.tokens == alone.tokens, prompt
        assert result.finish_reason == alone.finish_reason and result.text == alone.text


def test_batch_rows_stop_on_their_own(llm):
    chat = llm.encode_chat([{"role": "user", "content": "Say only the word yes."}])
    prompts = [chat, "Once upon a time"]
    results = llm.generate_batch(prompts, max_new_tokens=64)
    assert results[0].finish_reason == "stop" and results[1].finish_reason == "length"
    assert len(results[0].tokens) < len(results[1].tokens) == 64
    assert results[0].tokens == llm.generate(chat, max_new_tokens=64).tokens


@pytest.fixture(scope="module")
def draft(model_path, tmp_path_factory):
    path = truncated_copy(model_path, tmp_path_factory.mktemp("draft") / "draft-6-layers.gguf", 6)
    return plainllama.load(str(path), device="cpu", dtype="float32")


@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_greedy_equals_target_alone(llm, draft, k):
    for prompt in PROMPTS:
        alone = llm.generate(prompt, max_new_tokens=30)
        fast = llm.generate(prompt, max_new_tokens=30, draft=draft, speculate_k=k)
        assert fast.tokens == alone.tokens and fast.text == alone.text
        assert 0 <= fast.draft_acceptance <= 1
    # The target drafting for itself accepts everything.
    assert llm.generate(PROMPTS[0], max_new_tokens=20, draft=llm, speculate_k=4).draft_acceptance == 1.0


def test_speculative_sampling_follows_the_target_distribution():
    """The accept/reject rule on a 5-token vocabulary: whatever the draft proposes, the produced
    token is distributed as the target's p (20,000 seeded rounds, each frequency within 0.015)."""
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.1, 0.1, 0.2, 0.3, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.1, 0.1, 0.2, 0.5], [0.6, 0.1, 0.1, 0.1, 0.1]])  # a poor draft
    sampler = Sampler(SamplingSettings(temperature=1.0, seed=0))
    first, second = torch.zeros(5), torch.zeros(5)
    rounds, both = 20_000, 0
    for _ in range(rounds):
        drafted = [sampler.draw(q[0]), sampler.draw(q[1])]
        out = accept_or_correct(p, q, drafted, sampler)
        first[out[0]] += 1
        if len(out) > 1:  # the first guess was accepted, so the second position is p[1]'s
            second[out[1]] += 1
            both += 1
    assert (first / rounds - p[0]).abs().max() < 0.015
    assert both > 2000 and (second / both - p[1]).abs().max() < 0.03


def test_stop_strings_across_token_boundaries(llm):
    full = llm.generate("The capital of France is", max_new_tokens=30)
    assert full.text.startswith(" Paris.\n\nThe answer is")
    # "s.\n\nTh" spans at least three tokens (" Paris", ".", "\n\n", "The").
    stopped = llm.generate("The capital of France is", max_new_tokens=30, stop=["s.\n\nTh"])
    assert stopped.text == " Pari" and stopped.finish_reason == "stop"
    streamed = "".join(llm.stream("The capital of France is", max_new_tokens=30, stop=["xyz", "answer"]))
    assert streamed == " Paris.\n\nThe "
    batch = llm.generate_batch(["The capital of France is"], max_new_tokens=30, stop=["answer"])
    assert batch[0].text == " Paris.\n\nThe " and batch[0].finish_reason == "stop"


def test_logprobs_match_transformers(llm, hf_model):
    ids = llm.tokenizer.encode(PROMPTS[1])
    out = llm.generate(ids, max_new_tokens=8, logprobs=5)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids + out.tokens])).logits[0, len(ids) - 1 : -1].float().log_softmax(-1)
    for step, lp in enumerate(out.logprobs):
        assert lp.token == out.tokens[step]
        assert lp.logprob == pytest.approx(float(theirs[step, lp.token]), abs=1e-3)
        assert [t for t, _ in lp.top] == torch.topk(theirs[step], 5).indices.tolist()
        assert lp.top[0][0] == lp.token  # greedy picks the most likely


@pytest.mark.parametrize(
    "args, option",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "1.5"], "--top-p"),
        (["--beams", "0"], "--beams"),
        (["--min-p", "2"], "--min-p"),
        (["--typical-p", "0"], "--typical-p"),
        (["--repetition-penalty", "0"], "--repetition-penalty"),
        (["--logit-bias", "999999:1"], "--logit-bias"),
        (["--beams", "2", "--num-return", "3"], "--num-return"),
        (["--speculate-k", "0", "--draft-model", "DRAFT"], "--speculate-k"),
    ],
)
def test_nonsense_settings_are_rejected_naming_the_option(args, option, draft):
    args = [draft.checkpoint.path if a == "DRAFT" else a for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "plainllama", "generate", "hi", "-n", "2", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert option in result.stderr


def test_draft_with_another_vocabulary_is_rejected(llm, tmp_path, vocab):
    from gguf_files import write_llama_gguf

    other = dict(vocab, tokens=vocab["tokens"][:-1] + ["<|a different token|>"])
    path = write_llama_gguf(tmp_path / "other.gguf", other, dim=64, n_heads=2, hidden_dim=128)
    with pytest.raises(PlainLlamaError, match="vocabulary differs"):
        llm.generate("hi", draft=plainllama.load(str(path), device="cpu"))
