"""Weights kept compressed in memory: linear and embedding layers that hold 4-bit, 8-bit or 16-bit
weights and compute with them directly.

A decode step reads every weight once per token, so its speed is set by how many bytes the weights
take. A GGUF Q4_1 file dequantized to float32 reads 6.4x more bytes per token than the file holds;
these modules keep the stored form (repacked at load into a layout the kernels in kernels/ read)
and are swapped into the model in place of nn.Linear / nn.Embedding (see loading.py). model.py
never knows: it calls `self.wq(x)` either way.

Layouts, one row per output feature, blocks of 32 weights along the input:
    q4    nibbles uint8 [N, K/2] (GGUF's bytes, each row's groups of 16 blocks in the order the decode
          kernels read them: q4_lanes below), scale d float16 [N, K/32], optional minimum m:
          weight = d * q + m, or d * (q - 8) without m. Holds Q4_0, Q4_1 and Q4_K as they are
          (Q4_K with its own scales: uint8 sc, mn per 32 and float16 d, m per 256).
    q5    q4's parts plus each block's fifth bits qh int32 [N, K/32] (bit k: weight k): weight =
          d * q + m, or d * (q - 16). Holds Q5_0 and Q5_1 as they are, and Q5_K as q4 holds Q4_K.
    q8    int8 [N, K], scale d [N, K/32] float16: weight = d * q. Holds Q8_0's numbers, each row's
          whole groups of 512 weights in the order the decode kernel reads them (q8_lanes below);
          types without a layout of their own are requantized to it from their exact values.
    q6    Q6_K's own numbers (6-bit q, int8 scale per 16 weights, float16 d per 256), the values
          regrouped for kernels/q6_matmul.c: weight = d * sc * (q - 32).
    q3    Q3_K's own numbers (3-bit q, its 6-bit scales as int8 per 16, float16 d per 256): weight =
          d * sc * (q - 4), the values regrouped like q6's. 3.56 bits a weight (the file: 3.44).
    q2    Q2_K's own numbers (2-bit q, a 4-bit scale and a 4-bit minimum per 16 weights in one byte
          sc, float16 d and m per 256): weight = d * (sc & 15) * q - m * (sc >> 4); the values
          regrouped like q6's (kernels/q6_matmul.c reads both). 2.625 bits a weight, as stored.
    f16, bf16: the 16-bit floats as stored.

How a product runs depends on how many rows of activations come at once:
    a few (decoding, beams, a small batch): the kernels read the compressed weights directly,
        with the activations quantized to int8 per block of 32, as llama.cpp does;
    many (a prompt): on a CPU with AMX, kernels/amx_matmul.c unpacks the weights (any layout) block
        by block straight into its matrix units' tile layout, with bfloat16 inputs and float32 sums;
        elsewhere quantized weights go through the direct kernels as in decoding (int8 activations)
        wherever they run at the AVX-512 level or the CPU has no bfloat16 arithmetic, and are
        otherwise unpacked to bfloat16 a slice at a time into a reused buffer and multiplied by
        oneDNN; 16-bit weights go to oneDNN's bfloat16 where the CPU has it (AVX-512 BF16), and are
        unpacked to float32 where it does not.
Where the C kernels do not run at all, every product goes through PyTorch's weight-only operators
(torch_products.py), so the weights stay compressed there too.
"""

from __future__ import annotations

import ctypes
import math
import threading
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from ..memory import empty_for_weights
from .torch_products import ROW_MULTIPLE, HalfProduct, Int4PairProduct, Int4Product, Int8BlockProduct
from ...formats.checkpoint import STORED_DTYPES
from ...formats.gguf_quants import (
    BLOCK_FORMATS,
    QK,
    QK_K,
    _k_scales_mins,
    dequantize,
    q2_k_values,
    q3_k_parts,
    q6_k_values,
)

LAYOUT_CODES = kernels.LAYOUT_CODES  # as the C kernels number them (kernels/plainllama.h)
LAYOUTS = tuple(LAYOUT_CODES)  # q4, q8, f16, bf16, q6, q5
# Up to this many rows the direct kernels win; from 9 the AMX or oneDNN path (measured: q4/q8
# [M x 2048] x [2048 x 8192] at M = 8, 1.9-2.1 ms either way; M = 16, 3.7-3.9 vs 2.0-2.1 ms on AMX).
DIRECT_ROWS = 8
UNPACK_BYTES = 8 << 20  # weights unpacked per slice in the many-rows path (4M bfloat16, 2M float32)
# The float32 path (CPUs without bfloat16 instructions) multiplies the rows TOKEN_TILE at a time, so
# that a row's result does not depend on its company. On an Ice Lake Xeon (products.py --prompt, 512
# rows): tiles of 64 gave 131-145 GFLOP/s, of 32 104-113, of 48 107-117; slices of 8-16 MB beat 1-4 MB.
TOKEN_TILE = 64
# Where prompts' products of quantized weights run on the direct kernels (_int8_prompts), the rows go
# to them this many per call, so that one call's int8 rows stay in L2 while every weight row meets
# them (64 rows of 8192 inputs: 512 KB). 2 threads, the four 1B layer shapes, 512 rows at the AVX-512
# level (Xeon with AMX), GOP/s for 32 / 64 / 128 / 256 / 512 rows a call: Q8_0 585 / 690 / 686 / 598
# / 551, Q4_K 626 / 674 / 709 / 616 / 566, Q6_K 511 / 539 / 522 / 483 / 445.
DIRECT_CALL_ROWS = 64


@cache
def _bf16_products_possible() -> bool:
    """Whether oneDNN multiplies bfloat16 here at all: natively, or (x86 with AVX-512 but without its
    BF16 instructions, e.g. Intel Ice Lake) by widening to float32 inside the product."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@cache
def _bf16_products_fast() -> bool:
    """Whether prompts multiply in bfloat16 here: only where the CPU does so natively (AVX-512 BF16 or
    AMX on x86; oneDNN's own check elsewhere, e.g. ARM's BF16). Where oneDNN widens bfloat16 itself,
    float32 products are faster: 2.2-2.4x on an Ice Lake Xeon (benchmarks/products.py --prompt)."""
    if not _bf16_products_possible():
        return False
    capabilities = torch.cpu.get_capabilities()
    if capabilities.get("architecture") != "x86_64":
        return True
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def _int8_prompts() -> bool:
    """Whether prompts multiply quantized weights with the direct kernels (the activations quantized
    to int8 per block of 32, as decoding does, and as llama.cpp does for prompts) instead of unpacking
    the weights to float32 or bfloat16: wherever the kernels run at the AVX-512 level (VNNI), and
    wherever the CPU has no bfloat16 arithmetic (Intel before Sapphire Rapids, AMD before Zen 4).
    (With AMX, amx_matmul.c takes them first.) A row's result is then also the one a decode step
    gives it. Measured on a Xeon with AMX, each level emulated by capping the kernels and PyTorch
    (PLAINLLAMA_ISA, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA; benchmarks/products.py --prompt, the
    four 1B layer shapes, 512 rows, 2 threads), int8 against float32: AVX-512 VNNI 2.4-3.2x on every
    quantized layout; AVX2 with AVX-VNNI 1.16-1.78x; AVX2 alone (the kernels built without AVX-VNNI)
    1.24-1.76x on q4, q5, q6, q3, 0.97x on q8 and 1.06x on q2. Against oneDNN's bfloat16 on a Zen 4
    (AVX-512 BF16): 1.15-1.41x, every quantized layout. bfloat16 stays at the AVX2 level, and where
    oneDNN multiplies it with AMX (the kernels capped below AMX by PLAINLLAMA_ISA) (docs/performance.md)."""
    if not kernels.available():
        return False
    if not _bf16_products_fast():
        return True
    return kernels.isa() == "avx512" and not torch.cpu.get_capabilities().get("amx_bf16")


def prompt_products() -> str:
    """How a prompt's products of packed weights run here, as `plainllama bench` reports it."""
    if not kernels.available():
        return "torch weight-only"
    if kernels.amx():
        return "amx bfloat16"
    if _int8_prompts():
        return "int8 kernels (16-bit weights: " + ("oneDNN bfloat16)" if _bf16_products_fast() else "float32)")
    return "oneDNN bfloat16"


