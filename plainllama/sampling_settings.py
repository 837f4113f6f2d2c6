"""The sampling settings of one generation (what sampling.py's Sampler applies), checked. Kept apart
from sampling.py, which needs PyTorch, so that the command line builds its flags from these fields
(cli/options.py) without importing it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from .errors import PlainLlamaError

MIN_TEMPERATURE = 1e-4


def _setting(default, type, help: str, factory=None):
    """A sampling setting: its default, and its command-line type and help (cli/options.py builds
    the flags from these fields, so a setting is named in one place)."""
    metadata = {"type": type, "help": help}
    return field(default_factory=factory, metadata=metadata) if factory else field(default=default, metadata=metadata)


@dataclass
class SamplingSettings:
    temperature: float = _setting(0.0, float, "0 is greedy (the default); higher is more random")
    top_k: int | None = _setting(None, int, "sample only from the k most likely tokens")
    top_p: float | None = _setting(
        None, float, "sample only from the smallest set of tokens with this much probability"
    )
    min_p: float | None = _setting(None, float, "drop tokens less likely than this fraction of the most likely one")
    typical_p: float | None = _setting(None, float, "locally typical sampling with this probability mass")
    repetition_penalty: float | None = _setting(None, float, "above 1 discourages tokens already in the text")
    frequency_penalty: float = _setting(0.0, float, "subtract this times each token's count so far")
    presence_penalty: float = _setting(0.0, float, "subtract this from every token generated so far")
    logit_bias: dict[int, float] = _setting(
        None, dict, "ID:BIAS[,ID:BIAS...] added to those tokens' logits", factory=dict
    )
    seed: int | None = _setting(None, int, "make sampling repeatable")

    def check(self, vocab_size: int | None = None) -> None:
        for name in (setting.name for setting in fields(self) if setting.metadata["type"] is float):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise PlainLlamaError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if self.temperature < 0 or 0 < self.temperature < MIN_TEMPERATURE:
            # dividing logits by a tinier temperature overflows them to infinity
            raise PlainLlamaError(
                f"--temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {self.temperature}"
            )
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise PlainLlamaError(f"--seed must be between 0 and 2**64 - 1, got {self.seed}")
        if self.top_k is not None and self.top_k < 1:
            raise PlainLlamaError(f"--top-k must be >= 1, got {self.top_k}")
        for name, value in (("--top-p", self.top_p), ("--typical-p", self.typical_p)):
            if value is not None and not 0 < value <= 1:
                raise PlainLlamaError(f"{name} must be in (0, 1], got {value}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise PlainLlamaError(f"--min-p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise PlainLlamaError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")
        for token, bias in self.logit_bias.items():
            if vocab_size is not None and not 0 <= token < vocab_size:
                raise PlainLlamaError(f"--logit-bias: token id {token} is outside the vocabulary of {vocab_size}")
            if not math.isfinite(bias):
                raise PlainLlamaError(f"--logit-bias: the bias of token {token} must be a finite number, got {bias}")
