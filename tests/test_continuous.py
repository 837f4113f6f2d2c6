"""One decode step for separate sequences (engine/continuous.py, what the server's continuous batch
runs). The oracle is each sequence decoded alone by model.py's own loop (a single generation's
path: the decode step of decode_layer.c): a sequence's logits must be bit-for-bit the same alone
and in batches of 2, 5 and 16, whatever the other sequences are and wherever they are."""

import pytest
import torch

import plainllama
from plainllama.engine.continuous import SequenceCache, rows_can_step, step_alone, step_rows
from plainllama.model import KVCache

PROMPTS = ["The capital of France is", "Hello there, my name", "1 2 3 4 5 6 7", "Llamas are", "def main():"]
STEPS = 8


def prefilled(model, ids, length, cache_type):
    if cache_type is SequenceCache:
        cache = SequenceCache(model, length)
    else:
        cache = KVCache(model.args, 1, length, torch.float32, "cpu")
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
def packed():
    llm = plainllama.load()
    if not rows_can_step(llm.model):
        pytest.skip("the C kernels cannot run on this CPU (PLAINLLAMA_ISA or no AVX-512)")
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