class _Scratch(threading.local):
    """A reusable buffer per thread (unpacked weight slices, or the prompt's rows as bfloat16 tiles),
    so the prompt path allocates nothing per call (a fresh 8-32 MB tensor costs more in page faults
    than unpacking it)."""

    buffer: torch.Tensor | None = None

    def get(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        if self.buffer is None or self.buffer.numel() < numel or self.buffer.dtype != dtype:
            self.buffer = None  # release the old one before allocating its successor
            with torch.inference_mode(False):  # a normal tensor: written in place in any mode
                self.buffer = torch.empty(numel, dtype=dtype)
        return self.buffer[:numel]


_scratch = _Scratch()


class MatrixPart(ctypes.Structure):
    """kernels/plainllama.h's MatrixPart: a stored matrix as the C kernels read it."""

    _fields_ = [
        ("layout", ctypes.c_int),
        ("rows", ctypes.c_int),
        ("w", ctypes.c_void_p),
        ("d", ctypes.c_void_p),
        ("m", ctypes.c_void_p),
        ("sc", ctypes.c_void_p),
        ("mn", ctypes.c_void_p),
        ("qh", ctypes.c_void_p),
    ]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def adjacent(tensors: list[torch.Tensor]) -> bool:
    """Whether the tensors lie one after another in one buffer, as the parts of a stacked matrix do
    in a layer read for streaming (streaming.py places them so)."""
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    at = first.data_ptr()
    for t in tensors:
        if (
            not t.is_contiguous()
            or t.untyped_storage().data_ptr() != storage
            or t.data_ptr() != at
            or t.dtype != first.dtype
        ):
            return False
        at += t.numel() * t.element_size()
    return True


def joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated by rows: a view where they are `adjacent`, else a copy."""
    if not adjacent(tensors):
        if tensors[0].device.type != "cpu":
            return torch.cat(tensors)
        rows = sum(t.shape[0] for t in tensors)
        return torch.cat(tensors, out=empty_for_weights((rows, *tensors[0].shape[1:]), tensors[0].dtype))
    first = tensors[0]
    rows = sum(t.shape[0] for t in tensors)
    # torch's stubs lack set_'s form without strides
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (rows, *first.shape[1:]))  # type: ignore[call-overload]


# q8 rows are held with each whole group of 16 blocks (512 weights) in the order the AVX-512 decode
# loop reads (kernels/q8_lanes.h): step s (weights 4s..4s+3 of every block) at 64 s, its 4-byte lane l
# from block Q8_LANES[l]. A last, shorter group stays in GGUF's order.
Q8_LANES = (0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15)


def q8_lanes(qs: torch.Tensor) -> torch.Tensor:
    """Q8_0 numbers int8 [N, K] in GGUF's order, contiguous -> the order q8 rows are held in, in place."""
    N, K = qs.shape
    assert qs.is_contiguous() and qs.dtype == torch.int8
    if kernels.available():
        kernels.check(kernels.function("q8_to_lanes")(qs.data_ptr(), N, K), "q8_to_lanes")
        return qs
    G = K // 512
    if G == 0:
        return qs
    step = max(1, (1 << 20) // K)
    for start in range(0, N, step):  # a slice of rows at a time: the temporary stays small
        whole = qs[start : start + step, : 512 * G]
        natural = whole.reshape(-1, G, 16, 8, 4).clone()  # [n, group, block, step, 4 bytes]
        held = whole.view(-1, G, 8, 16, 4)  # [n, group, step, lane, 4 bytes]
        for lane, block in enumerate(Q8_LANES):
            held[:, :, :, lane] = natural[:, :, block]
    return qs


@cache
def _q8_natural_order(K: int) -> torch.Tensor:
    """Where each number of a q8 row in GGUF's order is held: int64 [K] (q8_lanes)."""
    return _held_positions(K).argsort()


def _held_positions(K: int) -> torch.Tensor:
    """For each place of a held q8 row, the GGUF position of the number there: int64 [K]."""
    G = K // 512
    at = torch.arange(K)
    whole = at[: 512 * G].view(G, 16, 8, 4)  # [group, block, step, 4]: GGUF positions
    held = torch.empty(G, 8, 16, 4, dtype=torch.int64)
    for lane, block in enumerate(Q8_LANES):
        held[:, :, lane] = whole[:, block]
    return torch.cat((held.flatten(), at[512 * G :]))


def q8_natural(qs: torch.Tensor) -> torch.Tensor:
    """q8 rows [..., K] as held -> their numbers in GGUF's order (a new tensor), gathered from their
    places in one step (an embedding looks up a row per token: 6 us; 16 copies of lane slices, 69)."""
    return qs[..., _q8_natural_order(qs.shape[-1])]


class _NaturalQ8Rows:
    """q8 rows read back in GGUF's order a slice at a time (values[start:end]), for torch's forms."""

    def __init__(self, qs: torch.Tensor):
        self.qs, self.shape = qs, qs.shape

    def __getitem__(self, rows) -> torch.Tensor:
        return q8_natural(self.qs[rows])


# q4 and q5 rows are held with each group of up to 16 blocks' pieces side by side, the order the
# decode loops read (kernels/q4_lanes.h): in a group of B blocks, piece p (bytes 4p..4p+3 of each
# block) at 4 B p, block b's at 4 b of it.


def q4_lanes(qs: torch.Tensor) -> torch.Tensor:
    """q4 nibbles uint8 [N, K/2] in GGUF's order, contiguous -> the order q4 rows are held in, in place."""
    N, half = qs.shape
    assert qs.is_contiguous() and qs.dtype == torch.uint8
    if kernels.available():
        kernels.check(kernels.function("q4_to_lanes")(qs.data_ptr(), N, 2 * half), "q4_to_lanes")
        return qs
    step = max(1, (1 << 20) // half)
    for start in range(0, N, step):  # a slice of rows at a time: the temporary stays small
        rows = qs[start : start + step]
        rows.copy_(_q4_reordered(rows, held=True))
    return qs


def _q4_reordered(qs: torch.Tensor, held: bool) -> torch.Tensor:
    """q4 rows [..., K/2] in GGUF's order -> held (held=True), or held -> GGUF's order (a new tensor).
    Within each group of B blocks that is [block, piece, 4 bytes] <-> [piece, block, 4 bytes]: a
    transpose, copied strided (an index gather of the same bytes ran at a fifth of the speed)."""
    lead, half = qs.shape[:-1], qs.shape[-1]
    nb = half // 16
    out = torch.empty_like(qs)
    whole, rest = nb // 16, nb % 16
    for start, groups, blocks in ((0, whole, 16), (256 * whole, 1, rest)):  # whole groups, then a shorter one
        if not groups or not blocks:
            continue
        end = start + 16 * groups * blocks
        natural, in_order = (*lead, groups, blocks, 4, 4), (*lead, groups, 4, blocks, 4)
        src = qs[..., start:end].reshape(natural if held else in_order)
        out[..., start:end].view(in_order if held else natural).copy_(src.transpose(-3, -2))
    return out


def q4_natural(qs: torch.Tensor) -> torch.Tensor:
    """q4 rows [..., K/2] as held -> their bytes in GGUF's order (a new tensor)."""
    return _q4_reordered(qs, held=False)


class _NaturalQ4Rows:
    """q4 rows read back in GGUF's order a slice at a time (values[start:end]), for torch's forms."""

    def __init__(self, qs: torch.Tensor):
        self.qs, self.shape = qs, qs.shape

    def __getitem__(self, rows) -> torch.Tensor:
        return q4_natural(self.qs[rows])


class PackedWeight(nn.Module):
    """A [N, K] weight matrix in one of LAYOUTS. Shared by PackedLinear and PackedEmbedding (tied
    embeddings are one PackedWeight used by both)."""

    # the parts (buffers): w for 16-bit layouts; qs, d and, for q4 with minimums, m for the others;
    # q5: those of q4 and qh; q6: qs, sc, d. q4/q5 with K-quant scales (Q4_K, Q5_K as stored): d and
    # m per 256 weights and uint8 sc, mn per 32: a block's scale is d * sc, its minimum m * mn.
    w: torch.Tensor
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    sc: torch.Tensor
    mn: torch.Tensor
    qh: torch.Tensor

    def __init__(self, layout: str, shape: tuple[int, int], parts: dict[str, torch.Tensor]):
        super().__init__()
        assert layout in LAYOUTS
        self.layout, self.shape = layout, tuple(shape)
        # The C kernels read these buffers by the shape alone: a mismatch would read past their ends.
        n, k = self.shape
        if layout in ("f16", "bf16"):
            expected = {"w": (n, k)}
        elif layout == "q6":
            expected = {"qs": (n, k // QK_K * Q6_BYTES), "sc": (n, k // 16), "d": (n, k // QK_K)}
        elif layout == "q2":
            expected = {"qs": (n, k // QK_K * Q2_BYTES), "sc": (n, k // 16), "d": (n, k // QK_K), "m": (n, k // QK_K)}
        elif layout == "q3":
            expected = {"qs": (n, k // QK_K * Q3_BYTES), "sc": (n, k // 16), "d": (n, k // QK_K)}
        else:
            expected = {"qs": (n, k if layout == "q8" else k // 2), "d": (n, k // QK), "m": (n, k // QK)}
            if layout == "q5":
                expected["qh"] = (n, k // QK)
            if "sc" in parts and layout in ("q4", "q5"):  # K-quant scales: all four parts
                expected.update(d=(n, k // QK_K), m=(n, k // QK_K), sc=(n, k // QK), mn=(n, k // QK))
                if {"d", "m", "sc", "mn"} - set(parts) or parts["sc"].dtype != torch.uint8:
                    raise ValueError(f"{layout} weight with K-quant scales needs uint8 sc, mn and float16 d, m")
        for name, tensor in parts.items():
            if tuple(tensor.shape) != expected.get(name):
                raise ValueError(
                    f"{layout} weight of shape {self.shape}: part {name!r} has shape {tuple(tensor.shape)}, expected "
                    f"{expected.get(name)}"
                )
        for name, tensor in parts.items():
            self.register_buffer(name, tensor, persistent=False)
        self.part_names = tuple(parts)
        self.k_scales = layout in ("q4", "q5") and "sc" in parts
        self.serves_rows = False  # set by a PackedEmbedding that looks rows up in it
        self._torch: Int4Product | Int4PairProduct | Int8BlockProduct | HalfProduct | None = None  # torch_product()

    @staticmethod
    def stack(parts: list[PackedWeight]) -> PackedWeight:
        """Matrices of one layout and width stacked by rows (q, k, v into one matrix)."""
        names = parts[0].part_names
        rows = sum(p.shape[0] for p in parts)
        return PackedWeight(
            parts[0].layout, (rows, parts[0].shape[1]), {n: joined([getattr(p, n) for p in parts]) for n in names}
        )

    @property
    def nbytes(self) -> int:
        held = sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self.part_names)
        return held + (self._torch.nbytes if self._torch is not None else 0)

    def torch_product(self) -> Int4Product | Int4PairProduct | Int8BlockProduct | HalfProduct:
        """The form PyTorch's weight-only operators multiply (torch_products.py), for CPUs where the C
        kernels do not run; built once. The stored parts are then let go unless an embedding looks
        rows up in them (tied embeddings keep both: the table is held twice)."""
        if self._torch is None:
            if self.layout == "q4":
                self._torch = Int4Product(_NaturalQ4Rows(self.qs), *_block_scales(self._parts()))
            elif self.layout == "q8":
                self._torch = Int4PairProduct(_NaturalQ8Rows(self.qs), self.d.float())
            elif self.layout == "q5":  # weight = d (q - 16) + (m + 16 d): 8-bit values, scale and zero per 32
                d, m = _block_scales(self._parts())
                zeros = m + 16 * d if m is not None else torch.zeros_like(d)
                self._torch = Int4PairProduct(self._signed_values(), d, zeros)
            elif self.layout in ("q6", "q3"):  # weight = (d sc) (q - 32 or 4): int8 values, a scale per 16
                scale = self.d.float().repeat_interleave(QK_K // 16, dim=-1) * self.sc.float()
                self._torch = Int8BlockProduct(self._signed_values(), scale, 16)
            elif self.layout == "q2":  # no torch form takes a minimum per 16: requantized to int8 per 16
                self._torch = Int8BlockProduct(*self._requantized_per_16())
            else:
                self._torch = HalfProduct(self.w)
            if not self.serves_rows:
                for name in self.part_names:
                    delattr(self, name)
                self.part_names = ()
        return self._torch

    def _signed_values(self) -> torch.Tensor:
        """q5's q - 16, q6's q - 32 or q3's q - 4 as int8 [N, K], unpacked a slice of rows at a time
        (the int16 temporaries of a whole output matrix would be several times its size)."""
        N, K = self.shape
        out = torch.empty(N, K, dtype=torch.int8)
        for start in range(0, N, 1024):
            rows = slice(start, start + 1024)
            if self.layout == "q6":
                out[rows] = (q6_values(self.qs[rows]).short() - 32).to(torch.int8)
                continue
            if self.layout == "q3":
                out[rows] = (q3_values(self.qs[rows]).short() - 4).to(torch.int8)
                continue
            nibbles = q4_natural(self.qs[rows]).unflatten(-1, (-1, 16))
            q = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=-1).short()  # [n, K/32, 32]
            fifth = (self.qh[rows][..., None] >> torch.arange(QK, dtype=torch.int32)) & 1
            out[rows] = (q + 16 * fifth - 16).to(torch.int8).flatten(-2)
        return out

    def _requantized_per_16(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The exact values rounded to int8 per 16 weights (scale max|w| / 127), a slice of rows at
        a time: int8 [N, K], float32 scales [N, K/16], 16."""
        N, K = self.shape
        values, scales = torch.empty(N, K, dtype=torch.int8), torch.empty(N, K // 16)
        for start in range(0, N, 1024):
            rows = slice(start, start + 1024)
            w = self._dequantize({n: getattr(self, n)[rows] for n in self.part_names}, torch.float32).unflatten(
                -1, (-1, 16)
            )
            scale = w.abs().amax(dim=-1) / 127
            values[rows] = torch.round(w / scale.clamp(min=1e-30)[..., None]).to(torch.int8).flatten(-2)
            scales[rows] = scale
        return values, scales, 16

    def _parts(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.part_names}

    def rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `index` [...] dequantized -> [..., K] (an embedding lookup)."""
        return self._dequantize({n: getattr(self, n)[index] for n in self.part_names}, dtype)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole matrix as floats [N, K], computed with PyTorch ops (reference and fallback); once
        only the torch form is held, the numbers it multiplies by."""
        if not self.part_names:
            return self.torch_product().dequantized().to(dtype)
        return self._dequantize({n: getattr(self, n) for n in self.part_names}, dtype)

    def _dequantize(self, parts, dtype):
        if self.layout in ("f16", "bf16"):
            return parts["w"].to(dtype)
        if self.layout in ("q6", "q3"):  # d * sc * (q - 32 or 4), with d * sc first as ggml computes it
            scale = parts["d"].float().repeat_interleave(QK_K // 16, dim=-1) * parts["sc"].float()  # [..., K/16]
            q = q6_values(parts["qs"]).float() - 32 if self.layout == "q6" else q3_values(parts["qs"]).float() - 4
            return (scale[..., None] * q.unflatten(-1, (-1, 16))).flatten(-2).to(dtype)
        if self.layout == "q2":  # d * (sc & 15) * q - m * (sc >> 4), in gguf's order of operations
            sc = parts["sc"]  # [..., K/16]
            scale = parts["d"].float().repeat_interleave(QK_K // 16, dim=-1) * (sc & 0x0F).float()
            minimum = parts["m"].float().repeat_interleave(QK_K // 16, dim=-1) * (sc >> 4).float()
            q = q2_values(parts["qs"]).float().unflatten(-1, (-1, 16))  # [..., K/16, 16]
            return (scale[..., None] * q - minimum[..., None]).flatten(-2).to(dtype)
        block_d, block_m = _block_scales(parts)  # [..., K/32] each
        d = block_d[..., None]  # [..., K/32, 1]
        if self.layout == "q8":
            q = q8_natural(parts["qs"]).float().unflatten(-1, (-1, QK))  # [..., K/32, 32]
            return (d * q).flatten(-2).to(dtype)
        nibbles = q4_natural(parts["qs"]).unflatten(-1, (-1, QK // 2))  # [..., K/32, 16]
        q = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=-1).float()  # [..., K/32, 32]
        if self.layout == "q5":  # + 16 where the fifth bit is set (bit k of the block's word: weight k)
            bits = torch.arange(QK, dtype=torch.int32, device=q.device)
            q = q + 16 * ((parts["qh"][..., None] >> bits) & 1).float()
        m = block_m[..., None] if block_m is not None else (-16 if self.layout == "q5" else -8) * d
        return (d * q + m).flatten(-2).to(dtype)

    def unpack_rows(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        """Rows start..end-1 written into `out` [end - start, K]: bfloat16 (each weight rounded once)
        or float32 (exactly the stored numbers)."""
        if not kernels.available():
            out.copy_(self._dequantize({n: getattr(self, n)[start:end] for n in self.part_names}, out.dtype))
            return out
        if self.layout in ("q4", "q5"):
            kernels.q4_to_float(
                self.qs[start:end],
                self.d[start:end],
                self.m[start:end] if "m" in self.part_names else None,
                out,
                self.qh[start:end] if self.layout == "q5" else None,
                *((self.sc[start:end], self.mn[start:end]) if self.k_scales else ()),
            )
        elif self.layout == "q8":
            kernels.q8_to_float(self.qs[start:end], self.d[start:end], out)
        elif self.layout == "q6":
            kernels.q6_to_float(self.qs[start:end], self.sc[start:end], self.d[start:end], out)
        elif self.layout == "q3":
            kernels.q3_to_float(self.qs[start:end], self.sc[start:end], self.d[start:end], out)
        elif self.layout == "q2":
            kernels.q2_to_float(self.qs[start:end], self.sc[start:end], self.d[start:end], self.m[start:end], out)
        elif self.layout == "f16" and out.dtype == torch.bfloat16 and out.numel() % 16 == 0:
            kernels.f16_to_bf16(self.w[start:end], out)  # 0.7 ms per 4M weights; torch's copy_ took 3.8 ms
        else:
            out.copy_(self.w[start:end])
        return out

    def _apply(self, fn, recurse=True):
        # .to(), .float(), .cuda() would turn the float16 scales into another dtype or move the
        # bytes away from the pointers the kernels were given; a packed weight stays as it is.
        raise RuntimeError(
            "packed weights cannot be converted or moved; load the model with dequantize=True to get float weights"
        )

    def direct_call(self):
        """(kernel, pointer arguments) for the few-rows path, computed once: the buffers never move."""
        if not hasattr(self, "_direct"):
            if self.layout in ("q4", "q5"):
                m = self.m.data_ptr() if "m" in self.part_names else None
                sc, mn = (self.sc.data_ptr(), self.mn.data_ptr()) if self.k_scales else (None, None)
                fifth_bits = (self.qh.data_ptr(),) if self.layout == "q5" else ()
                self._direct = (
                    kernels.function(f"{self.layout}_matmul"),
                    (self.qs.data_ptr(), *fifth_bits, self.d.data_ptr(), m, sc, mn),
                )
            elif self.layout == "q8":
                self._direct = (kernels.function("q8_matmul"), (self.qs.data_ptr(), self.d.data_ptr()))
            elif self.layout == "q6":
                self._direct = (
                    kernels.function("q6_matmul"),
                    (self.qs.data_ptr(), self.sc.data_ptr(), self.d.data_ptr()),
                )
            elif self.layout == "q3":
                self._direct = (
                    kernels.function("q3_matmul"),
                    (self.qs.data_ptr(), self.sc.data_ptr(), self.d.data_ptr()),
                )
            elif self.layout == "q2":
                self._direct = (
                    kernels.function("q2_matmul"),
                    (self.qs.data_ptr(), self.sc.data_ptr(), self.d.data_ptr(), self.m.data_ptr()),
                )
            else:
                self._direct = (
                    kernels.function("f16_matmul" if self.layout == "f16" else "bf16_matmul"),
                    (self.w.data_ptr(),),
                )
        return self._direct

    def c_part(self) -> MatrixPart:
        """The C description of this matrix (its buffers' addresses: they never move, see _apply)."""
        w = self.w if self.layout in ("f16", "bf16") else self.qs
        held = {name: getattr(self, name) if name in self.part_names else None for name in ("d", "m", "sc", "mn", "qh")}
        return MatrixPart(LAYOUT_CODES[self.layout], self.shape[0], *(_ptr(t) for t in (w, *held.values())))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x @ W.T [M, N] float32."""
        if x.device.type == "cpu" and not kernels.available():
            return self.torch_product().matmul(x)
        if x.shape[0] <= DIRECT_ROWS and x.device.type == "cpu":
            return self.matmul_each_row(x)
        return self._unpacked_matmul(x)

    def matmul_each_row(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x @ W.T [M, N] float32 with the direct kernels whatever M: each row's result is
        computed as if it were alone (its own quantized activations, its own dot products), so it is
        the same in any company. The rows go DIRECT_CALL_ROWS per call, so the weights are read once
        per 64 rows (once for a decode step's few); from 16 rows a call the kernels take their
        many-rows loops, which give the same bits."""
        M, N = x.shape[0], self.shape[0]
        x = x.float().contiguous()
        out = torch.empty(M, N, dtype=torch.float32)
        kernel, pointers = self.direct_call()
        for start in range(0, M, DIRECT_CALL_ROWS):  # [rows, K] -> out[rows, N], rows contiguous in both
            rows = min(DIRECT_CALL_ROWS, M - start)
            code = kernel(x[start].data_ptr(), rows, x.shape[1], *pointers, N, out[start].data_ptr())
            kernels.check(code, kernel.__name__)
        return out

    def _unpacked_matmul(self, x: torch.Tensor) -> torch.Tensor:
        M, (N, K) = x.shape[0], self.shape
        if self._amx_takes(x, N):
            x = x.float().contiguous()
            out = torch.empty(M, N, dtype=torch.float32)
            rows_tiles = _scratch.get((M + 31) // 32 * 32 * K, torch.bfloat16)  # x as bfloat16 tiles
            if not hasattr(self, "_c_part"):
                self._c_part = self.c_part()
            code = kernels.function("amx_matmul")(
                x.data_ptr(), M, K, ctypes.byref(self._c_part), N, out.data_ptr(), rows_tiles.data_ptr()
            )
            kernels.check(code, "amx_matmul")
            return out
        if self.layout not in ("f16", "bf16") and _int8_prompts():
            return self.matmul_each_row(x)
        compute = torch.bfloat16 if _bf16_products_fast() else torch.float32
        if self.layout in ("f16", "bf16") and self.w.dtype == compute:
            return F.linear(x.to(compute), self.w).float()
        x = x.to(compute)
        if compute == torch.float32:
            return self._float32_matmul(x)
        rows = max(1, min(N, UNPACK_BYTES // (K * compute.itemsize)))
        # The product transposed, out^T [N, M] = W x^T, so that each slice of rows writes its rows of
        # out^T whole; then one copy to float32 [M, N]. Same numbers as F.linear(x, W) into column
        # slices of out, and 4% (512 rows) to 13% (64 rows) faster with oneDNN on a Zen 5. (oneDNN's
        # bfloat16 product gives each row the same result in any company, emulated or not.)
        out_t = torch.empty(N, M, dtype=compute, device=x.device)
        for start in range(0, N, rows):
            end = min(N, start + rows)
            w = self.unpack_rows(start, end, _scratch.get((end - start) * K, compute).view(end - start, K))
            torch.mm(w, x.t(), out=out_t[start:end])
        return torch.empty(M, N, dtype=torch.float32, device=x.device).copy_(out_t.t())

    def _amx_takes(self, x: torch.Tensor, outputs: int) -> bool:
        """Whether amx_matmul.c (any layout) multiplies x by this matrix here, giving `outputs`
        columns (a multiple of 16: its panels) from rows of K inputs (whole blocks of the layout)."""
        K = self.shape[1]
        whole_blocks = K % (256 if self.layout in ("q2", "q3", "q6") else 32) == 0
        return x.device.type == "cpu" and outputs % 16 == 0 and whole_blocks and kernels.amx()

    def amx_swiglu(self, x: torch.Tensor) -> torch.Tensor | None:
        """For the feed-forward's stacked gate and up matrix (this [2F, K]): silu(x Wg^T) * (x Wu^T)
        [M, F] in one call on AMX (kernels/amx_matmul.c's amx_swiglu: the same bits as matmul followed
        by SwiGLU, without the [M, 2F] product in memory), for a prompt's many rows x [M, K]. None
        where that path does not run here (then: matmul, then SwiGLU)."""
        M, (N, K) = x.shape[0], self.shape
        if not (M > DIRECT_ROWS and self._amx_takes(x, N // 2)):
            return None
        x = x.float().contiguous()
        hidden = torch.empty(M, N // 2, dtype=torch.float32)
        rows_tiles = _scratch.get((M + 31) // 32 * 32 * K, torch.bfloat16)
        if not hasattr(self, "_c_part"):
            self._c_part = self.c_part()
        code = kernels.function("amx_swiglu")(
            x.data_ptr(), M, K, ctypes.byref(self._c_part), N // 2, hidden.data_ptr(), rows_tiles.data_ptr()
        )
        kernels.check(code, "amx_swiglu")
        return hidden

    def _float32_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float32 -> x @ W.T [M, N] float32, for CPUs without bfloat16 instructions, with
        every row's result independent of the other rows and of M (the server's prefix cache and
        batched prompt chunks rely on that, as on the bfloat16 and AMX paths). 16-bit weights go to
        kernels/float32_rows.c, whose sums are that by construction. PyTorch's float32 product is
        not: its blocking changes with M (a row's sums differ in the last bits between M = 9 and
        M = 64). Products of exactly TOKEN_TILE rows are: for other layouts (reached only where the
        int8 path is turned off, as products.py --prompt does to compare) the rows go in tiles of
        that many, the last padded with zeros, each W slice multiplied by each tile."""
        M, (N, K) = x.shape[0], self.shape
        if self.layout in ("f16", "bf16") and K % 32 == 0 and kernels.available():
            out = torch.empty(M, N, dtype=torch.float32)
            x = x.contiguous()
            code = kernels.function("half_rows_matmul")(
                x.data_ptr(), M, K, self.w.data_ptr(), int(self.layout == "bf16"), N, out.data_ptr()
            )
            kernels.check(code, "half_rows_matmul")
            return out
        return self._float32_tiles(x)

    def _float32_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """_float32_matmul through PyTorch's float32 product on tiles of exactly TOKEN_TILE rows."""
        M, (N, K) = x.shape[0], self.shape
        tiles = (M + TOKEN_TILE - 1) // TOKEN_TILE
        padded = x.new_zeros(tiles * TOKEN_TILE, K)
        padded[:M] = x
        out_t = torch.empty(tiles, N, TOKEN_TILE, dtype=torch.float32, device=x.device)  # per tile: W x_tile^T
        rows = max(1, min(N, UNPACK_BYTES // (K * 4)))
        for start in range(0, N, rows):
            end = min(N, start + rows)
            w = self.unpack_rows(start, end, _scratch.get((end - start) * K, torch.float32).view(end - start, K))
            for t in range(tiles):
                torch.mm(w, padded[t * TOKEN_TILE : (t + 1) * TOKEN_TILE].t(), out=out_t[t, start:end])
        return out_t.transpose(1, 2).reshape(tiles * TOKEN_TILE, N)[:M].contiguous()


class PackedLinear(nn.Module):
    """nn.Linear without bias whose weight is a PackedWeight."""

    def __init__(self, weight: PackedWeight):
        super().__init__()
        self.packed = weight
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        out = self.packed.matmul(x.reshape(-1, self.in_features))
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        """The weight as floats, for code that reads it (inspection, export); computed on demand."""
        return self.packed.dequantized(torch.float32)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout={self.packed.layout}"


class StackedLinear(nn.Module):
    """Linear layers applied to the same input, their outputs side by side: a stacked matrix whose
    parts are stored in different layouts (llama.cpp's mixed "_M" files)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([part.weight for part in self.parts])  # type: ignore[misc]  # each part's weight property


class PackedEmbedding(nn.Module):
    """nn.Embedding whose table is a PackedWeight: only the looked-up rows are dequantized."""

    def __init__(self, weight: PackedWeight, dtype: torch.dtype):
        super().__init__()
        self.packed, self.dtype = weight, dtype
        weight.serves_rows = True
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, D]
        return self.packed.rows(tokens, self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.dequantized(self.dtype)


# ---- from stored GGUF blocks -----------------------------------------------------------------


def _block_scales(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each 32-weight block's scale and minimum (None without minimums) as float32 [..., K/32]. With
    K-quant scales these are d * sc and m * mn, as ggml computes them: an 11-bit float16 times a 6-bit
    integer, exact in float32."""
    if "sc" in parts and "mn" in parts:
        per_block = QK_K // QK
        d = parts["d"].float().repeat_interleave(per_block, dim=-1) * parts["sc"].float()
        return d, parts["m"].float().repeat_interleave(per_block, dim=-1) * parts["mn"].float()
    return parts["d"].float(), parts["m"].float() if "m" in parts else None


def _field(blocks: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Bytes start..stop of every block, copied out: [n, stop - start] uint8. Copied as the widest
    integers the layout allows, which is several times faster than byte by byte (this copy is most
    of the work of turning a streamed Q4_0 layer's bytes into the kernels' layout; docs/performance.md)."""
    out = empty_for_weights((blocks.shape[0], stop - start), torch.uint8)
    for dtype in (torch.int64, torch.int32, torch.int16):
        size = dtype.itemsize
        if blocks.shape[1] % size == 0 and start % size == 0 and stop % size == 0 and blocks.data_ptr() % size == 0:
            out.view(dtype).copy_(blocks.view(dtype)[:, start // size : stop // size])
            return out
    return out.copy_(blocks[:, start:stop])


def _half_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    return _field(blocks, offset, offset + 2).view(torch.float16)  # [n, 1]


def pack_gguf(raw: torch.Tensor, type_name: str, shape: tuple[int, int]) -> PackedWeight:
    """Raw GGUF bytes of a [N, K] matrix -> PackedWeight, for a tensor `holding` says is held
    "gguf" (its layout chosen there)."""
    N, K = shape
    layout = holding(type_name, shape, "packed", torch.float32, raw=True).layout
    if layout is None:
        raise ValueError(f"a {type_name} matrix of shape {shape} has no packed layout")
    if type_name in ("F16", "BF16"):
        # a view of the file's bytes: no copy, pages read from disk as they are used
        return PackedWeight(layout, shape, {"w": dequantize(raw, type_name, shape)})
    per_block, block_bytes, _ = BLOCK_FORMATS[type_name]
    blocks = raw.view(-1, block_bytes)
    nb = K // QK
    if type_name == "Q4_0":  # d, qs[16]
        return PackedWeight(
            "q4",
            shape,
            {"qs": q4_lanes(_field(blocks, 2, 18).view(N, K // 2)), "d": _half_field(blocks, 0).reshape(N, nb)},
        )
    if type_name == "Q4_1":  # d, m, qs[16]
        parts = {
            "qs": q4_lanes(_field(blocks, 4, 20).view(N, K // 2)),
            "d": _half_field(blocks, 0).reshape(N, nb),
            "m": _half_field(blocks, 2).reshape(N, nb),
        }
        return PackedWeight("q4", shape, parts)
    if type_name == "Q8_0":  # d, qs[32]
        return PackedWeight(
            "q8",
            shape,
            {
                "qs": q8_lanes(_field(blocks, 2, 34).view(torch.int8).reshape(N, K)),
                "d": _half_field(blocks, 0).reshape(N, nb),
            },
        )
    if type_name in ("Q5_0", "Q5_1"):  # d, [m], qh (32 bits, bit k: weight k), qs[16] as Q4_0's
        start = 2 if type_name == "Q5_0" else 4
        parts = {
            "qs": q4_lanes(_field(blocks, start + 4, start + 20).view(N, K // 2)),
            "qh": _field(blocks, start, start + 4).view(torch.int32).reshape(N, nb),
            "d": _half_field(blocks, 0).reshape(N, nb),
        }
        if type_name == "Q5_1":
            parts["m"] = _half_field(blocks, 2).reshape(N, nb)
        return PackedWeight("q5", shape, parts)
    if type_name == "Q4_K":
        return _pack_q4_k(blocks, shape)
    if type_name == "Q5_K":
        return _pack_q5_k(blocks, shape)
    if type_name == "Q3_K":
        return _pack_q3_k(blocks, shape)
    if layout == "q6":
        return _pack_q6_k(blocks, shape)
    if layout == "q2":
        return _pack_q2_k(blocks, shape)
    return quantize_int8(GGUFRows(raw, type_name, shape))


class GGUFRows:
    """A block-quantized GGUF matrix [N, K] whose rows are dequantized only when sliced, so that
    quantize_int8 requantizes a type without a packed layout of its own a slice of rows at a time
    (dequantized whole, the 100M-weight Q6_K output matrix of a Llama-3.2-1B-shaped file took
    1 GB of float32 temporaries, beyond what the memory planner allows for)."""

    def __init__(self, raw: torch.Tensor, type_name: str, shape: tuple[int, int]):
        per_block, block_bytes, _ = BLOCK_FORMATS[type_name]
        self.raw, self.type_name, self.shape = raw, type_name, shape
        self.row_bytes = shape[1] // per_block * block_bytes  # ggml rows are whole blocks

    def __getitem__(self, rows: slice) -> torch.Tensor:  # -> float32 [rows, K]
        start, stop, _ = rows.indices(self.shape[0])
        return dequantize(
            self.raw[start * self.row_bytes : stop * self.row_bytes], self.type_name, (stop - start, self.shape[1])
        )


def _pack_q5_k(blocks: torch.Tensor, shape) -> PackedWeight:
    """Q5_K: Q4_K's layout (d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles) with
    32 bytes of fifth bits before the nibbles: bit s of byte l is the fifth bit of weight l of
    sub-block s. Held as Q4_K is (_pack_q4_k), with a 32-bit word of fifth bits per sub-block."""
    N, K = shape
    n = blocks.shape[0]
    packed = _pack_q4_k(torch.cat((blocks[:, 0:16], blocks[:, 48:176]), dim=1), shape)  # without the fifth bits
    qh = torch.empty(n, 8, dtype=torch.int32)
    sub_blocks = torch.arange(8, dtype=torch.uint8)[:, None]
    positions = torch.arange(32, dtype=torch.int64)
    for start in range(0, n, 4096):  # a slice at a time: the bits take 1 KB per super-block
        bits = (blocks[start : start + 4096, 16:48][:, None, :] >> sub_blocks) & 1  # [n, sub-block, l]
        words = (bits.long() << positions).sum(-1)  # [n, 8]: bit l is weight l's fifth bit
        qh[start : start + 4096] = torch.where(words >= 1 << 31, words - (1 << 32), words).int()  # as int32
    parts = {name: getattr(packed, name) for name in packed.part_names}
    return PackedWeight("q5", shape, {**parts, "qh": qh.reshape(N, K // QK)})


def _pack_q4_k(blocks: torch.Tensor, shape) -> PackedWeight:
    """Q4_K: 256-weight super-blocks of eight 32-weight sub-blocks, weight = d*scale*q - dmin*min.
    Held exactly: q4 with K-quant scales, d and m = -dmin per super-block, the 6-bit scale and min of
    each sub-block as a byte (4.63 bits a weight against the file's 4.5; a float16 d*scale per
    sub-block would round, and take 5). The nibbles are laid out differently (a 32-byte chunk holds
    one sub-block in its low nibbles and the next in its high ones), so they are regrouped into q4's
    order (byte j = weights j and j+16 of one block)."""
    N, K = shape
    n = blocks.shape[0]
    scales, mins = _k_scales_mins(blocks[:, 4:16])  # [n, 8] each
    chunks = blocks[:, 16:144].reshape(n, 4, 32)
    sub = torch.stack((chunks & 0x0F, chunks >> 4), dim=2).reshape(n, 8, 32)  # [n, sub-block, 32 values]
    qs = empty_for_weights((N, K // 2), torch.uint8)
    torch.bitwise_or(sub[..., :16], sub[..., 16:] << 4, out=qs.view(n, 8, 16))
    parts = {
        "qs": q4_lanes(qs),
        "d": _half_field(blocks, 0).reshape(N, K // QK_K),
        "m": (-_half_field(blocks, 2)).reshape(N, K // QK_K),  # -dmin: a sign flip, exact
        "sc": scales.to(torch.uint8).reshape(N, K // QK),
        "mn": mins.to(torch.uint8).reshape(N, K // QK),
    }
    return PackedWeight("q4", shape, parts)


Q6_BYTES = 192  # bytes of 6-bit values per 256 weights in the q6 layout


def _q6_planes(values: torch.Tensor) -> torch.Tensor:
    """6-bit values [n, 256] uint8 (0..63, weight order) of n super-blocks -> the q6 layout's 192
    bytes each: 16 sub-blocks' 4-weight steps (step s: weights 16j + 4s .. 16j + 4s + 3 at bytes
    4j..4j+3), steps 0, 1, 2 in the low 6 bits of three 64-byte vectors and step 3 two bits in the
    top two of each (kernels/q6_matmul.c: why)."""
    steps = values.view(-1, 16, 4, 4).transpose(1, 2).reshape(-1, 4, 64)  # [n, step, lane*4+t]
    last = steps[:, 3]
    return torch.cat(
        (
            steps[:, 0] | ((last & 3) << 6),
            steps[:, 1] | (((last >> 2) & 3) << 6),
            steps[:, 2] | ((last >> 4) << 6),
        ),
        dim=-1,
    )


Q6_STEP = 4096  # super-blocks (1M weights) regrouped at a time: ~8 MB of uint8 temporaries (those of
# a whole output matrix would be several times its size)


def _pack_q6_k(blocks: torch.Tensor, shape) -> PackedWeight:
    """Q6_K (ql[128], qh[64], scales int8[16], d float16 per 256 weights; weight = d * scale * (q - 32))
    -> the q6 layout of kernels/q6_matmul.c: the same numbers, the 6-bit values regrouped (_q6_planes)."""
    N, K = shape
    n = blocks.shape[0]  # super-blocks
    packed = empty_for_weights((n, Q6_BYTES), torch.uint8)
    for start in range(0, n, Q6_STEP):
        packed[start : start + Q6_STEP] = _q6_planes(q6_k_values(blocks[start : start + Q6_STEP]))
    parts = {
        "qs": packed.view(N, K // QK_K * Q6_BYTES),
        "sc": blocks[:, 192:208].contiguous().view(torch.int8).reshape(N, K // 16),
        "d": _half_field(blocks, 208).reshape(N, K // QK_K),
    }
    return PackedWeight("q6", shape, parts)


Q2_BYTES = 64  # bytes of 2-bit values per 256 weights in the q2 layout


def _q2_plane(values: torch.Tensor) -> torch.Tensor:
    """2-bit values [n, 256] uint8 (0..3, weight order) of n super-blocks -> the q2 layout's 64 bytes
    each: q6's steps (step s: weights 16j + 4s .. 16j + 4s + 3 at bytes 4j..4j+3), step s in bits
    2s..2s+1 of every byte."""
    steps = values.view(-1, 16, 4, 4).transpose(1, 2).reshape(-1, 4, 64)  # [n, step, lane*4+t]
    return steps[:, 0] | (steps[:, 1] << 2) | (steps[:, 2] << 4) | (steps[:, 3] << 6)


def _pack_q2_k(blocks: torch.Tensor, shape) -> PackedWeight:
    """Q2_K (scales[16]: a 4-bit scale and min per 16 weights, qs[64], d, dmin float16 per 256) -> the
    q2 layout: the same numbers, the 2-bit values regrouped (_q2_plane), 84 bytes per 256 as in the file."""
    N, K = shape
    n = blocks.shape[0]
    packed = empty_for_weights((n, Q2_BYTES), torch.uint8)
    for start in range(0, n, Q6_STEP):
        packed[start : start + Q6_STEP] = _q2_plane(q2_k_values(blocks[start : start + Q6_STEP]))
    parts = {
        "qs": packed.view(N, K // QK_K * Q2_BYTES),
        "sc": blocks[:, 0:16].contiguous().view(N, K // 16),
        "d": _half_field(blocks, 80).reshape(N, K // QK_K),
        "m": _half_field(blocks, 82).reshape(N, K // QK_K),
    }
    return PackedWeight("q2", shape, parts)


def q2_values(qs: torch.Tensor) -> torch.Tensor:
    """The q2 layout's values [..., K/256 * 64] -> q [..., K] uint8 0..3 in weight order."""
    planes = qs.unflatten(-1, (-1, 1, 64))  # [..., S, 1, 64]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qs.device).view(4, 1)
    steps = (planes >> shifts) & 3  # [..., S, step, lane * 4 + t]
    return steps.unflatten(-1, (16, 4)).transpose(-3, -2).flatten(-4)  # [..., S, lane, step, t] -> [..., K]


Q3_BYTES = 96  # bytes of 3-bit values per 256 weights in the q3 layout


def _q3_planes(values: torch.Tensor) -> torch.Tensor:
    """3-bit values [n, 256] uint8 (0..7, weight order) of n super-blocks -> the q3 layout's 96 bytes
    each: the low 2 bits as q2's 64 bytes (_q2_plane), then the third bits of each of the four steps
    as a 64-bit little-endian word (bit 4j + t of word s: weight 16j + 4s + t)."""
    steps = values.view(-1, 16, 4, 4).transpose(1, 2).reshape(-1, 4, 8, 8)  # [n, step, byte, bit]
    third = ((steps >> 2) << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)  # [n, step, 8]
    return torch.cat((_q2_plane(values & 3), third.reshape(-1, 32)), dim=-1)


def q3_values(qs: torch.Tensor) -> torch.Tensor:
    """The q3 layout's values [..., K/256 * 96] -> q [..., K] uint8 0..7 in weight order."""
    planes = qs.unflatten(-1, (-1, Q3_BYTES))  # [..., S, 96]
    low = q2_values(planes[..., :Q2_BYTES].flatten(-2))  # [..., K]
    bits = (planes[..., Q2_BYTES:, None] >> torch.arange(8, dtype=torch.uint8, device=qs.device)) & 1
    third = bits.unflatten(-2, (4, 8)).flatten(-2)  # [..., S, step, 64 = lane * 4 + t]
    third = third.unflatten(-1, (16, 4)).transpose(-3, -2).flatten(-4)  # [..., S, lane, step, t] -> [..., K]
    return low | (third << 2)


def _pack_q3_k(blocks: torch.Tensor, shape) -> PackedWeight:
    """Q3_K (3-bit q in -4..3, a 6-bit scale per 16 weights, float16 d per 256: weight = d * scale * q)
    -> the q3 layout: q + 4 regrouped (_q3_planes), the scales as int8: the same numbers in 3.56 bits a
    weight (held in q6's layout it took 6.56, as Q8_0 8.5 and a second rounding)."""
    N, K = shape
    n = blocks.shape[0]
    packed = empty_for_weights((n, Q3_BYTES), torch.uint8)
    sc = torch.empty(n, 16, dtype=torch.int8)
    d = torch.empty(n, 1, dtype=torch.float16)
    for start in range(0, n, Q6_STEP):
        q, scale, d_part = q3_k_parts(blocks[start : start + Q6_STEP])
        packed[start : start + Q6_STEP] = _q3_planes((q + 4).to(torch.uint8))
        sc[start : start + Q6_STEP] = scale
        d[start : start + Q6_STEP] = d_part.half()  # read from float16: exact
    parts = {"qs": packed.view(N, K // QK_K * Q3_BYTES), "sc": sc.view(N, K // 16), "d": d.view(N, K // QK_K)}
    return PackedWeight("q3", shape, parts)


def q6_values(qs: torch.Tensor) -> torch.Tensor:
    """The q6 layout's 6-bit values [..., K/256 * 192] -> q [..., K] uint8 0..63 in weight order."""
    planes = qs.unflatten(-1, (-1, 3, 64))  # [..., S, (a, b, c), 64]
    low = planes & 0x3F  # steps 0, 1, 2
    top = planes >> 6  # step 3's bits 0-1, 2-3, 4-5
    last = top[..., 0, :] | (top[..., 1, :] << 2) | (top[..., 2, :] << 4)
    steps = torch.cat((low, last.unsqueeze(-2)), dim=-2)  # [..., S, step, lane * 4 + t]
    return steps.unflatten(-1, (16, 4)).transpose(-3, -2).flatten(-4)  # [..., S, lane, step, t] -> [..., K]


# ---- from float weights (--quantize) ---------------------------------------------------------


QUANTIZE_CHUNK = 1 << 20  # weights quantized at a time: whole-matrix temporaries of a 200M-weight
# embedding were several float32 copies of it (peak RSS 12 GiB loading an 8B model as int8)


def _by_rows(
    weight: torch.Tensor | GGUFRows, parts: dict[str, tuple[tuple[int, ...], torch.dtype]], quantize_rows
) -> dict[str, torch.Tensor]:
    """Quantize `weight` [N, K] a slice of rows at a time into preallocated outputs: `parts` names each
    output's shape per row and dtype; quantize_rows(rows float32) returns that slice of each."""
    N, K = weight.shape
    out = {name: empty_for_weights((N, *shape), dtype) for name, (shape, dtype) in parts.items()}
    step = max(1, QUANTIZE_CHUNK // K)
    for start in range(0, N, step):
        for name, values in quantize_rows(weight[start : start + step].float().reshape(-1, K // QK, QK)).items():
            out[name][start : start + step] = values
    return out


def quantize_int8(weight: torch.Tensor | GGUFRows) -> PackedWeight:
    """[N, K] floats -> q8 by ggml's reference Q8_0 rule: per block of 32, d = max|w| / 127,
    q = w / d rounded half away from zero; d stored as float16."""
    N, K = weight.shape

    def rows(blocks):  # [n, K/32, 32]
        d = blocks.abs().amax(-1) / 127  # [n, K/32]
        inv = torch.where(d > 0, 1 / d, torch.zeros(()))
        scaled = blocks * inv[..., None]
        q = (scaled.sign() * torch.floor(scaled.abs() + 0.5)).to(torch.int8)
        return {"qs": q8_lanes(q.reshape(-1, K)), "d": d.half()}

    return PackedWeight(
        "q8", (N, K), _by_rows(weight, {"qs": ((K,), torch.int8), "d": ((K // QK,), torch.float16)}, rows)
    )


def quantize_int4(weight: torch.Tensor) -> PackedWeight:
    """[N, K] floats -> q4 with minimum by ggml's reference Q4_1 rule: per block of 32, m = min,
    d = (max - min) / 15, q = trunc((w - m) / d + 0.5) in 0..15; d and m stored as float16."""
    N, K = weight.shape

    def rows(blocks):  # [n, K/32, 32]
        lo, hi = blocks.amin(-1), blocks.amax(-1)
        d = (hi - lo) / 15
        inv = torch.where(d > 0, 1 / d, torch.zeros(()))
        q = torch.trunc((blocks - lo[..., None]) * inv[..., None] + 0.5).clamp(0, 15).to(torch.uint8)  # [n, K/32, 32]
        qs = q[..., :16] | (q[..., 16:] << 4)
        return {"qs": q4_lanes(qs.reshape(-1, K // 2).contiguous()), "d": d.half(), "m": lo.half()}

    halves = (K // QK,), torch.float16
    return PackedWeight(
        "q4", (N, K), _by_rows(weight, {"qs": ((K // 2,), torch.uint8), "d": halves, "m": halves}, rows)
    )


def can_quantize(shape) -> bool:
    return len(shape) == 2 and shape[1] % 64 == 0


def quantizes_gguf(type_name: str, shape, weights: str) -> bool:
    """Whether `--quantize` (weights "int8"/"int4") applies to a GGUF tensor: float ones (F32, F16,
    BF16) are quantized like any float checkpoint; quantized ones are already compressed and stay."""
    return weights in ("int8", "int4") and type_name in ("F32", "F16", "BF16") and can_quantize(shape)


# ---- how each tensor is held: decided here once, for the loader, the planner and the streamer ------

Q4_LAYOUT_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # held as q4 as they are (Q5_x: q5, Q6_K: q6, Q3_K: q3, Q2_K: q2)


@dataclass(frozen=True)
class Holding:
    """How a checkpoint tensor is held once built."""

    how: str  # "gguf": packed from its GGUF blocks (pack_gguf); "quantize": --quantize from floats;
    #           "half": its 16-bit floats used as they are; "float": a tensor in the model's dtype
    layout: str | None  # the PackedWeight's layout (q4, q8, f16, bf16); None for "float"
    nbytes: int  # what it takes once built
    as_stored: bool  # the built tensor is the stored bytes themselves (no copy)


def holding(type_name: str, shape: tuple[int, ...], weights: str, dtype: torch.dtype, raw: bool) -> Holding:
    """How the tensor (stored as `type_name`, of `shape`) is held with the weight mode `weights`
    (loading.WEIGHT_MODES) and the model's `dtype`; `raw`: the checkpoint gives its stored GGUF
    bytes (CheckpointTensor.raw), which are packed as they are where a layout takes them. Where the
    C kernels do not run, a quantized matrix is held in PyTorch's form of it (torch_products.py),
    which the planner must count instead."""
    held = _kernel_holding(type_name, shape, weights, dtype, raw)
    if held.layout in ("q2", "q3", "q4", "q5", "q6", "q8") and not kernels.available():
        N, K = shape
        return Holding(held.how, held.layout, torch_form_nbytes(held.layout, N, K), held.as_stored)
    return held


def torch_form_nbytes(layout: str, N: int, K: int) -> int:
    """Bytes of PackedWeight.torch_product's form of a [N, K] matrix in `layout` (torch_products.py)."""
    rows = N + -N % ROW_MULTIPLE  # torch's int4 layout pads rows to a multiple of 16
    if layout == "q4":  # Int4Product: nibbles, a bfloat16 scale and zero point per 32
        return rows * K // 2 + rows * K // QK * 4
    if layout in ("q5", "q8"):  # Int4PairProduct: two int4 matrices
        return rows * K + rows * K // QK * 8
    if layout in ("q2", "q3", "q6"):  # Int8BlockProduct: int8 and a bfloat16 scale per 16
        return N * K + N * K // 16 * 2
    raise ValueError(f"no PyTorch form for layout {layout}")


def _kernel_holding(type_name: str, shape: tuple[int, ...], weights: str, dtype: torch.dtype, raw: bool) -> Holding:
    numel = math.prod(shape)
    stored = STORED_DTYPES.get(type_name)
    # GGUF hands types other than F32 over as a converted copy; elsewhere a tensor already in the
    # model's dtype is used as it is
    as_float = Holding("float", None, numel * dtype.itemsize, stored == dtype and not (raw and stored != torch.float32))
    if weights == "float" or len(shape) != 2:
        return as_float
    N, K = shape
    q4 = N * K // 2 + N * K // QK * 2  # nibbles and float16 scales
    q4_with_min = q4 + N * K // QK * 2
    q4_k = N * K // 2 + N * K // QK * 2 + N * K // QK_K * 4  # nibbles, uint8 sc, mn and float16 d, m per 256
    q8 = N * K + N * K // QK * 2  # int8 and float16 scales (torch_products.py: bfloat16 scales)
    if raw and not quantizes_gguf(type_name, shape, weights):
        if type_name in ("F16", "BF16"):
            return Holding("gguf", type_name.lower(), 2 * numel, True) if K % 32 == 0 else as_float
        if type_name != "F32" and K % 64 == 0:  # the kernels read 64 weights at a time
            if type_name in Q4_LAYOUT_TYPES:
                return Holding("gguf", "q4", {"Q4_0": q4, "Q4_K": q4_k}.get(type_name, q4_with_min), False)
            if type_name == "Q6_K" and K % QK_K == 0:
                return Holding("gguf", "q6", N * K // QK_K * 210, False)
            if type_name == "Q3_K" and K % QK_K == 0:  # its 12 bytes of 6-bit scales as 16 int8
                return Holding("gguf", "q3", N * K // QK_K * (Q3_BYTES + 18), False)
            if type_name == "Q2_K" and K % QK_K == 0 and kernels.available():  # as stored (no torch form)
                return Holding("gguf", "q2", N * K // QK_K * 84, False)
            if type_name in ("Q5_0", "Q5_1", "Q5_K"):  # q4 and a word of fifth bits per block
                as_q4 = {"Q5_0": q4, "Q5_K": q4_k}.get(type_name, q4_with_min)
                return Holding("gguf", "q5", as_q4 + N * K // QK * 4, False)
            return Holding("gguf", "q8", q8, False)  # Q8_0 as it is, other types requantized to it
        if type_name != "F32":
            return as_float
    if weights in ("int8", "int4") and can_quantize(shape):
        return (
            Holding("quantize", "q8", q8, False) if weights == "int8" else Holding("quantize", "q4", q4_with_min, False)
        )
    if not raw and stored in (torch.float16, torch.bfloat16) and K % 32 == 0:
        return Holding("half", type_name.lower(), 2 * numel, True)
    return as_float
