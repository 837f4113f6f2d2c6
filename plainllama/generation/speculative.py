"""Speculative decoding: a small draft model guesses K tokens, the target model checks them all in
one forward pass (Leviathan et al. 2023; Chen et al. 2023).

Each guess d_i, drawn from the draft's distribution q_i, is kept with probability
min(1, p_i(d_i) / q_i(d_i)), p_i being the target's distribution at that position. At the first
rejection, a token is drawn from the leftover mass max(0, p_i - q_i) instead, and the round ends; if
all K are kept, the target's next distribution gives one more token for free. Every token produced
this way is distributed exactly as if the target had sampled it alone, and with greedy decoding
(one-hot distributions) the output is the target's own greedy output, token for token.
"""

from __future__ import annotations

import time

import torch

from ..errors import PlainLlamaError
from .generate import GenerationState, budget_spent, check_prompt, device_and_dtype, take_token
from ..model import KVCache, Transformer
from ..sampling import Sampler


def accept_or_correct(p: torch.Tensor, q: torch.Tensor, drafted: list[int], sampler: Sampler) -> list[int]:
    """p: target distributions [K+1, V], q: draft distributions [K, V], drafted: K tokens.
    -> the tokens this round produces (the accepted prefix, then a correction or the bonus token)."""
    out = []
    for i, d in enumerate(drafted):
        ratio = p[i, d] / q[i, d] if q[i, d] > 0 else torch.tensor(0.0)
        if torch.rand((), generator=sampler.generator) < ratio:
            out.append(d)
            continue
        leftover = (p[i] - q[i]).clamp(min=0)
        total = leftover.sum()
        out.append(sampler.draw(leftover / total if total > 0 else p[i]))
        return out
    out.append(sampler.draw(p[len(drafted)]))
    return out


def speculative_tokens(
    target: Transformer,
    draft: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampler: Sampler,
    k: int,
    end_ids,
    state: GenerationState,
    logprobs: int | None = None,
):
    """Yields generated ids like generate_tokens, K+1 at most per target forward pass."""
    if k < 1:
        raise PlainLlamaError(f"--speculate-k must be >= 1, got {k}")
    context = min(target.args.context_length, draft.args.context_length)
    check_prompt(prompt_ids, context)
    budget = min(max_new_tokens, context - len(prompt_ids))
    t_device, t_dtype = device_and_dtype(target)
    d_device, d_dtype = device_and_dtype(draft)
    length = len(prompt_ids) + budget + k + 1
    t_cache = KVCache(target.args, 1, length, t_dtype, t_device)
    d_cache = KVCache(draft.args, 1, length, d_dtype, d_device)
    seq = list(prompt_ids)
    t_pos = d_pos = 0  # how much of `seq` each model's cache holds
    state.timings.prompt_tokens = len(prompt_ids)
    if budget <= 0:
        state.finish_reason = "length" if max_new_tokens == 0 else "context"
        return
    with torch.inference_mode():
        start = time.perf_counter()
        # The first token comes from the target alone (this is the prefill).
        logits = target(torch.tensor([seq], device=t_device), 0, t_cache, last_only=True)[0, -1]
        first = sampler.draw(sampler.distribution(logits, seq, state.tokens))
        t_pos = len(seq)
        state.timings.prefill_seconds = time.perf_counter() - start
        pending = [(first, logits)]
        while True:
            for token, token_logits in pending:
                if not take_token(state, token, token_logits, end_ids, logprobs):
                    return
                seq.append(token)
                yield token
                if budget_spent(state, budget, max_new_tokens):
                    return
            round_start = time.perf_counter()
            # 1. The draft guesses K tokens, first catching up on what it has not seen.
            drafted: list[int] = []
            q: list[torch.Tensor] = []
            feed = seq[d_pos:]
            for _ in range(k):
                d_logits = draft(torch.tensor([feed], device=d_device), d_pos, d_cache, last_only=True)[0, -1]
                d_pos += len(feed)
                q.append(sampler.distribution(d_logits, seq + drafted, state.tokens + drafted))
                drafted.append(sampler.draw(q[-1]))
                feed = drafted[-1:]
            # 2. The target scores all of them in one pass: [tokens it has not seen] + K guesses.
            new = seq[t_pos:] + drafted
            t_logits = target(torch.tensor([new], device=t_device), t_pos, t_cache)[0]  # [len(new), V]
            first_guess = len(new) - k - 1  # row whose logits predict drafted[0]
            rows = t_logits[first_guess:]  # [K+1, V]
            p = torch.stack(
                [sampler.distribution(rows[i], seq + drafted[:i], state.tokens + drafted[:i]) for i in range(k + 1)]
            )
            produced = accept_or_correct(p, torch.stack(q), drafted, sampler)
            accepted = len(produced) - 1
            state.draft_proposed += k
            state.draft_accepted += accepted
            # 3. Caches keep only what is now part of the text; stale entries get overwritten.
            t_pos = len(seq) + accepted
            d_pos = min(d_pos, len(seq) + accepted)
            pending = [(tok, rows[i]) for i, tok in enumerate(produced)]
            state.timings.decode_seconds += time.perf_counter() - round_start
            state.timings.decode_steps += len(produced)
