"""GGUF's block formats, turned back into floats with whole-tensor torch operations.

A quantized GGUF tensor is a run of fixed-size blocks. Each block holds the scale(s) for a group of
weights (32 for the classic formats, 256 for the "K" formats, which nest 16 or 8 sub-blocks with
their own small scales) and the weights as 2- to 8-bit integers. Every function here takes the raw
bytes as a uint8 tensor [n_blocks, bytes_per_block] and returns float32 [n_blocks, weights_per_block].
No Python loop runs per block: each field is sliced out of all blocks at once.

The layouts follow ggml's `block_*` structs (ggml-common.h); the tests check each function against
the `gguf` package's numpy dequantizers on random blocks.
"""

from __future__ import annotations

import torch

QK = 32  # weights per block in Q4_0 .. Q8_0
QK_K = 256  # weights per block in the K formats


def _half(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The little-endian float16 at byte `offset` of every block, as float32 [n, 1]."""
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n]: all low nibbles first, then all high nibbles (ggml's order)."""
    return torch.cat((packed & 0x0F, packed >> 4), dim=-1)


def _bits(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 8n] single bits, bit k of byte i at index 8i + k."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & 1).flatten(-2)


def dequantize_q8_0(blocks):  # d: f16, qs: int8[32]
    return _half(blocks, 0) * blocks[:, 2:34].contiguous().view(torch.int8).float()


def dequantize_q4_0(blocks):  # d: f16, qs: 32 nibbles; weight = d * (q - 8)
    return _half(blocks, 0) * (_nibbles(blocks[:, 2:18]).float() - 8)


def dequantize_q4_1(blocks):  # d, m: f16, qs: 32 nibbles; weight = d * q + m
    return _half(blocks, 0) * _nibbles(blocks[:, 4:20]).float() + _half(blocks, 2)


def dequantize_q5_0(blocks):  # d: f16, qh: 32 fifth bits, qs: 32 nibbles; weight = d * (q - 16)
    q = _nibbles(blocks[:, 6:22]) | (_bits(blocks[:, 2:6]) << 4)
    return _half(blocks, 0) * (q.float() - 16)


def dequantize_q5_1(blocks):  # d, m: f16, qh: 32 fifth bits, qs: 32 nibbles; weight = d * q + m
    q = _nibbles(blocks[:, 8:24]) | (_bits(blocks[:, 4:8]) << 4)
    return _half(blocks, 0) * q.float() + _half(blocks, 2)


def q2_k_values(blocks):
    """Q2_K blocks [n, 84] -> q [n, 256] uint8 (0..3) in weight order. qs: 64 bytes of 2-bit
    weights; each half of the block takes 32 bytes and reads them four times, two bits further
    each time (weight 128 h + 32 s + l is bits 2s..2s+1 of byte 32 h + l)."""
    n = blocks.shape[0]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).view(1, 1, 4, 1)
    return ((blocks[:, 16:80].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, QK_K)  # [n, half, shift, 32]


def dequantize_q2_k(blocks):
    """scales: 16 bytes (low nibble scale, high nibble min, one per 16 weights), qs: 64 bytes of 2-bit
    weights (q2_k_values), then d and dmin (f16). weight = d * scale * q - dmin * min."""
    n = blocks.shape[0]
    scales = blocks[:, 0:16]
    d, dmin = _half(blocks, 80), _half(blocks, 82)
    q = q2_k_values(blocks).reshape(n, 16, 16).float()  # one row per 16-weight sub-block
    sub_scale = (d * (scales & 0x0F).float())[:, :, None]
    sub_min = (dmin * (scales >> 4).float())[:, :, None]
    return (sub_scale * q - sub_min).reshape(n, QK_K)


def q3_k_parts(blocks):
    """Q3_K blocks [n, 110] -> (q [n, 256] int8 in -4..3, scale [n, 16] int8 in -32..31, d [n, 1]
    float32), weight = d * scale * q. hmask: 32 bytes of third bits, qs: 64 bytes of 2-bit weights,
    scales: 12 bytes packing sixteen 6-bit scales (offset by 32), d: f16."""
    n = blocks.shape[0]
    hmask, qs, packed = blocks[:, 0:32], blocks[:, 32:96], blocks[:, 96:108]
    # Scale i: its low 4 bits are nibble (i // 8) of byte (i % 8); its high 2 bits sit in byte
    # 8 + (i % 4) at bit 2 * (i // 4).
    low4 = _nibbles(packed[:, 0:8])  # [n, 16]
    idx = torch.arange(16, device=blocks.device)
    high2 = (packed[:, 8 + idx % 4] >> (2 * (idx // 4)).to(torch.uint8)) & 3
    scale = (low4 | (high2 << 4)).to(torch.int8) - 32  # [n, 16]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).view(1, 1, 4, 1)
    low2 = ((qs.view(n, 2, 1, 32) >> shifts) & 3).reshape(n, QK_K)
    # The third bit of weight (half h, shift step j, byte l) is bit 4h + j of hmask[l]; a weight is
    # low2 - 4 where it is clear.
    third = _bits(hmask).view(n, 32, 8).transpose(1, 2).reshape(n, QK_K)
    q = low2.to(torch.int8) - 4 * (1 - third.to(torch.int8))
    return q, scale, _half(blocks, 108)


def dequantize_q3_k(blocks):
    """A weight is d * (scale - 32) * (low2 - (4 if its third bit is clear else 0)) (q3_k_parts)."""
    n = blocks.shape[0]
    q, scale, d = q3_k_parts(blocks)
    return (d * scale.float())[:, :, None].mul(q.float().view(n, 16, 16)).reshape(n, QK_K)


def _k_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, [n, 8] each.
    Sub-blocks 0-3 keep theirs in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7
    take 4 bits from bytes 8-11 and borrow the top 2 bits of bytes 0-3 / 4-7."""
    first, second, third = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat((first & 63, (third & 0x0F) | ((first >> 6) << 4)), dim=1)
    mins = torch.cat((second & 63, (third >> 4) | ((second >> 6) << 4)), dim=1)
    return scales.float(), mins.float()


def dequantize_q4_k(blocks):
    """d, dmin: f16, scales: 12 bytes, qs: 128 bytes. Four chunks of 32 bytes, each giving two
    32-weight sub-blocks (low nibbles, then high nibbles); weight = d*scale*q - dmin*min."""
    n = blocks.shape[0]
    d, dmin = _half(blocks, 0), _half(blocks, 2)
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    q = _nibbles(blocks[:, 16:144].view(n, 4, 32)).view(n, 8, 32).float()
    return ((d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]).reshape(n, QK_K)


def dequantize_q5_k(blocks):
    """As Q4_K, plus qh: 32 bytes whose bit s is the fifth bit of weight l of sub-block s."""
    n = blocks.shape[0]
    d, dmin = _half(blocks, 0), _half(blocks, 2)
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    low4 = _nibbles(blocks[:, 48:176].view(n, 4, 32)).view(n, 8, 32)
    fifth = _bits(blocks[:, 16:48]).view(n, 32, 8).transpose(1, 2)  # [n, sub-block, l]
    q = (low4 | (fifth << 4)).float()
    return ((d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]).reshape(n, QK_K)


def q6_k_values(blocks):
    """The 6-bit numbers q (0..63) of Q6_K blocks [n, 210], [n, 256] uint8 in weight order.
    ql: 128 bytes of low nibbles, qh: 64 bytes of 2-bit highs. Each half of the block takes 64 ql
    bytes and 32 qh bytes and makes 4 runs of 32 weights; run k uses nibble k // 2 of ql bytes
    (k % 2) * 32 + l and bits 2k..2k+1 of qh byte l."""
    n = blocks.shape[0]
    ql = blocks[:, 0:128].view(n, 2, 1, 64)  # [n, half, 1, 64] -> nibbles [n, half, 1, 128]
    low4 = _nibbles(ql).view(n, 2, 4, 32)  # run k = 2 * nibble + (byte >= 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).view(1, 1, 4, 1)
    high2 = (blocks[:, 128:192].view(n, 2, 1, 32) >> shifts) & 3  # [n, half, run, 32]
    return (low4 | (high2 << 4)).view(n, QK_K)


def dequantize_q6_k(blocks):
    """scales: 16 int8, d: f16 after the values (q6_k_values). weight = d * scale * (q - 32), one
    scale per 16 weights."""
    n = blocks.shape[0]
    q = q6_k_values(blocks).float() - 32
    scale = blocks[:, 192:208].contiguous().view(torch.int8).float()  # [n, 16]
    d = _half(blocks, 208)
    return ((d * scale)[:, :, None] * q.view(n, 16, 16)).reshape(n, QK_K)


# type name -> (weights per block, bytes per block, function)
BLOCK_FORMATS = {
    "Q8_0": (QK, 34, dequantize_q8_0),
    "Q4_0": (QK, 18, dequantize_q4_0),
    "Q4_1": (QK, 20, dequantize_q4_1),
    "Q5_0": (QK, 22, dequantize_q5_0),
    "Q5_1": (QK, 24, dequantize_q5_1),
    "Q2_K": (QK_K, 84, dequantize_q2_k),
    "Q3_K": (QK_K, 110, dequantize_q3_k),
    "Q4_K": (QK_K, 144, dequantize_q4_k),
    "Q5_K": (QK_K, 176, dequantize_q5_k),
    "Q6_K": (QK_K, 210, dequantize_q6_k),
}

# Plain float types: bytes per weight and how to read them.
FLOAT_FORMATS = {"F32": (4, torch.float32), "F16": (2, torch.float16), "BF16": (2, torch.bfloat16)}

SUPPORTED_TYPES = tuple(FLOAT_FORMATS) + tuple(BLOCK_FORMATS)


def dequantize(raw: torch.Tensor, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw bytes (uint8, 1-D) of one tensor -> float tensor of `shape` (float32 for quantized types,
    the stored dtype for float types)."""
    count = 1
    for size in shape:
        count *= size
    if type_name in FLOAT_FORMATS:
        _, dtype = FLOAT_FORMATS[type_name]
        return raw.view(dtype).view(shape)
    per_block, block_bytes, fn = BLOCK_FORMATS[type_name]
    return fn(raw.view(-1, block_bytes)).view(shape)


def block_size(type_name: str) -> int:
    """Weights per block of this format (1 for float formats)."""
    return 1 if type_name in FLOAT_FORMATS else BLOCK_FORMATS[type_name][0]


def byte_size(type_name: str, count: int) -> int:
    """Bytes that `count` weights take in this format."""
    if type_name in FLOAT_FORMATS:
        return count * FLOAT_FORMATS[type_name][0]
    per_block, block_bytes, _ = BLOCK_FORMATS[type_name]
    return count // per_block * block_bytes
