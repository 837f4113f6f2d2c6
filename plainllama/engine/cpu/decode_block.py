"""A layer whose weights are packed, run through the C kernels: decode steps in one C call
(kernels/decode_layer.c), prompts with C loops between the products.

model.py's TransformerBlock is the definition; this is the same layer, run differently when it is
worth it. A decode step feeds one token per row, and for one token the work between the weight
products (norms, rotary embeddings, the cache write, attention, SiLU, residual adds) is tiny, but
done with PyTorch it is ~60 operator calls per layer, more time than the products themselves on a
small model (measured on the default model: 8-9 ms of a 15 ms step). `KernelBlock.forward` hands
such a step to decode_layer.c.

A prompt step (many tokens per row) is bound by the products, but once those run on the CPU's matrix
units (amx_matmul.c) the rest is a third of the time: measured on a 1B-shaped model with 512 tokens,
attention in float32 took 0.2 s, SiLU and the multiplications on strided halves of the gate/up
product 0.2 s, rotary embeddings 0.05 s. `_prompt_step` runs the norms, rotation and SwiGLU in C
(decode_layer.c's same loops, one thread per row) and the attention in bfloat16 where the CPU
multiplies bfloat16 natively, the precision the prompt's products already use, in tiles of queries
whose numbers do not depend on their company (query_tiles_attention), or in one C call with the same
property where the kernels have bfloat16 arithmetic (kernels/prompt_attention.c: on a Xeon with AMX,
2.8 against 8.0 ms a layer at 512 tokens).
Everything else (float weights, tracing hooks, gradients) takes TransformerBlock.forward.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from . import kernels
from ...model import TransformerBlock
from .packed import DIRECT_ROWS, MatrixPart, PackedLinear, StackedLinear, _bf16_products_fast


class Linear(ctypes.Structure):
    _fields_ = [
        ("n_parts", ctypes.c_int),
        ("in_features", ctypes.c_int),
        ("out_features", ctypes.c_int),
        ("parts", MatrixPart * 3),
    ]


class Layer(ctypes.Structure):
    _fields_ = [
        ("dim", ctypes.c_int),
        ("n_heads", ctypes.c_int),
        ("n_kv_heads", ctypes.c_int),
        ("head_dim", ctypes.c_int),
        ("hidden", ctypes.c_int),
        ("eps", ctypes.c_float),
        ("attention_norm", ctypes.c_void_p),
        ("ffn_norm", ctypes.c_void_p),
        ("wqkv", Linear),
        ("wo", Linear),
        ("w13", Linear),
        ("w2", Linear),
    ]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _linear(module) -> Linear | None:
    """The C description of a packed linear layer, or None if it is not one the kernel reads."""
    parts = module.parts if isinstance(module, StackedLinear) else [module]
    if not 1 <= len(parts) <= 3 or not all(isinstance(p, PackedLinear) for p in parts):
        return None
    described = Linear(len(parts), parts[0].in_features, sum(p.out_features for p in parts))
    for i, part in enumerate(parts):
        w = part.packed
        # q4/q8 blocks are read 64 weights at a time, q6, q3 and q2 256, 16-bit rows 32 at a time
        width = {"f16": 32, "bf16": 32, "q6": 256, "q3": 256, "q2": 256}.get(w.layout, 64)
        if part.in_features != described.in_features or part.in_features % width:
            return None
        described.parts[i] = w.c_part()
    return described


# Attention for prompts, QUERY_TILE queries per call against keys padded to a multiple of KEY_BLOCK.
QUERY_TILE = 32  # below 64 queries PyTorch's CPU flash attention never repacks the keys (its need_pack)
KEY_BLOCK = 512  # the blocks of keys that flash attention walks through, one at a time


def query_tiles_attention(q, k, v, mask, start: int, dtype: torch.dtype) -> torch.Tensor:
    """softmax(q k^T / sqrt(Hd)) v with every query's numbers independent of the other queries in the
    call: q [B, H, T, Hd] at positions start .. start + T - 1; k, v [B, K, end, Hd] for positions
    0 .. end - 1; mask [T, end] or [B, 1, T, end] boolean, causal (no query sees a key past its own
    position; model.causal_mask) -> [B, H, T, Hd] float32.

    Why not one call: PyTorch's fused CPU attention picks its blocking and kernels from the number of
    queries and keys (and the threads), and different choices add the same terms in another order.
    On a Xeon with AMX, 9 queries against 137 keys gave other bits than the same 9 among 137, so a
    prompt continued from the server's prefix cache came out differently from the same prompt whole
    (tests/test_continuous.py). Here every call has a shape set by its tile alone: QUERY_TILE queries
    at positions p .. p + QUERY_TILE - 1 (p a multiple of QUERY_TILE; rows outside the prompt are
    zeros) against the keys 0 .. p + QUERY_TILE - 1 padded with masked zero keys to a multiple of
    KEY_BLOCK. A masked key adds exactly nothing, so a query's result is the same in any company.
    Cost, measured against one call (Xeon with AMX, 2 threads, 32 heads of 64): 8.0 against 4.6 ms per
    layer at 512 tokens, 73 against 67 at 2048 in bfloat16; in float32 12 against 10 and 118 against
    153 (keys past a tile's end are skipped)."""
    B, H, T, Hd = q.shape
    K, end = k.shape[1], k.shape[2]
    first, stop = start // QUERY_TILE * QUERY_TILE, start + T
    length = -(-(-(-stop // QUERY_TILE) * QUERY_TILE) // KEY_BLOCK) * KEY_BLOCK  # keys of the last tile
    keys = k.new_zeros(B, K, length, Hd, dtype=dtype)
    values = torch.zeros_like(keys)
    keys[:, :, :end], values[:, :, :end] = k, v
    out = q.new_empty(B, H, T, Hd, dtype=torch.float32)
    for p in range(first, stop, QUERY_TILE):
        lo, hi = max(p, start), min(p + QUERY_TILE, stop)  # the prompt's positions in this tile
        S = -(-(p + QUERY_TILE) // KEY_BLOCK) * KEY_BLOCK
        tile = q.new_zeros(B, H, QUERY_TILE, Hd, dtype=dtype)
        tile[:, :, lo - p : hi - p] = q[:, :, lo - start : hi - start]
        seen = min(end, S)  # keys past the tile's last position: masked for every query in it
        allowed = torch.zeros(B, 1, QUERY_TILE, S, dtype=torch.bool, device=q.device)
        allowed[..., 0] = True  # rows outside the prompt see key 0 (not nothing: that is NaN)
        allowed[:, :, lo - p : hi - p, :seen] = mask[..., lo - start : hi - start, :seen]
        allowed[:, :, lo - p : hi - p, seen:] = False
        result = F.scaled_dot_product_attention(
            tile, keys[:, :, :S], values[:, :, :S], attn_mask=allowed, enable_gqa=H != K
        )  # [B, H, QUERY_TILE, Hd]
        out[:, :, lo - start : hi - start] = result[:, :, lo - p : hi - p]
    return out


def c_attention_runs(q, k, v, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether attention in `dtype` can run in C for these: in bfloat16, prompt_attention
    (kernels/prompt_attention.c: kernels built with AMX or AVX-512 BF16); in float32,
    prompt_attention_f32 (kernels/prompt_attention_f32.c: any build, AVX-512 or AVX2). Both take
    float32 q, k, v on the CPU with a head dimension that is a multiple of 32."""
    if not kernels.available():
        return False
    # float32: prompt_attention_f32 is in every build; bfloat16: an engine (AMX or AVX-512 BF16)
    runs = kernels.function("prompt_attention_engine")() > 0 if dtype == torch.bfloat16 else dtype == torch.float32
    return (
        runs and q.shape[-1] % 32 == 0 and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (q, k, v))
    )


def c_attention(q, k, v, mask, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """query_tiles_attention's numbers computed in one C call (in bfloat16 with float32 sums:
    kernels/prompt_attention.c, on AMX or with AVX-512 BF16; in float32: prompt_attention_f32.c): the
    queries q [B, H, T, Hd] against keys and values k, v [B, K, end, Hd] with a boolean mask [T, end]
    or [B, 1, T, end] (True: the key may be seen) -> [B, T, H Hd] float32, every query's result
    independent of the other queries in the call.
    q, k and v are read where they lie when their head dimension is contiguous (q: heads side by side
    in a row, as the layer's qkv product gives them; k, v: a KV cache's views)."""
    B, H, T, Hd = q.shape
    K, end = k.shape[1], k.shape[2]
    if q.stride(3) != 1 or q.stride(1) != Hd:
        q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, T, Hd] with the heads of a row side by side
    if k.stride() != v.stride() or k.stride(3) != 1:
        k, v = k.contiguous(), v.contiguous()
    mask = mask.contiguous()
    if mask.shape[-2:] != (T, end) or mask.dim() not in (2, 4) or mask.dtype != torch.bool:
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} for {T} queries and {end} keys")
    mask_rows = 1 if mask.dim() == 2 else mask.shape[0]
    out = torch.empty(B, T, H * Hd)
    name = "prompt_attention" if dtype == torch.bfloat16 else "prompt_attention_f32"
    kernels.check(
        kernels.function(name)(
            q.data_ptr(), q.stride(0), q.stride(2),
            k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
            B, T, H, K, Hd, end, mask.data_ptr(), mask_rows, out.data_ptr(),
        ),
        name,
    )  # fmt: skip
    return out


class KernelBlock(TransformerBlock):
    """A TransformerBlock (same submodules, same names) whose one-token steps run in decode_layer.c."""

    def __init__(self, block: TransformerBlock, layer: Layer):
        torch.nn.Module.__init__(self)
        self.attention_norm, self.attention = block.attention_norm, block.attention
        self.ffn_norm, self.feed_forward = block.ffn_norm, block.feed_forward
        self.layer = layer  # holds the weights' addresses: packed weights never move (PackedWeight._apply)
        self.kernel = kernels.function("decode_layer")

    def _kernel_can_run(self, x, cos, mask, cache, start_pos) -> bool:
        B, T, _ = x.shape
        return (
            T == 1
            and B <= DIRECT_ROWS
            and cache is not None
            and self._plain(x)
            and cache.k.dtype in (torch.float32, torch.float16)
            and cache.k.is_contiguous()
            and cache.v.is_contiguous()
            and cos.shape[0] in (1, B)
            and (
                mask is None
                or (
                    mask.dtype == torch.bool and mask.shape[-1] == start_pos + 1 and mask.numel() == B * (start_pos + 1)
                )
            )
        )

    def _plain(self, x) -> bool:
        """Nothing asks for model.py's own path: float32 rows on the CPU, no gradients, no hooks on
        the sub-layers (tracing.py reads the attention's inputs through them)."""
        return (
            x.dtype == torch.float32
            and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and x.requires_grad)
            and not any(m._forward_hooks or m._forward_pre_hooks for m in self.children())
        )

    def _prompt_step(self, x, cos, sin, mask, cache, start_pos):
        """TransformerBlock.forward for T > 1, the same steps; x [B, T, D] -> [B, T, D]."""
        B, T, D = x.shape
        x = x.contiguous()
        qkv = self._rotated_qkv(x, cos, sin)  # [B, T, (H + 2K) Hd]
        h = self.attention.wo(self._attention(qkv, mask, cache, start_pos)).add_(x)
        return self._feed_forward(h)

    def prompt_segments(self, x, cos, sin, masks, caches, starts, offsets, lengths):
        """The prompt step for several sequences' chunks side by side: x [1, R, D] holds chunk i's
        rows at offsets[i] .. offsets[i] + lengths[i] (zero rows between chunks), cos/sin [1, R, 1, Hd]
        their positions' angles; chunk i starts at position starts[i] of its own cache caches[i] (a
        LayerCache of batch 1) with its own mask. The products run once on all R rows (one read and
        unpacking of the weights for every chunk); attention runs per chunk. Each chunk's rows come
        out as `_prompt_step` gives them for that chunk alone, when every chunk has more than
        DIRECT_ROWS rows: the many-rows products (oneDNN's and AMX's bfloat16 ones) compute each row
        on its own, and the rest is per row or per chunk (continuous.prefill_rows;
        tests/test_continuous.py checks it bit for bit)."""
        x = x.contiguous()
        qkv = self._rotated_qkv(x, cos, sin)  # [1, R, (H + 2K) Hd]
        attention = self.attention
        out = x.new_zeros(1, x.shape[1], attention.n_heads * attention.head_dim)  # [1, R, H Hd]
        for mask, cache, start, at, T in zip(masks, caches, starts, offsets, lengths, strict=True):
            out[:, at : at + T] = self._attention(qkv[:, at : at + T], mask, cache, start)
        h = attention.wo(out).add_(x)
        return self._feed_forward(h)

    def _rotated_qkv(self, x, cos, sin):
        """x [B, T, D] -> q, k and v side by side [B, T, (H + 2K) Hd], q and k turned by their angles."""
        attention = self.attention
        B, T, _ = x.shape
        qkv = attention.wqkv(self._norm(self.attention_norm, x))  # [B, T, (H + 2K) Hd]
        cos, sin = cos.contiguous(), sin.contiguous()  # [1 or B, T, 1, Hd]
        kernels.check(
            kernels.function("rotate_rows")(
                qkv.data_ptr(),
                B,
                T,
                qkv.shape[-1],
                attention.n_heads + attention.n_kv_heads,
                attention.head_dim,
                cos.data_ptr(),
                sin.data_ptr(),
                cos.shape[0],
            ),
            "rotate_rows",
        )  # q and k, in place
        return qkv

    def _attention(self, qkv, mask, cache, start_pos):
        """qkv [B, T, (H + 2K) Hd] -> attention's output [B, T, H Hd] float32, writing k and v into the cache."""
        attention = self.attention
        H, K, Hd = attention.n_heads, attention.n_kv_heads, attention.head_dim
        B, T, _ = qkv.shape
        q, k, v = qkv.view(B, T, H + 2 * K, Hd).transpose(1, 2).split((H, K, K), dim=1)  # heads first
        dtype = torch.bfloat16 if _bf16_products_fast() else torch.float32
        if cache is not None:
            k, v = cache.update(start_pos, k, v)  # [B, K, S, Hd]
            if k.dtype != torch.float32:  # a 16-bit cache (cache_dtype), widened for the prompt's kernels
                k, v = k.float(), v.float()
        if mask is not None and c_attention_runs(q, k, v, dtype):
            return c_attention(q, k, v, mask, dtype)
        if cache is None or mask is None:  # no cache to continue from (or no mask: keys not by position)
            out = F.scaled_dot_product_attention(
                q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask, enable_gqa=H != K
            )  # [B, H, T, Hd]
            return out.transpose(1, 2).reshape(B, T, H * Hd).float()
        return query_tiles_attention(q, k, v, mask, start_pos, dtype).transpose(1, 2).reshape(B, T, H * Hd)

    def _feed_forward(self, h):
        """h [B, T, D] -> h + SwiGLU feed-forward of its norm."""
        ffn = self.feed_forward
        B, T, _ = h.shape
        normed = self._norm(self.ffn_norm, h)
        if isinstance(ffn.w13, PackedLinear) and not (ffn.w13._forward_hooks or ffn.w13._forward_pre_hooks):
            hidden = ffn.w13.packed.amx_swiglu(normed.view(B * T, -1))  # [B T, F], or None: not here
            if hidden is not None:
                return ffn.w2(hidden.view(B, T, -1)).add_(h)
        gate_up = ffn.w13(normed)  # [B, T, 2F]: gate, then up
        hidden = gate_up.new_empty(B, T, gate_up.shape[-1] // 2)
        kernels.check(
            kernels.function("swiglu_rows")(gate_up.data_ptr(), B * T, hidden.shape[-1], hidden.data_ptr()),
            "swiglu_rows",
        )
        return ffn.w2(hidden).add_(h)

    @staticmethod
    def _norm(norm, x):
        out = torch.empty_like(x)
        kernels.check(
            kernels.function("rms_norm_rows")(
                x.data_ptr(), norm.weight.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], norm.eps, out.data_ptr()
            ),
            "rms_norm_rows",
        )
        return out

    def forward(self, x, cos, sin, mask, cache, start_pos):
        if x.shape[1] > 1 and self._plain(x):
            return self._prompt_step(x, cos, sin, mask, cache, start_pos)
        if not self._kernel_can_run(x, cos, mask, cache, start_pos):
            return super().forward(x, cos, sin, mask, cache, start_pos)
        B = x.shape[0]
        x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
        allowed = mask.contiguous() if mask is not None else None  # [B, 1, 1, S]: padding masked
        out = torch.empty_like(x)
        code = self.kernel(
            ctypes.byref(self.layer),
            x.data_ptr(),
            B,
            cos.data_ptr(),
            sin.data_ptr(),
            cos.shape[0],
            cache.k.data_ptr(),
            cache.v.data_ptr(),
            cache.k.dtype == torch.float16,
            cache.k.shape[2],
            start_pos,
            _ptr(allowed),
            out.data_ptr(),
        )
        kernels.check(code, "decode_layer")
        return out


def cache_dtype(device: torch.device, dtype: torch.dtype, weights: str) -> torch.dtype:
    """The dtype a model's KV cache is held in (Transformer.kv_dtype): float16 where the decode steps
    run in decode_layer.c (compressed weights on the CPU, float32 activations, the kernels built),
    which widens each element to float32 as it reads it, as llama.cpp's default cache does: half the
    memory, and half the bytes a step reads at a long context, where the cache outweighs the weights
    (7000 positions of the default model: 322 MB in float32, the weights 98). Float16 keeps 11
    significant bits, so each key and value moves by up to 2^-12 of itself; its effect on the real
    model's next-token distribution is bounded in tests/test_decode_layer.py. Elsewhere the model's own
    dtype: model.py's attention would widen the whole cache at every step."""
    kernel_steps = device.type == "cpu" and dtype == torch.float32 and weights != "float" and kernels.available()
    return torch.float16 if kernel_steps else dtype


def kernel_block(block: TransformerBlock) -> TransformerBlock:
    """`block` as a KernelBlock when the kernel can run it (packed weights on the CPU, float32 norms),
    else `block` itself."""
    if not kernels.available():
        return block
    norms = (block.attention_norm.weight, block.ffn_norm.weight)
    if any(w.device.type != "cpu" or w.dtype != torch.float32 or not w.is_contiguous() for w in norms):
        return block
    linears = [
        _linear(m) for m in (block.attention.wqkv, block.attention.wo, block.feed_forward.w13, block.feed_forward.w2)
    ]
    if any(lin is None for lin in linears):
        return block
    assert linears[3] is not None
    attention = block.attention
    norm = block.attention_norm
    layer = Layer(
        norm.weight.shape[0],
        attention.n_heads,
        attention.n_kv_heads,
        attention.head_dim,
        linears[3].in_features,
        norm.eps,
        _ptr(norm.weight),
        _ptr(block.ffn_norm.weight),
        *linears,
    )
    return KernelBlock(block, layer)
