"""One decode step for separate sequences (engine/continuous.py, what the server's continuous batch
runs). The oracle is each sequence decoded alone by model.py's own loop (a single generation's
path: the decode step of decode_layer.c): a sequence's logits must be bit-for-bit the same alone
and in batches of 2, 5 and 16, whatever the other sequences are and wherever they are."""

import pytest
import torch

import plainllama
from plainllama.engine.continuous import (
    SequenceCache,
    can_prefill_together,
    prefill_rows,
    rows_can_step,
    step_alone,
    step_rows,
)
from plainllama.model import KVCache

PROMPTS = ["The capital of France is", "Hello there, my name", "1 2 3 4 5 6 7", "Llamas are", "def main():"]
STEPS = 8


def prefilled(model, ids, length, cache_type):
    if cache_type is SequenceCache:
        cache = SequenceCache(model, length)
    else:
        cache = KVCache(model.args, 1, length, model.kv_dtype or torch.float32, "cpu")  # as SequenceCache holds it
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), 0, cache, last_only=True)[0, -1]
    return cache, int(logits.argmax())


def alone(model, ids):
    """Greedy decoding of one sequence by model.py's loop: the logits of each step."""
    cache, token = prefilled(model, ids, len(ids) + STEPS, KVCache)
    out = []
    with torch.inference_mode():
        for i in range(STEPS):
            logits = model(torch.tensor([[token]]), len(ids) + i, cache, last_only=True)[0, -1]
            out.append(logits)
            token = int(logits.argmax())
    return torch.stack(out)


def together(model, batch, step, cache_type):
    """The same, for every sequence of `batch` at once through `step`: sequence 0's logits per step."""
    caches, tokens = zip(*(prefilled(model, ids, len(ids) + STEPS, cache_type) for ids in batch), strict=True)
    tokens, out = list(tokens), []
    for i in range(STEPS):
        logits = step(model, tokens, [len(ids) + i for ids in batch], list(caches))
        out.append(logits[0])
        tokens = [int(row.argmax()) for row in logits]
    return torch.stack(out)


@pytest.fixture(scope="module")
def packed(module_isa):
    """The default model with the kernels of each level this CPU runs (batch invariance is each
    level's own arithmetic)."""
    llm = plainllama.load()
    if not rows_can_step(llm.model):
        pytest.skip("the C kernels cannot run on this CPU (PLAINLLAMA_ISA or no AVX2)")
    return llm


@pytest.mark.parametrize("size", [1, 2, 5, 16])
def test_logits_do_not_depend_on_the_batch(packed, size):
    """Sequence 0 among size - 1 others (other prompts, so other positions): the logits of every step
    equal those of the sequence alone, bit for bit."""
    ids = [packed.tokenizer.encode(p) for p in PROMPTS]
    batch = [ids[0]] + [ids[1 + i % (len(ids) - 1)] for i in range(size - 1)]
    assert torch.equal(together(packed.model, batch, step_rows, SequenceCache), alone(packed.model, ids[0]))


def test_any_model_steps_each_sequence_alone(llm):
    """Float weights (no C layer step): step_alone gives model.py's logits in any company."""
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    expected = alone(llm.model, ids[0])
    assert torch.equal(together(llm.model, ids[:3], step_alone, KVCache), expected)


@pytest.mark.parametrize("align", [None, 32])
def test_prompt_chunks_prefilled_together_as_alone(packed, align):
    """prefill_rows: chunks of three prompts in one pass (one starting at 0, one continuing its cache at
    position 64, one of 9 tokens, the shortest that may join) give each chunk's last logits and its
    keys and values bit for bit as model.py's forward of that chunk alone (the scheduler's path).
    align None: the layout this CPU uses (chunks side by side; on AMX at multiples of 32 rows);
    32: the AMX layout, zero rows between chunks, checked on any CPU."""
    model = packed.model
    text = "The history of the llama begins in the Andes, where people kept them for wool and meat. " * 4
    ids = packed.tokenizer.encode(text)
    chunks = [ids[:12], ids[64:94], ids[5:14]]
    starts = [0, 64, 0]

    def fresh():
        caches = [SequenceCache(model, 128) for _ in chunks]
        with torch.inference_mode():
            model(torch.tensor([ids[:64]]), 0, caches[1])  # the second sequence's first 64 tokens
        return caches

    alone_caches, together_caches = fresh(), fresh()
    with torch.inference_mode():
        expected = torch.stack(
            [
                model(torch.tensor([c]), s, cache, last_only=True)[0, -1].float()
                for c, s, cache in zip(chunks, starts, alone_caches, strict=True)
            ]
        )
    got = prefill_rows(model, chunks, starts, together_caches, align=align)
    assert torch.equal(got, expected)
    for a, b in zip(alone_caches, together_caches, strict=True):
        for la, lb in zip(a.layers, b.layers, strict=True):
            assert torch.equal(la.k, lb.k) and torch.equal(la.v, lb.v)
    assert not can_prefill_together(8)


@pytest.mark.parametrize("extra", [3, 9, 40])
def test_prefix_cache_changes_no_number(packed, extra):
    """The server's engine (server/scheduler.py) with and without its prefix cache: a prompt that
    extends an earlier one by `extra` tokens gets the same tokens and bit-identical log-probabilities
    either way. With 3 new tokens past the last whole block the cache backs off a block (a 3-row
    chunk would be computed by the few-rows kernels, unlike the same rows in a fresh run)."""
    import queue

    from plainllama.server.scheduler import Job, Scheduler

    base = packed.tokenizer.encode("The history of the llama begins in the Andes, where " * 12)[:128]
    longer = base + packed.tokenizer.encode(" and then the llamas went on to the coast" * 5)[:extra]

    def run(engine, ids):
        events = queue.Queue()
        engine.submit(Job(ids, 6, packed.sampling_settings({"temperature": 0}), events.put, logprobs=2))
        tokens, logprobs = [], []
        while True:
            event = events.get(timeout=120)
            assert event.error is None
            if event.token is not None:
                tokens.append(event.token)
                logprobs.append((event.logprob.logprob, event.logprob.top))
            if event.finish_reason:
                return tokens, logprobs, event.cached_tokens

    cached, fresh = Scheduler(packed, prefix_cache_bytes=64 << 20), Scheduler(packed, prefix_cache_bytes=0)
    cached.start()
    fresh.start()
    try:
        run(cached, base)
        *with_cache, reused = run(cached, longer)
        *without, _ = run(fresh, longer)
    finally:
        cached.stop()
        fresh.stop()
    assert with_cache == without
    assert reused == (64 if extra <= 8 else 128)
