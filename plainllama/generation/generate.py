"""The generation loop: prefill the prompt once, then decode one token at a time from the KV cache.

    prompt ids --model--> logits of the last position --sampler--> next id --model--> ...

Prefill runs the whole prompt in one forward pass and leaves every position's keys and values in
the cache; each decode step then feeds a single token and reads the rest from the cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import PlainLlamaError
from ..model import KVCache, Transformer
from ..sampling import Sampler


def device_and_dtype(model: Transformer) -> tuple[torch.device, torch.dtype]:
    """Where the model computes, and the dtype its KV cache is held in: the one the engine chose
    (model.kv_dtype), else the model's own, its final norm's weight's, a plain tensor in every loading
    mode. (Not the embedding's: a compressed embedding's `.weight` is the whole table dequantized,
    gigabytes for a large vocabulary.)"""
    return model.norm.weight.device, model.kv_dtype or model.norm.weight.dtype


@dataclass
class Timings:
    prefill_seconds: float = 0.0  # prompt forward pass, until the first token is chosen
    decode_seconds: float = 0.0  # all later forward passes and samplings
    prompt_tokens: int = 0
    decode_steps: int = 0  # forward passes of one token each

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0

    def as_dict(self) -> dict:
        return {
            "prefill_seconds": round(self.prefill_seconds, 4),
            "prefill_tokens_per_second": round(self.prefill_tokens_per_second, 2),
            "decode_steps": self.decode_steps,
            "decode_seconds": round(self.decode_seconds, 4),
            "decode_tokens_per_second": round(self.decode_tokens_per_second, 2),
        }


@dataclass
class TokenLogprob:
    token: int
    logprob: float  # log-probability under the model's own distribution (before any sampling setting)
    top: list[tuple[int, float]]  # the N most likely tokens at this step, with theirs


@dataclass
class GenerationState:
    """What the loop has produced so far; complete once the iterator is exhausted."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = (
        None  # "stop" (an end token or stop string), "length" (the budget), "context" (the model's limit)
    )
    timings: Timings = field(default_factory=Timings)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    draft_proposed: int = 0  # speculative decoding: tokens the draft model proposed
    draft_accepted: int = 0  # ... and the target model accepted


def record_logprob(state: GenerationState, logits: torch.Tensor, token: int, n: int) -> None:
    logp = logits.float().log_softmax(-1)
    top = torch.topk(logp, n) if n else None
    alternatives = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
    state.logprobs.append(TokenLogprob(token, float(logp[token]), alternatives))


def take_token(state: GenerationState, token: int, logits: torch.Tensor, end_ids, logprobs: int | None) -> bool:
    """Add a chosen token to the result; False (and finish_reason "stop") if it is an end token,
    which is not part of the result. Shared by every single-sequence loop."""
    if token in end_ids:
        state.finish_reason = "stop"
        return False
    state.tokens.append(token)
    if logprobs is not None:
        record_logprob(state, logits, token, logprobs)
    return True


def budget_spent(state: GenerationState, budget: int, max_new_tokens: int) -> bool:
    """True once the result holds `budget` tokens: the asked-for number ("length"), or fewer when
    the model's context ran out first ("context")."""
    if len(state.tokens) < budget:
        return False
    state.finish_reason = "length" if budget == max_new_tokens else "context"
    return True


def check_prompt(prompt_ids: list[int], context_length: int) -> None:
    if not prompt_ids:
        raise PlainLlamaError("the prompt is empty (no tokens to start from)")
    if len(prompt_ids) >= context_length:
        raise PlainLlamaError(
            f"the prompt has {len(prompt_ids)} tokens, but the model's context holds {context_length}; shorten it"
        )


def generate_tokens(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampler: Sampler,
    end_ids,
    state: GenerationState,
    logprobs: int | None = None,
):
    """Yields generated token ids one at a time; `state` carries the outcome and timings.
    `logprobs`: record each token's log-probability and the N best alternatives (None: don't)."""
    args = model.args
    check_prompt(prompt_ids, args.context_length)
    if max_new_tokens < 0:
        raise PlainLlamaError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    budget = min(max_new_tokens, args.context_length - len(prompt_ids))
    device, dtype = device_and_dtype(model)
    # The cache holds exactly what this request can reach, not the model's whole context: 8192
    # positions of a large model would cost gigabytes for a 20-token answer.
    cache = KVCache(args, batch=1, length=len(prompt_ids) + budget, dtype=dtype, device=device)
    timings = state.timings
    timings.prompt_tokens = len(prompt_ids)
    if budget == 0:
        state.finish_reason = "length" if max_new_tokens == 0 else "context"
        return
    with torch.inference_mode():
        start = time.perf_counter()
        tokens = torch.tensor([prompt_ids], device=device)
        logits = model(tokens, start_pos=0, cache=cache, last_only=True)[0, -1]  # [V]
        history = list(prompt_ids)
        next_id = sampler(logits, history, state.tokens)
        timings.prefill_seconds = time.perf_counter() - start
        pos = len(prompt_ids)
        while True:
            if not take_token(state, next_id, logits, end_ids, logprobs):
                return
            history.append(next_id)
            yield next_id
            if budget_spent(state, budget, max_new_tokens):
                return
            step_start = time.perf_counter()
            logits = model(torch.tensor([[next_id]], device=device), start_pos=pos, cache=cache, last_only=True)[0, -1]
            next_id = sampler(logits, history, state.tokens)
            timings.decode_seconds += time.perf_counter() - step_start
            timings.decode_steps += 1
            pos += 1
