"""The Llama transformer: token ids in, next-token logits out.

Read it beside the paper and Meta's reference (llama_models/llama3/model.py): the module names are
Meta's, so a checkpoint's `layers.3.attention.wo.weight` is `model.layers[3].attention.wo.weight`
here, except that wq, wk, wv are stacked into one `wqkv` and w1, w3 into `w13` (`fused_name`). This
file knows nothing about file formats, devices or quantization: a loader hands it a `ModelArgs` and a
state dict in this naming, and it does the arithmetic.

Shapes in comments: B batch, T new tokens, S tokens in the cache (past + new), D model width,
H query heads, K key/value heads, Hd head width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    dim: int  # D, width of the residual stream
    n_layers: int
    n_heads: int  # H
    n_kv_heads: int  # K; fewer than H is grouped-query attention (GQA)
    vocab_size: int  # V
    hidden_dim: int  # width inside the feed-forward block
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Per-frequency divisors of the rotary angles, one per pair of head dimensions. None means plain
    # RoPE. Llama 3.1's long-context scaling is such a set of divisors (`llama3_rope_factors`); GGUF
    # files store them ready-made as the tensor `rope_freqs.weight`.
    rope_freq_factors: tuple[float, ...] | None = None
    context_length: int = 4096  # the longest sequence the model was trained for
    head_dim: int = 0  # Hd; 0: derived as dim // n_heads (configs that say otherwise give it)
    tie_embeddings: bool = False  # the output projection reuses the token embedding matrix

    def __post_init__(self):
        problems = []
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "context_length"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("norm_eps", "rope_theta"):  # a NaN or negative value would make every logit NaN
            if not 0 < getattr(self, name) < float("inf"):
                problems.append(f"{name} must be a finite number above 0, got {getattr(self, name)}")
        if problems:
            raise ValueError("; ".join(problems))
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        if self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            problems.append(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            problems.append(
                f"rope_freq_factors has {len(self.rope_freq_factors)} entries, expected {self.head_dim // 2}"
            )
        if problems:
            raise ValueError("; ".join(problems))


def llama3_rope_factors(
    head_dim: int,
    theta: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_context_length: int,
) -> tuple[float, ...]:
    """Llama 3.1's rotary scaling as per-frequency divisors.

    Frequencies whose wavelength is short next to the original context are left alone (divisor 1),
    long ones are slowed down by `factor`, and the band between is blended smoothly, so that the
    model sees positions past its original training length without its short-range sense changing.
    """
    low_freq_wavelen = original_context_length / low_freq_factor
    high_freq_wavelen = original_context_length / high_freq_factor
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < high_freq_wavelen:
            factors.append(1.0)
        elif wavelen > low_freq_wavelen:
            factors.append(float(factor))
        else:
            smooth = (original_context_length / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(factors)


def rotary_cos_sin(args: ModelArgs, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angle for each position, laid out for `apply_rotary`:
    positions [B, T] -> two tables [B, T, 1, Hd] (the 1 broadcasts over heads).

    Pair i of a head (dimensions 2i and 2i+1) turns by position * inv_freq[i], so each angle appears
    twice: cos as (cos, cos), and sin with the signs of a rotation, (-sin, +sin).
    Computed in float32 whatever the model's dtype: angles grow with position, and float16 would
    round position 5000's angle by more than the angle between neighbouring tokens.
    """
    exponents = torch.arange(0, args.head_dim, 2, device=positions.device, dtype=torch.float32) / args.head_dim
    inv_freq = 1.0 / (args.rope_theta**exponents)  # [Hd/2]
    if args.rope_freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(args.rope_freq_factors, device=positions.device, dtype=torch.float32)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, Hd/2]
    cos = torch.cos(angles).repeat_interleave(2, dim=-1)  # [B, T, Hd]: (cos0, cos0, cos1, cos1, ...)
    sin = torch.stack((-torch.sin(angles), torch.sin(angles)), dim=-1).flatten(-2)  # (-sin0, sin0, ...)
    return cos[:, :, None, :], sin[:, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x[2i], x[2i+1]) of every head by its position's angle.

    x: [B, T, heads, Hd]; cos, sin: [B, T, 1, Hd] from rotary_cos_sin. This is Meta's pairing (the
    reference does it with complex numbers, which MPS and torch.compile handle badly). A pair (a, b)
    is a point in the plane; turned by angle t it becomes (a cos t - b sin t, b cos t + a sin t),
    which is (a, b) * cos t + (b, a) * (-sin t, sin t): the pair, and the pair swapped.
    """
    x32 = x.float()
    swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (b, a) for every pair (a, b)
    return (x32 * cos + swapped * sin).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of squares over thousands of values is taken in float32: in bfloat16 it loses
        # enough precision to shift every downstream activation.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class LayerCache:
    """Keys and values of one layer for every position seen so far, sized to the request."""

    def __init__(self, batch: int, n_kv_heads: int, length: int, head_dim: int, dtype: torch.dtype, device):
        self.k = torch.zeros(batch, n_kv_heads, length, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values [B, K, T, Hd] at `start` (into the first B rows); return
        everything up to them [B, K, S, Hd]."""
        b, end = k.shape[0], start + k.shape[2]
        if self.k.dtype == torch.float16:  # (Transformer.kv_dtype) past its range: its largest value, not inf
            k, v = k.clamp(-65504, 65504), v.clamp(-65504, 65504)
        self.k[:b, :, start:end] = k
        self.v[:b, :, start:end] = v
        return self.k[:b, :, :end], self.v[:b, :, :end]


