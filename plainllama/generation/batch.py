"""Several prompts at once: one forward pass per step for all of them.

Prompts of different lengths are left-padded to the longest; the model is told each row's padding,
so every row sees only its own tokens at its own positions, and each row stops on its own (a finished
row keeps riding along until the whole batch is done). Greedy results equal running each prompt alone.
"""

from __future__ import annotations

import time

import torch

from ..errors import PlainLlamaError
from .generate import GenerationState, check_prompt, device_and_dtype
from ..model import KVCache, Transformer
from ..sampling import Sampler, SamplingSettings


def generate_batch(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    settings: SamplingSettings,
    end_ids,
    stopped=None,
) -> list[GenerationState]:
    """`stopped(row, tokens) -> bool`: an extra per-row stop test (stop strings)."""
    if not prompts:
        raise PlainLlamaError("no prompts given")
    for ids in prompts:
        check_prompt(ids, model.args.context_length)
    B, longest = len(prompts), max(len(p) for p in prompts)
    budget = min(max_new_tokens, min(model.args.context_length - len(p) for p in prompts))
    device, dtype = device_and_dtype(model)
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    tokens = torch.tensor(
        [[0] * (longest - len(p)) + p for p in prompts], device=device
    )  # padding id is irrelevant: masked
    samplers = [Sampler(settings) for _ in prompts]  # one generator per row: as if each ran alone
    states = [GenerationState() for _ in prompts]
    for state, p in zip(states, prompts, strict=True):
        state.timings.prompt_tokens = len(p)
    if budget <= 0:
        for state in states:
            state.finish_reason = "length" if max_new_tokens == 0 else "context"
        return states
    cache = KVCache(model.args, B, longest + budget, dtype, device)
    active = list(range(B))
    with torch.inference_mode():
        start = time.perf_counter()
        logits = model(tokens, 0, cache, last_only=True, pad=pad)[:, -1]  # [B, V]
        prefill = time.perf_counter() - start
        pos = longest
        last = [0] * B
        while active:
            step_start = time.perf_counter()
            for row in list(active):
                state = states[row]
                token = samplers[row](logits[row], prompts[row] + state.tokens, state.tokens)
                if token in end_ids:
                    state.finish_reason = "stop"
                    active.remove(row)
                    continue
                state.tokens.append(token)
                last[row] = token
                if stopped is not None and stopped(row, state.tokens):
                    state.finish_reason = "stop"
                    active.remove(row)
                elif len(state.tokens) == budget:
                    state.finish_reason = "length" if budget == max_new_tokens else "context"
                    active.remove(row)
            if not active:
                break
            logits = model(torch.tensor([[t] for t in last], device=device), pos, cache, last_only=True, pad=pad)[:, -1]
            pos += 1
            elapsed = time.perf_counter() - step_start
            for row in active:
                states[row].timings.decode_seconds += elapsed
                states[row].timings.decode_steps += 1
    for state in states:
        state.timings.prefill_seconds = prefill
    return states
