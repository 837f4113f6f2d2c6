"""Products with compressed weights where the C kernels do not run (not x86, no C compiler, a CPU
without AVX2, PLAINLLAMA_ISA=none): PyTorch's own weight-only operators, so that a 4-bit file stays
4-bit in memory instead of becoming float32 (8x its size: a Q4 8B model would need 32 GB).

    q4          -> torch's int4 layout (torch._convert_weight_to_int4pack_for_cpu), multiplied by
                   torch._weight_int4pack_mm_for_cpu with bfloat16 activations and per-block
                   scales and zero points: 4.5 bits per weight as in the file.
    q8, q5      -> two int4 matrices (the high and low 4 bits of each 8-bit value) with per-block
                   scales and zero points, multiplied by the same operator and added: a byte per
                   weight plus two bfloat16 pairs per block (10 bits; q5: 5.5 in the file).
    q6          -> int8 in block-major order with bfloat16 scales, multiplied a block column at a
                   time by torch._weight_int8pack_mm (which takes one scale per row): Q6_K's scales
                   are per 16 weights, which the int4 operator does not take (groups of 32 to 256).
    f16, bf16   -> as stored, F.linear in that dtype.

Measured on one [8192 x 2048] matrix, one row of activations (Zen 5, 2 threads): float32 F.linear
7.0 ms, int4pack with bfloat16 activations 0.9 ms (with float32 activations 17 ms, which is why
bfloat16), float16 F.linear 1.4 ms, dequantizing Q8_0 slices to float32 each call 33 ms. 8-bit
values, one row: [16384 x 2048] two int4 matrices 2.1 ms, int8 a block column at a time 4.5 ms;
[49152 x 576] 2.2 and 4.1 ms. Whole 1B-shaped Q8_0 file with PLAINLLAMA_ISA=none: decode 3.6 ->
11.3 tokens/s, peak RSS 1492 -> 1750 MiB (the file: 1.3 GB).

Precision: the int4 and int8 forms compute in bfloat16 (activations, scales, zero points, outputs
rounded to 8 significant bits, relative error <= 2^-8 each), float16 products round their outputs to
11 bits; tests/test_torch_products.py states what that costs on whole models.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

QK = 32  # weights per block (packed.py's layouts)
# Rows converted at a time: packing is row-local (checked: slices equal the whole). Its temporaries are
# int32 per weight: 1024 rows of a [N, 8192] matrix put the 1B-shaped Q4_0 file's peak RSS at 1.32x the
# file (over the runtime's own); 512 rows 1.26x, loading 3% slower than 1024; 256 rows 1.25x, 7% slower.
PACK_ROWS = 512
ROW_MULTIPLE = 16  # torch's CPU int4 layout takes N in multiples of 16: q4 matrices are padded


def _int4_dequantized(packed: torch.Tensor, scales_zeros: torch.Tensor, rows: int, K: int) -> torch.Tensor:
    """The weights an int4 matrix multiplies by, [rows, K] float32: the operator applied to unit rows
    in float32, where it is exact."""
    sz, out = scales_zeros.float(), torch.empty(rows, K)
    for start in range(0, K, 256):  # 256 columns at a time: unit rows x [256, K]
        unit = torch.zeros(min(256, K - start), K)
        unit[:, start : start + unit.shape[0]] = torch.eye(unit.shape[0])
        out[:, start : start + unit.shape[0]] = torch._weight_int4pack_mm_for_cpu(unit, packed, QK, sz)[:, :rows].T
    return out


def _scales_zeros(scale: torch.Tensor, zero: torch.Tensor, padded: int) -> torch.Tensor:
    """[N, K/32] scales and zero points -> [K/32, N + padded, 2] bfloat16, as the operator takes them"""
    pad = torch.zeros(padded, scale.shape[1])
    return torch.stack((torch.cat((scale, pad)).T, torch.cat((zero, pad)).T), dim=-1).bfloat16()


class RowSlices(Protocol):
    """A matrix whose slices of rows are tensors (packed.py's q4 and q8 rows, read back in GGUF's order)."""

    shape: torch.Size

    def __getitem__(self, rows: slice) -> torch.Tensor: ...


class Int4Product:
    """A q4 matrix [N, K] in torch's CPU int4 layout: weight = (q - 8) * scale + zero per block of 32.
    `qs`: the nibbles [N, K/2] in GGUF's order, read a slice of rows at a time."""

    def __init__(self, qs: RowSlices, d: torch.Tensor, m: torch.Tensor | None):
        N, K = qs.shape[0], qs.shape[1] * 2
        padded = -N % ROW_MULTIPLE
        self.rows, self.K = N, K
        self.packed = torch.empty(N + padded, K // 2, dtype=torch.uint8)
        for start in range(0, N + padded, PACK_ROWS):
            end = min(start + PACK_ROWS, N + padded)
            nibbles = qs[start:end].unflatten(-1, (-1, QK // 2))  # [n, K/32, 16]: byte j = weights j, j + 16
            q = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=-1).flatten(-2).int()  # [n, K] 0..15
            if end > N:  # padding rows: q = 8 with scale 0 and zero 0 are weights of 0
                q = torch.cat((q, torch.full((end - max(start, N), K), 8, dtype=torch.int32)))
            self.packed[start:end] = torch._convert_weight_to_int4pack_for_cpu(q, 2)
        scale = d.float()  # [N, K/32]
        zero = m.float() + 8 * scale if m is not None else torch.zeros_like(scale)  # d q + m = d (q - 8) + (m + 8 d)
        self.scales_zeros = _scales_zeros(scale, zero, padded)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [M, K] -> [M, N] float32
        out = torch._weight_int4pack_mm_for_cpu(x.bfloat16().contiguous(), self.packed, QK, self.scales_zeros)
        return out[:, : self.rows].float()

    def dequantized(self) -> torch.Tensor:
        return _int4_dequantized(self.packed, self.scales_zeros, self.rows, self.K)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_zeros.numel() * 2


class Int4PairProduct:
    """A matrix [N, K] of integers v in -128..127 with a scale and a zero point per block of 32
    (weight = scale v + zero; q8: v = q, zero 0; q5: v = q - 16), as two matrices in torch's int4
    layout: v = 16 h + l with l = v & 15 (0..15) and h = v >> 4 (-8..7), multiplied by
    torch._weight_int4pack_mm_for_cpu and added: the high half with q = h + 8, scale 16 s and zero 0,
    the low half with q = l, scale s and zero 8 s + zero. Exact: 16 s and 8 s are s times powers of
    two. A byte per weight as int8 is, and 1.7x faster than int8 a block column at a time (one
    [49152 x 2048] matrix, one row: 6.8 against 11.7 ms; float16 F.linear 6.7)."""

    def __init__(self, values: torch.Tensor | RowSlices, scale: torch.Tensor, zero: torch.Tensor | None = None):
        N, K = values.shape
        padded = -N % ROW_MULTIPLE
        self.rows, self.K = N, K
        self.high = torch.empty(N + padded, K // 2, dtype=torch.uint8)
        self.low = torch.empty(N + padded, K // 2, dtype=torch.uint8)
        for start in range(0, N + padded, PACK_ROWS):
            end = min(start + PACK_ROWS, N + padded)
            v = values[start:end].int()  # [n, K]
            if end > N:  # padding rows: v = 0 with scale 0 and zero 0 are weights of 0
                v = torch.cat((v, torch.zeros(end - max(start, N), K, dtype=torch.int32)))
            self.high[start:end] = torch._convert_weight_to_int4pack_for_cpu((v >> 4) + 8, 2)
            self.low[start:end] = torch._convert_weight_to_int4pack_for_cpu(v & 15, 2)
        scale = scale.float()  # [N, K/32]
        zero = zero.float() if zero is not None else torch.zeros_like(scale)
        self.high_sz = _scales_zeros(16 * scale, torch.zeros_like(scale), padded)
        self.low_sz = _scales_zeros(scale, 8 * scale + zero, padded)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [M, K] -> [M, N] float32
        x = x.bfloat16().contiguous()
        high = torch._weight_int4pack_mm_for_cpu(x, self.high, QK, self.high_sz)
        low = torch._weight_int4pack_mm_for_cpu(x, self.low, QK, self.low_sz)
        return high[:, : self.rows].float() + low[:, : self.rows].float()

    def dequantized(self) -> torch.Tensor:
        return _int4_dequantized(self.high, self.high_sz, self.rows, self.K) + _int4_dequantized(
            self.low, self.low_sz, self.rows, self.K
        )

    @property
    def nbytes(self) -> int:
        return self.high.numel() + self.low.numel() + (self.high_sz.numel() + self.low_sz.numel()) * 2


class Int8BlockProduct:
    """A matrix [N, K] of int8 values with a scale per block of B weights (q6: B = 16, weight =
    d sc (q - 32)), as int8 in block-major order [K/B, N, B] with bfloat16 scales [K/B, N]:
    torch._weight_int8pack_mm takes one scale per row, so each block column is one call (its B
    weights of every row, each row's scale of that block) and the partial products are summed in
    float32. About a byte per weight, where float16 would take 2, but a call per 16 columns: one
    [49152 x 2048] matrix, one row, 22 ms (float16 F.linear 6.7)."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor, block: int):
        N, K = values.shape
        self.block = block
        self.qs = torch.empty(K // block, N, block, dtype=torch.int8)
        for start in range(0, N, PACK_ROWS):
            rows = values[start : start + PACK_ROWS].unflatten(-1, (-1, block))
            self.qs[:, start : start + PACK_ROWS] = rows.transpose(0, 1)
        self.d = scales.T.bfloat16().contiguous()  # [K/B, N]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [M, K] -> [M, N] float32
        blocks = x.bfloat16().unflatten(-1, (-1, self.block))  # [M, K/B, B]
        out = torch.zeros(x.shape[0], self.qs.shape[1])
        for b in range(self.qs.shape[0]):
            out += torch._weight_int8pack_mm(blocks[:, b].contiguous(), self.qs[b], self.d[b])
        return out

    def dequantized(self) -> torch.Tensor:
        return (self.qs.float() * self.d.float()[..., None]).transpose(0, 1).flatten(1)  # [N, K]

    @property
    def nbytes(self) -> int:
        return self.qs.numel() + self.d.numel() * 2


class HalfProduct:
    """A matrix held as 16-bit floats [N, K], multiplied in that dtype."""

    def __init__(self, w: torch.Tensor):
        self.w = w

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [M, K] -> [M, N] float32
        return F.linear(x.to(self.w.dtype), self.w).float()

    def dequantized(self) -> torch.Tensor:
        return self.w.float()

    @property
    def nbytes(self) -> int:
        return self.w.numel() * 2