class KVCache:
    """One LayerCache per layer. The generation loop owns it; the model only writes into it."""

    def __init__(self, args: ModelArgs, batch: int, length: int, dtype: torch.dtype, device):
        self.length = length
        self.layers = [
            LayerCache(batch, args.n_kv_heads, length, args.head_dim, dtype, device) for _ in range(args.n_layers)
        ]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(Hd)) v, each group of H/K query heads sharing one key/value head:
    q [B, H, T, Hd], k and v [B, K, S, Hd], mask as from causal_mask -> [B, H, T, Hd]."""
    B, H, T, Hd = q.shape
    K = k.shape[1]
    if T == 1 and mask is None:
        # Decoding: one query per head. Two small matrix products; PyTorch's fused CPU kernel is
        # built for many queries and takes ~10x longer for one (measured 260 us vs 25 us per layer
        # with 500 cached tokens).
        grouped = q.float().view(B, K, H // K, Hd)  # each key/value head with its query heads
        scores = grouped @ k.float().transpose(-1, -2) / math.sqrt(Hd)  # [B, K, H/K, S]
        return (scores.softmax(-1) @ v.float()).view(B, H, 1, Hd).type_as(q)
    # enable_gqa lets the query heads share key/value heads without copying the cache H/K times.
    # (type_as: a cache held in 16 bits, Transformer.kv_dtype, is widened to the queries' dtype.)
    return F.scaled_dot_product_attention(q, k.type_as(q), v.type_as(q), attn_mask=mask, enable_gqa=H != K)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        # Meta's wq, wk and wv stacked into one matrix (rows: H*Hd queries, K*Hd keys, K*Hd values),
        # so that reading x and the weights takes one product instead of three. The loader stacks them.
        self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def queries_keys_values(self, x, cos, sin):
        """x [B, T, D] -> q [B, H, T, Hd], k and v [B, K, T, Hd]; q and k rotated to their positions."""
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, self.n_heads + 2 * self.n_kv_heads, self.head_dim)  # [B, T, H+2K, Hd]
        qk = apply_rotary(qkv[:, :, : self.n_heads + self.n_kv_heads], cos, sin)  # q and k in one rotation
        q, k = qk.split((self.n_heads, self.n_kv_heads), dim=2)
        v = qkv[:, :, self.n_heads + self.n_kv_heads :]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first

    def forward(self, x, cos, sin, mask, cache: LayerCache | None, start_pos: int):
        B, T, _ = x.shape
        q, k, v = self.queries_keys_values(x, cos, sin)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)  # [B, K, S, Hd]
        out = attention(q, k, v, mask)  # [B, H, T, Hd]
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # [B, T, D]


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). w1 is the gate, w3 the up projection, w2 the way back down.
    w1 and w3 are stacked into one matrix w13 (gate rows first) and applied in one product."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(self, x, cos, sin, mask, cache, start_pos):
        # Pre-norm residual blocks: each sub-layer reads a normalized copy and adds its result back.
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


def causal_mask(start_pos: int, T: int, device, pad: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean mask, True where query position i may attend to key position j (j <= i): [T, S],
    or [B, 1, T, S] for a batch whose rows are left-padded by `pad` [B] tokens.

    Built by comparing position numbers rather than with torch.triu, which returns NaN on Apple's
    MPS backend. A single new token may see everything in the cache, so it needs no mask, unless
    the batch has padding, which no real token may see. A padding token sees only itself: a row of
    the mask with nothing allowed would make its attention NaN, and NaN keys would spread.
    """
    if T == 1 and pad is None:
        return None
    query_pos = torch.arange(start_pos, start_pos + T, device=device)
    key_pos = torch.arange(0, start_pos + T, device=device)
    mask = key_pos[None, :] <= query_pos[:, None]  # [T, S]
    if pad is None:
        return mask
    real_key = key_pos[None, :] >= pad[:, None]  # [B, S]
    itself = key_pos[None, :] == query_pos[:, None]  # [T, S]
    return (mask[None] & real_key[:, None, :] | itself[None])[:, None]  # [B, 1, T, S]


