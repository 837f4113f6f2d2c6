"""Logits -> next token id.

temperature 0 is greedy decoding (always the most likely token). Otherwise the logits are divided by
the temperature (below 1 sharpens the distribution, above 1 flattens it), cut to the `top_k` most
likely tokens and to the smallest set whose probabilities add up to `top_p` (nucleus sampling), and
one token is drawn. A seed makes the draws repeatable.
"""

from __future__ import annotations

import torch

from .errors import PlainLlamaError


class Sampler:
    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None):
        if temperature < 0:
            raise PlainLlamaError(f"--temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise PlainLlamaError(f"--top-k must be >= 1, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise PlainLlamaError(f"--top-p must be in (0, 1], got {top_p}")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    def filtered_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Temperature, then top-k, then top-p, on float32 logits [V]; removed tokens get -inf."""
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth_best = torch.topk(logits, self.top_k).values[-1]
            logits = logits.masked_fill(logits < kth_best, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            # Drop a token when the ones before it already reach top_p; the most likely always stays.
            drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= self.top_p
            logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
        return logits

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [V] (any dtype, any device) -> token id."""
        logits = logits.float().cpu()  # sampling a single row is cheap anywhere; the generator lives on the CPU
        if self.temperature == 0:
            return int(torch.argmax(logits))
        probs = self.filtered_logits(logits).softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
