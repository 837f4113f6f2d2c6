"""Logits -> next token id.

The logits of the last position go through these steps, in this order (transformers' order):

  logit bias          add a fixed amount to chosen tokens
  repetition penalty  make every token already in the text less likely (divide a positive logit,
                      multiply a negative one, by the penalty)
  frequency/presence  subtract penalty x (times the token was generated) and penalty x (was it at all)
  temperature         divide by T: below 1 sharpens the distribution, above 1 flattens it
  top-k               keep the k most likely tokens
  top-p (nucleus)     keep the most likely tokens until their probability reaches p
  min-p               keep tokens at least min_p times as likely as the most likely one
  typical-p           keep the tokens whose surprise is closest to the distribution's entropy,
                      until they hold typical_p of the probability

then one token is drawn (temperature 0 means greedy: the most likely token after the penalties).
A seed makes the draws repeatable.
"""

from __future__ import annotations


import torch

from .sampling_settings import SamplingSettings

NEG_INF = float("-inf")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    picked = logits[seen]
    return logits.scatter(0, seen, torch.where(picked > 0, picked / penalty, picked * penalty))


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k >= logits.shape[-1]:
        return logits
    kth_best = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth_best, NEG_INF)


def keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop the least likely tokens while their combined probability stays within 1 - p."""
    if p >= 1:
        return logits
    ascending, order = torch.sort(logits)
    tail_mass = ascending.softmax(-1).cumsum(-1)
    drop = tail_mass <= 1 - p
    drop[-1] = False  # the most likely token always stays
    return logits.masked_fill(drop.scatter(0, order, drop), NEG_INF)


def keep_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    probs = logits.softmax(-1)
    drop = probs < min_p * probs.max()
    drop[probs.argmax()] = False
    return logits.masked_fill(drop, NEG_INF)


def keep_typical(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2022)."""
    if mass >= 1:
        return logits
    logp = logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).nansum()
    distance = (-logp - entropy).abs()  # how far each token's surprise is from the average surprise
    closest, order = torch.sort(distance)
    cumulative = logits[order].softmax(-1).cumsum(-1)
    last = min(int((cumulative < mass).sum()), logits.shape[-1] - 1)
    drop = closest > closest[last]
    drop[0] = False
    return logits.masked_fill(drop.scatter(0, order, drop), NEG_INF)


class Sampler:
    def __init__(self, settings: SamplingSettings | None = None, **overrides):
        self.settings = settings or SamplingSettings(**overrides)
        self.settings.check()
        self.generator = torch.Generator()
        if self.settings.seed is not None:
            self.generator.manual_seed(self.settings.seed)
        else:
            self.generator.seed()

    @property
    def greedy(self) -> bool:
        return self.settings.temperature == 0

    def penalized(self, logits: torch.Tensor, history=(), generated=()) -> torch.Tensor:
        """Bias and penalties, on float32 logits [V]. `history`: every token so far (prompt and
        generated), for the repetition penalty; `generated`: the generated ones, for frequency and
        presence penalties."""
        s = self.settings
        if s.logit_bias:
            ids = torch.tensor(list(s.logit_bias), dtype=torch.long)
            logits = logits.index_add(0, ids, torch.tensor(list(s.logit_bias.values()), dtype=logits.dtype))
        if s.repetition_penalty not in (None, 1.0) and len(history):
            logits = apply_repetition_penalty(
                logits, torch.tensor(sorted(set(history)), dtype=torch.long), s.repetition_penalty
            )
        if (s.frequency_penalty or s.presence_penalty) and len(generated):
            counts = torch.bincount(torch.tensor(list(generated), dtype=torch.long), minlength=logits.shape[-1]).to(
                logits.dtype
            )
            logits = logits - s.frequency_penalty * counts - s.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

    def filtered(self, logits: torch.Tensor) -> torch.Tensor:
        """Temperature and the truncations (top-k, top-p, min-p, typical-p); removed tokens get -inf."""
        s = self.settings
        if s.temperature not in (0, 1):
            logits = logits / s.temperature
        if s.top_k is not None:
            logits = keep_top_k(logits, s.top_k)
        if s.top_p is not None:
            logits = keep_top_p(logits, s.top_p)
        if s.min_p is not None:
            logits = keep_min_p(logits, s.min_p)
        if s.typical_p is not None:
            logits = keep_typical(logits, s.typical_p)
        return logits

    def distribution(self, logits: torch.Tensor, history=(), generated=()) -> torch.Tensor:
        """The probabilities the next token is drawn from: float32 [V] (one-hot when greedy)."""
        logits = self.penalized(logits.float().cpu(), history, generated)
        if self.greedy:
            return torch.nn.functional.one_hot(logits.argmax(), logits.shape[-1]).float()
        return self.filtered(logits).softmax(-1)

    def __call__(self, logits: torch.Tensor, history=(), generated=()) -> int:
        """logits [V] (any dtype, any device) -> token id."""
        logits = self.penalized(logits.float().cpu(), history, generated)
        if self.greedy:
            return int(torch.argmax(logits))
        return int(torch.multinomial(self.filtered(logits).softmax(-1), 1, generator=self.generator))

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.generator))
