"""Our rotary settings (per-frequency divisors) -> the way HF's config.json and Meta's params.json
spell them. GGUF files store Llama 3.1's scaling only as divisors, so its parameters are
recovered by checking which of the published settings reproduces them exactly."""

from __future__ import annotations

from ..errors import PlainLlamaError
from ..model import ModelArgs, llama3_rope_factors

# (factor, low_freq_factor, high_freq_factor, original context): Llama 3.1/3.3, Llama 3.2.
PUBLISHED_LLAMA3_SCALINGS = [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192)]


def describe_rope(args: ModelArgs, hint: dict | None = None) -> dict | None:
    """None for plain RoPE, else {"rope_type": "linear"|"llama3", ...} as in HF's config.json."""
    factors = args.rope_freq_factors
    if factors is None:
        return None
    if len(set(factors)) == 1:
        return {"rope_type": "linear", "factor": factors[0]}
    candidates = [hint] if hint else []
    candidates += [
        dict(factor=f, low_freq_factor=lo, high_freq_factor=hi, original_max_position_embeddings=ctx)
        for f, lo, hi, ctx in PUBLISHED_LLAMA3_SCALINGS
    ]
    for c in candidates:
        again = llama3_rope_factors(
            args.head_dim,
            args.rope_theta,
            c["factor"],
            c["low_freq_factor"],
            c["high_freq_factor"],
            c["original_max_position_embeddings"],
        )
        if all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(again, factors, strict=True)):
            return {"rope_type": "llama3", **c}
    raise PlainLlamaError(
        "this model's rotary frequency scaling matches no Llama 3 setting, so it cannot be written as a config"
    )