# Checkpoint names (Meta's) that the model holds stacked: stacked name -> the parts, in row order.
FUSED = {
    "attention.wqkv.weight": ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"),
    "feed_forward.w13.weight": ("feed_forward.w1.weight", "feed_forward.w3.weight"),
}


def fused_name(name: str) -> str:
    """A checkpoint tensor's name in the model: "layers.0.attention.wk.weight" -> "layers.0.attention.wqkv.weight"."""
    for stacked, parts in FUSED.items():
        for part in parts:
            if name.endswith("." + part):
                return name[: -len(part)] + stacked
    return name


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # The dtype its KV cache is held in, where the engine that loaded it chose one other than the
        # model's own (float16 under the CPU kernels: half the memory; attention widens it as it reads).
        self.kv_dtype: torch.dtype | None = None

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int = 0,
        cache: KVCache | None = None,
        last_only: bool = False,
        pad: torch.Tensor | None = None,
    ):
        """tokens [B, T] at positions start_pos..start_pos+T-1 -> logits [B, T, V] ([B, 1, V] if last_only).

        Without a cache the tokens are the whole sequence (start_pos must be 0). With one, earlier
        positions come from the cache and these tokens' keys and values are written into it.
        `pad` [B]: a batch of prompts of different lengths, left-padded; row b's first pad[b]
        slots are padding, and its real tokens count their positions from 0 after them.
        """
        B, T = tokens.shape
        if cache is None and start_pos != 0:
            raise ValueError("start_pos > 0 needs a KV cache holding the earlier positions")
        if cache is not None and start_pos + T > cache.length:
            raise ValueError(f"positions up to {start_pos + T} do not fit a KV cache of {cache.length}")
        h = self.tok_embeddings(tokens)  # [B, T, D]
        positions = torch.arange(start_pos, start_pos + T, device=tokens.device)[None, :]  # [1, T]
        if pad is not None:
            positions = positions - pad[:, None]  # [B, T]: each row counts from its first real token
        cos, sin = rotary_cos_sin(self.args, positions)
        mask = causal_mask(start_pos, T, tokens.device, pad)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, cache.layers[i] if cache is not None else None, start_pos)
        if last_only:
            h = h[:, -1:]  # the next token only depends on the last position; skip the other rows
        return self.output(self.norm(h))  # [B, T, V]
