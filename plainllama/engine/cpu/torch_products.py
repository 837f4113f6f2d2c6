"""Products with compressed weights where the C kernels do not run (not x86, no C compiler, a CPU
without AVX2, PLAINLLAMA_ISA=none): PyTorch's own weight-only operators, so that a 4-bit file stays
4-bit in memory instead of becoming float32 (8x its size: a Q4 8B model would need 32 GB).

    q4          -> torch's int4 layout (torch._convert_weight_to_int4pack_for_cpu), multiplied by
                   torch._weight_int4pack_mm_for_cpu with bfloat16 activations and per-block
                   scales and zero points: 4.5 bits per weight as in the file.
    q8, q6, q5  -> int8 in block-major order with bfloat16 scales (q5: and zero points), multiplied
                   a block column at a time by torch._weight_int8pack_mm (which takes one scale per
                   row, not one per 32 or 16 weights): about a byte per weight (q5: 5.5 bits in
                   the file, 9 here, still below float16's 16).
    f16, bf16   -> as stored, F.linear in that dtype.

Measured on one [8192 x 2048] matrix, one row of activations (Zen 5, 2 threads): float32 F.linear
7.0 ms, int4pack with bfloat16 activations 0.9 ms (with float32 activations 17 ms, which is why
bfloat16), float16 F.linear 1.4 ms, dequantizing Q8_0 slices to float32 each call 33 ms.

Precision: the int4 and int8 forms compute in bfloat16 (activations, scales, zero points, outputs
rounded to 8 significant bits, relative error <= 2^-8 each), float16 products round their outputs to
11 bits; tests/test_torch_products.py states what that costs on whole models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QK = 32  # weights per block (packed.py's layouts)
PACK_ROWS = 1024  # rows converted at a time: packing is row-local (checked: slices equal the whole)
ROW_MULTIPLE = 16  # torch's CPU int4 layout takes N in multiples of 16: q4 matrices are padded


class Int4Product:
    """A q4 matrix [N, K] in torch's CPU int4 layout: weight = (q - 8) * scale + zero per block of 32."""

    def __init__(self, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None):
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
        pad = torch.zeros(padded, K // QK)
        # [K/32, N + padded, 2] as the operator takes them
        self.scales_zeros = torch.stack((torch.cat((scale, pad)).T, torch.cat((zero, pad)).T), dim=-1).bfloat16()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [M, K] -> [M, N] float32
        out = torch._weight_int4pack_mm_for_cpu(x.bfloat16().contiguous(), self.packed, QK, self.scales_zeros)
        return out[:, : self.rows].float()

    def dequantized(self) -> torch.Tensor:
        """The weights this form multiplies by, [N, K] float32 (the operator applied to the identity
        in float32, where it is exact)."""
        sz, out = self.scales_zeros.float(), torch.empty(self.rows, self.K)
        for start in range(0, self.K, 256):  # 256 columns at a time: unit rows x [256, K]
            unit = torch.zeros(min(256, self.K - start), self.K)
            unit[:, start : start + unit.shape[0]] = torch.eye(unit.shape[0])
            out[:, start : start + unit.shape[0]] = torch._weight_int4pack_mm_for_cpu(unit, self.packed, QK, sz)[
                :, : self.rows
            ].T
        return out

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_zeros.numel() * 2


class Int8BlockProduct:
    """A matrix [N, K] of int8 values with a scale per block of B weights (q8: B = 32, weight = d q;
    q6: B = 16, weight = d sc (q - 32)), as int8 in block-major order [K/B, N, B] with bfloat16
    scales [K/B, N]: torch._weight_int8pack_mm takes one scale per row, so each block column is one
    call (its B weights of every row, each row's scale of that block) and the partial products are
    summed in float32. About a byte per weight, as in the file, where float16 would take 2; as fast
    as float16's F.linear on one [16384 x 2048] q8 matrix here (6.7 vs 5.2 ms)."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor, block: int, zeros: torch.Tensor | None = None):
        N, K = values.shape
        self.block = block
        self.qs = torch.empty(K // block, N, block, dtype=torch.int8)
        for start in range(0, N, PACK_ROWS):
            rows = values[start : start + PACK_ROWS].unflatten(-1, (-1, block))
            self.qs[:, start : start + PACK_ROWS] = rows.transpose(0, 1)
        self.d = scales.T.bfloat16().contiguous()  # [K/B, N]
        # q5: weight = d (q - 16) + zero per block; the zeros' part is each block's sum of x times
        # its zero, a product of width K/B
        self.zeros = zeros.bfloat16() if zeros is not None else None  # [N, K/B]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [M, K] -> [M, N] float32
        blocks = x.bfloat16().unflatten(-1, (-1, self.block))  # [M, K/B, B]
        out = torch.zeros(x.shape[0], self.qs.shape[1])
        for b in range(self.qs.shape[0]):
            out += torch._weight_int8pack_mm(blocks[:, b].contiguous(), self.qs[b], self.d[b])
        if self.zeros is not None:
            out += F.linear(blocks.sum(-1), self.zeros).float()
        return out

    def dequantized(self) -> torch.Tensor:
        w = (self.qs.float() * self.d.float()[..., None]).transpose(0, 1)  # [N, K/B, B]
        if self.zeros is not None:
            w = w + self.zeros.float()[..., None]
        return w.flatten(1)

    @property
    def nbytes(self) -> int:
        return self.qs.numel() + self.d.numel() * 2 + (self.zeros.numel() * 2 if self.zeros is not None else 0)


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
