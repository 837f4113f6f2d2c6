"""Weights kept compressed (packed.py and the kernels in kernels/cpu_matmul.c and cpu_matmul_avx2.c).
The kernel tests take the fixture `isa` (conftest.py): they run at every instruction-set level
this CPU has.

Oracles: the `gguf` package's numpy dequantizers and quantizers (llama.cpp's Python reference) for
what each layout holds; float64 products of the same numbers for what the kernels compute; the
same model loaded with float weights for the whole forward pass; llama.cpp for the default model.
"""

import gc
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

import plainllama
from gguf_files import random_blocks, write_llama_gguf
from helpers import llama_cpp_logits
from plainllama.engine.cpu import kernels
from plainllama.engine.cpu.packed import (
    Q8_LANES,
    PackedEmbedding,
    PackedLinear,
    PackedWeight,
    pack_gguf,
    prompt_products,
    quantize_int4,
    quantize_int8,
    q4_lanes,
    q4_natural,
    q8_lanes,
    q8_natural,
)
from plainllama.formats.gguf_quants import BLOCK_FORMATS

needs_kernels = pytest.mark.skipif(
    not kernels.available(), reason="the C kernels need x86-64 with AVX2 and a C compiler"
)

N, K = 96, 512  # K: a multiple of 256, so every block format fits whole rows


def gguf_tensor(type_name, rng):
    """Raw bytes of a random [N, K] tensor of this type, and its exact values by gguf's dequantizer."""
    qtype = GGMLQuantizationType[type_name]
    if type_name in ("F16", "BF16"):
        raw = quants.quantize(rng.standard_normal((N, K)).astype(np.float32), qtype)
    else:
        raw = random_blocks(type_name, N * K // BLOCK_FORMATS[type_name][0], rng)
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    return torch.from_numpy(raw.copy()), quants.dequantize(raw, qtype).reshape(N, K)


@pytest.mark.parametrize(
    "type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "F16", "BF16"]
)
def test_stored_formats_are_kept_exactly(type_name):
    """Every weight as the `gguf` package's dequantizer gives it, bit for bit."""
    if type_name == "Q2_K" and not kernels.available():
        pytest.skip("Q2_K is held as stored only where the C kernels run (no PyTorch form takes its minimums)")
    raw, expected = gguf_tensor(type_name, np.random.default_rng(1))
    packed = pack_gguf(raw, type_name, (N, K))
    layouts = {"Q4_0": "q4", "Q4_1": "q4", "Q4_K": "q4", "Q5_0": "q5", "Q5_1": "q5", "Q5_K": "q5", "Q8_0": "q8"}
    layouts.update(Q6_K="q6", Q3_K="q3", Q2_K="q2")
    assert packed.layout == layouts.get(type_name, type_name.lower())
    np.testing.assert_array_equal(packed.dequantized().numpy(), expected)
    if type_name in ("Q5_0", "Q5_1", "Q6_K", "Q2_K"):  # regrouped, not requantized: the same bytes
        assert packed.nbytes == raw.numel()
    if type_name in ("Q4_K", "Q5_K", "Q3_K"):  # the 12 bytes of 6-bit scales (and mins) take 16
        assert packed.nbytes == raw.numel() + N * K // 256 * 4


def test_the_float16_scales_of_q4_k_would_not_be_exact():
    """Why Q4_K and Q5_K keep their own scales: d * scale rounded to float16 per sub-block (the
    plain q4 layout's form) changes weights in this tensor, by up to 2^-11 of a sub-block's scale."""
    raw, expected = gguf_tensor("Q4_K", np.random.default_rng(1))
    packed = pack_gguf(raw, "Q4_K", (N, K))
    block_d = packed.d.float().repeat_interleave(8, dim=-1) * packed.sc.float()
    assert not torch.equal(block_d.half().float(), block_d)


@pytest.mark.parametrize("type_name", ["Q2_K"])
def test_q2_k_without_kernels_is_requantized_to_q8_0_exactly_as_ggml_would(type_name, monkeypatch):
    """Where the C kernels do not run, Q2_K (whose minimum per 16 weights no PyTorch weight-only
    form takes) is held as Q8_0, requantized from its exact values as ggml's quantizer would."""
    monkeypatch.setattr(kernels, "available", lambda: False)
    raw, expected = gguf_tensor(type_name, np.random.default_rng(3))
    packed = pack_gguf(raw, type_name, (N, K))
    assert packed.layout == "q8"
    qtype = GGMLQuantizationType.Q8_0
    reference = quants.dequantize(quants.quantize(expected.astype(np.float32), qtype), qtype)
    np.testing.assert_array_equal(packed.dequantized().numpy(), reference)


@pytest.mark.parametrize("K", [512, 576, 2048, 1088])
@pytest.mark.parametrize("with_kernels", [True, False])
def test_q8_rows_are_held_in_the_decode_loops_lane_order(K, with_kernels, monkeypatch):
    """q8 rows as kernels/q8_lanes.h describes them, written out here from its definition: in each
    whole group of 512 weights, step s (weights 4s..4s+3 of every block) at byte 64 s, its lane l
    from block Q8_LANES[l]; a last, shorter group (576 = 512 + 64, 1088 = 1024 + 64) in GGUF's order.
    Both the C function and PyTorch's fallback (no kernels) give it, and q8_natural undoes it."""
    if with_kernels and not kernels.available():
        pytest.skip("the C kernels do not run here")
    if not with_kernels:
        monkeypatch.setattr(kernels, "available", lambda: False)
    natural = torch.randint(-128, 128, (5, K), dtype=torch.int8, generator=torch.Generator().manual_seed(K))
    expected = natural.clone()
    for g in range(K // 512):
        for s in range(8):
            for lane in range(16):
                block = 16 * g + Q8_LANES[lane]
                at = 512 * g + 64 * s + 4 * lane
                expected[:, at : at + 4] = natural[:, 32 * block + 4 * s : 32 * block + 4 * s + 4]
    held = q8_lanes(natural.clone())
    assert torch.equal(held, expected)
    assert torch.equal(q8_natural(held), natural)
    assert torch.equal(q8_natural(held[1:3]), natural[1:3])  # a few rows, as an embedding looks them up


@pytest.mark.parametrize("K", [512, 576, 2048, 1088, 64])
@pytest.mark.parametrize("with_kernels", [True, False])
def test_q4_rows_are_held_in_the_decode_loops_lane_order(K, with_kernels, monkeypatch):
    """q4 rows as kernels/q4_lanes.h describes them, written out here from its definition: in each
    group of B blocks (16, or fewer in a last one: 576 = 512 + 64 weights, 1088 = 1024 + 64, 64 alone),
    piece p (bytes 4p..4p+3 of every block) at byte 4 B p of the group, block b's at 4 b of it. Both
    the C function and PyTorch's fallback (no kernels) give it, and q4_natural undoes it."""
    if with_kernels and not kernels.available():
        pytest.skip("the C kernels do not run here")
    if not with_kernels:
        monkeypatch.setattr(kernels, "available", lambda: False)
    natural = torch.randint(0, 256, (5, K // 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(K))
    expected = natural.clone()
    nb = K // 32
    for g in range(0, nb, 16):
        B = min(16, nb - g)
        for p in range(4):
            for b in range(B):
                at = 16 * g + 4 * B * p + 4 * b  # the group starts at byte 256 g' = 16 * (its first block)
                expected[:, at : at + 4] = natural[:, 16 * (g + b) + 4 * p : 16 * (g + b) + 4 * p + 4]
    held = q4_lanes(natural.clone())
    assert torch.equal(held, expected)
    assert torch.equal(q4_natural(held), natural)
    assert torch.equal(q4_natural(held[1:3]), natural[1:3])  # a few rows, as an embedding looks them up


def test_quantize_int8_and_int4_are_ggml_q8_0_and_q4_1_byte_for_byte():
    w = np.random.default_rng(4).standard_normal((N, K)).astype(np.float32)
    w[0, :32] = 0  # an all-zero block
    q8 = quantize_int8(torch.from_numpy(w))
    ref = quants.quantize(w, GGMLQuantizationType.Q8_0).reshape(N, K // 32, 34)
    np.testing.assert_array_equal(q8.d.view(torch.uint8).numpy().reshape(N, K // 32, 2), ref[..., :2])
    np.testing.assert_array_equal(q8_natural(q8.qs).view(torch.uint8).numpy().reshape(N, K // 32, 32), ref[..., 2:])
    q4 = quantize_int4(torch.from_numpy(w))
    ref = quants.quantize(w, GGMLQuantizationType.Q4_1).reshape(N, K // 32, 20)
    np.testing.assert_array_equal(q4.d.view(torch.uint8).numpy().reshape(N, K // 32, 2), ref[..., :2])
    np.testing.assert_array_equal(q4.m.view(torch.uint8).numpy().reshape(N, K // 32, 2), ref[..., 2:4])
    np.testing.assert_array_equal(q4_natural(q4.qs).numpy().reshape(N, K // 32, 16), ref[..., 4:])


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """What the kernels multiply by: x quantized per block of 32 to int8 (scale max|x| / 127,
    rounded to nearest even), then scaled back, in float64."""
    blocks = x.double().unflatten(-1, (-1, 32))
    amax = blocks.abs().amax(-1, keepdim=True).float()
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros(()))
    q = torch.round(blocks.float() * inv)  # float32 product, as in the kernel
    return (q.double() * (amax / 127.0).double()).flatten(-2)


def packed_weights(rng_seed=5, n=N):
    """The layouts of one random [n, K] matrix (n <= N)."""
    w = torch.from_numpy(np.random.default_rng(rng_seed).standard_normal((n, K)).astype(np.float32)) * 0.05
    raw, _ = gguf_tensor("Q4_0", np.random.default_rng(rng_seed))
    return {
        "q4 (Q4_1 rule, with minimums)": quantize_int4(w),
        "q4 (Q4_0, no minimums)": pack_gguf(raw[: n * (K // 32) * 18], "Q4_0", (n, K)),
        "q8": quantize_int8(w),
        "q5 (Q5_0, no minimums)": pack_gguf(
            gguf_tensor("Q5_0", np.random.default_rng(rng_seed))[0][: n * (K // 32) * 22], "Q5_0", (n, K)
        ),
        "q4 (Q4_K)": pack_gguf(
            gguf_tensor("Q4_K", np.random.default_rng(rng_seed))[0][: n * (K // 256) * 144], "Q4_K", (n, K)
        ),
        "q5 (Q5_K)": pack_gguf(
            gguf_tensor("Q5_K", np.random.default_rng(rng_seed))[0][: n * (K // 256) * 176], "Q5_K", (n, K)
        ),
        "q6 (Q6_K)": pack_gguf(
            gguf_tensor("Q6_K", np.random.default_rng(rng_seed))[0][: n * (K // 256) * 210], "Q6_K", (n, K)
        ),
        "q3 (Q3_K)": pack_gguf(
            gguf_tensor("Q3_K", np.random.default_rng(rng_seed))[0][: n * (K // 256) * 110], "Q3_K", (n, K)
        ),
        "q2 (Q2_K)": pack_gguf(
            gguf_tensor("Q2_K", np.random.default_rng(rng_seed))[0][: n * (K // 256) * 84], "Q2_K", (n, K)
        ),
        "f16": PackedWeight("f16", (n, K), {"w": w.half()}),
        "bf16": PackedWeight("bf16", (n, K), {"w": w.bfloat16()}),
    }


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("name", list(packed_weights()))
def test_kernels_compute_the_product_of_the_stored_numbers(name, rows, isa):
    packed = packed_weights()[name]
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    assert_product_of_stored_numbers(packed, x, packed.matmul(x))


@needs_kernels
@pytest.mark.parametrize("n, k", [(7, 64), (13, 576), (5, 1600), (10, 8192)])
@pytest.mark.parametrize("layout", ["q4", "q4 no minimums", "q5", "q5 no minimums", "q8"])
def test_quantized_kernels_at_widths_that_leave_a_partial_group(layout, n, k, isa):
    """The q4/q5/q8 kernels take 16 blocks (512 weights; 8 blocks at the avx2 level) at a time and x
    rows 4 (avx2: 2) at a time: widths of 2, 18 and 50 blocks leave a partial last group (576 is
    SmolLM2's width; q8 rows hold whole groups in the decode loop's lane order and a partial one in
    GGUF's, so both forms are met), 19 rows of x leave a partial tile (and take the many-rows path of prompts,
    from 16 rows at the AVX-512 level), and 5, 7, 10 and 13 weight rows a partial row group (4
    weight rows per work item; 8 for q4/q5 at the avx2 level, so 13 and 10 are a whole group and a
    partial one). Checked against the float64 product of the stored numbers, and each row of x
    against the same row multiplied alone (bit-identical: the arithmetic of a row must not depend
    on the rows beside it)."""
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g) * 0.05
    packed = quantize_int8(w) if layout == "q8" else quantize_int4(w)
    if layout == "q4 no minimums":
        packed = PackedWeight("q4", (n, k), {"qs": packed.qs, "d": packed.d})
    if layout.startswith("q5"):  # Q5_1 / Q5_0 blocks as a file holds them (q5: q4 plus fifth bits)
        type_name = "Q5_1" if layout == "q5" else "Q5_0"
        raw = np.ascontiguousarray(random_blocks(type_name, n * k // 32, np.random.default_rng(n * k)))
        packed = pack_gguf(torch.from_numpy(raw.view(np.uint8).reshape(-1).copy()), type_name, (n, k))
    x = torch.randn(19, k, generator=g)
    out = packed.matmul_each_row(x)
    assert_product_of_stored_numbers(packed, x, out)
    for i in range(19):
        assert torch.equal(packed.matmul_each_row(x[i : i + 1])[0], out[i])
    assert torch.equal(packed.matmul_each_row(x[3:8]), out[3:8])


@needs_kernels
@pytest.mark.parametrize("n, k", [(7, 256), (13, 768), (5, 1792), (10, 8192)])
@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"])
def test_k_quant_kernels_at_every_shape(type_name, n, k, isa):
    """The K-quants as held: q6_matmul, q3_matmul and q2_matmul take 256 weights (one super-block) at a time; q4/q5 with
    K-quant scales (d, m per 256 weights, sc, mn per 32) take the AVX-512 kernel's 16-block groups,
    which 1, 3, 7 and 32 super-blocks a row leave whole or half full (the last group's second
    super-block scale must not be read). 4 weight rows per work item (avx2 q4/q5: 8) and 4 (avx2: 2)
    rows of x per tile: 5, 7, 10 and 13 rows leave a partial row group, 19 rows of x a partial tile
    (and take the many-rows path of prompts, from 16 rows at the AVX-512 level). Checked as
    test_quantized_kernels_at_widths_that_leave_a_partial_group: against the float64 product of the
    numbers `gguf` dequantizes, and each row of x alone; and the rows unpacked to bfloat16 for
    prompts, against the same numbers."""
    rng = np.random.default_rng(n * k)
    raw = np.ascontiguousarray(random_blocks(type_name, n * k // 256, rng)).view(np.uint8).reshape(-1)
    packed = pack_gguf(torch.from_numpy(raw.copy()), type_name, (n, k))
    assert packed.k_scales == (type_name in ("Q4_K", "Q5_K"))
    expected = quants.dequantize(raw, GGMLQuantizationType[type_name]).reshape(n, k)
    np.testing.assert_array_equal(packed.dequantized().numpy(), expected)
    x = torch.randn(19, k, generator=torch.Generator().manual_seed(n))
    out = packed.matmul_each_row(x)
    assert_product_of_stored_numbers(packed, x, out)
    for i in range(19):
        assert torch.equal(packed.matmul_each_row(x[i : i + 1])[0], out[i])
    unpacked = torch.empty(n, k, dtype=torch.bfloat16)
    packed.unpack_rows(0, n, unpacked)
    torch.testing.assert_close(unpacked.float(), torch.from_numpy(expected), rtol=2**-7, atol=1e-6)
    exact = torch.empty(n, k, dtype=torch.float32)
    np.testing.assert_array_equal(packed.unpack_rows(0, n, exact).numpy(), expected)


def assert_product_of_stored_numbers(packed, x, out):
    w64 = packed.dequantized().double()
    if packed.layout in ("q4", "q5", "q8", "q6", "q3", "q2"):
        # Exactly the integer scheme (int8 activations per block, as llama.cpp), up to float32 sums...
        torch.testing.assert_close(
            out.double(), int8_activations(x) @ w64.T, rtol=1e-4, atol=1e-4 * w64.abs().max().item()
        )
        # ...which costs about 0.5% against the float product: x's rounding error per element is
        # uniform within half an int8 step, amax / 254 of its block, ~0.5% of its RMS for Gaussian x
        # (amax ~2.3 RMS). Over all outputs at once: a row of a few outputs scatters (5 outputs
        # gave up to 2.3%), the whole product does not.
        exact = x.double() @ w64.T
        assert (out.double() - exact).norm() / exact.norm() < 0.02
    else:
        torch.testing.assert_close(out.double(), x.double() @ w64.T, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 3, 7])
@pytest.mark.parametrize("name", list(packed_weights()))
def test_products_do_not_depend_on_the_thread_count(name, threads, isa):
    """The decode kernels give each thread a range of row groups and let a thread that is done take
    what is left of the others' (cpu_matmul.c's take_groups). With more threads than this machine's
    cores, threads are descheduled mid-product and others can take their groups (how often is up to
    the OS: 20 repeats each); every output must still be computed exactly once by the same
    arithmetic: bit-identical to the default thread count, and the float64 product of the stored
    numbers. 93 rows: a last group of 5 (16-bit) or 1 (q4/q8) rows."""
    packed = packed_weights(n=93)[name]
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(threads))
    expected = packed.matmul(x)
    default = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        outs = [packed.matmul(x) for _ in range(20)]
    finally:
        torch.set_num_threads(default)
    for out in outs:
        assert torch.equal(out, expected)
    assert_product_of_stored_numbers(packed, x, outs[0])


@pytest.mark.parametrize("name", list(packed_weights()))
def test_many_rows_unpack_to_bfloat16_and_match_the_float_product(name, isa):
    from plainllama.engine.cpu import packed as packed_module

    packed = packed_weights()[name]
    x = torch.randn(40, K, generator=torch.Generator().manual_seed(0))
    reference = x.double() @ packed.dequantized().double().T
    out = packed.matmul(x)  # 40 rows: the path this CPU takes for prompts
    if packed.layout not in ("f16", "bf16") and packed_module._int8_prompts():
        assert_product_of_stored_numbers(packed, x, out)  # int8 activations (CPUs without bfloat16)
        return
    relative = ((out.double() - reference).norm(dim=-1) / reference.norm(dim=-1)).max()
    assert relative < 0.01  # bfloat16's 8-bit mantissa (or float32 products)


@needs_kernels
@pytest.mark.parametrize(
    "name",
    [
        "q4 (Q4_1 rule, with minimums)",
        "q4 (Q4_0, no minimums)",
        "q5 (Q5_0, no minimums)",
        "q4 (Q4_K)",
        "q5 (Q5_K)",
        "q8",
        "q6 (Q6_K)",
        "q3 (Q3_K)",
        "q2 (Q2_K)",
        "f16",
    ],
)
def test_unpacking_kernel_equals_dequantizing(name, isa):
    """The rows unpacked for prompts against PyTorch's dequantization of the same parts: to bfloat16,
    one rounding of the same value (the kernel fuses d*q+m into one FMA); to float32, exactly (each
    value is a small integer times a float16 scale plus a minimum: one rounding either way, at most,
    and the same one)."""
    packed = packed_weights()[name]
    out = torch.empty(N, K, dtype=torch.bfloat16)
    packed.unpack_rows(0, N, out)
    torch.testing.assert_close(out.float(), packed.dequantized(), rtol=2**-7, atol=1e-6)
    exact = torch.empty(N, K, dtype=torch.float32)
    assert torch.equal(packed.unpack_rows(0, N, exact), packed.dequantized())
    part = torch.empty(7, K, dtype=torch.float32)  # rows from the middle
    assert torch.equal(packed.unpack_rows(5, 12, part), packed.dequantized()[5:12])


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or sys.platform != "linux", reason="reads /proc/cpuinfo")
def test_prompts_multiply_in_bfloat16_only_where_the_cpu_has_bfloat16_instructions():
    """The many-rows path multiplies in bfloat16 only where the CPU has bfloat16 arithmetic, as the
    kernel's own flags in /proc/cpuinfo say (oneDNN accepts bfloat16 on any AVX-512 CPU and widens it
    to float32 itself where there is none: 3.2x slower than float32 products on an Ice Lake Xeon)."""
    from plainllama.engine.cpu import packed as packed_module

    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    if torch.cpu.get_capabilities().get("architecture") != "x86_64":
        pytest.skip("the x86 flags decide on x86 only")
    native = bool(flags & {"avx512_bf16", "amx_bf16"}) and packed_module._bf16_products_possible()
    assert packed_module._bf16_products_fast() == native


@needs_kernels
@pytest.mark.parametrize("name", ["q4 (Q4_K)", "q8", "q6 (Q6_K)", "f16"])
def test_float32_prompt_rows_do_not_depend_on_their_company(name, isa, monkeypatch):
    """The float32 many-rows path (CPUs with neither bfloat16 instructions nor one-instruction int8
    dot products, and 16-bit weights where there is no bfloat16; forced here on any CPU) gives a row
    the same bits alone, among more rows, and at another position (the prefix cache relies on it),
    and the product of the stored numbers within float32 rounding (float64 oracle)."""
    from plainllama.engine.cpu import packed as packed_module

    monkeypatch.setattr(kernels, "amx", lambda: False)
    monkeypatch.setattr(packed_module, "_bf16_products_fast", lambda: False)
    monkeypatch.setattr(packed_module, "_int8_prompts", lambda: False)
    packed = packed_weights()[name]
    x = torch.randn(150, K, generator=torch.Generator().manual_seed(3))
    alone = packed.matmul(x[:9])
    assert torch.equal(packed.matmul(x)[:9], alone)
    assert torch.equal(packed.matmul(torch.cat([x[100:137], x[:9]]))[37:], alone)
    w64 = packed.dequantized().double()
    torch.testing.assert_close(alone.double(), x[:9].double() @ w64.T, rtol=1e-5, atol=1e-5 * w64.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("type_name", ["F16", "BF16"])
def test_16_bit_prompt_rows_in_float32_are_one_fma_chain_each(type_name, isa, monkeypatch):
    """Where bfloat16 arithmetic is missing, a prompt's products of 16-bit weights run in float32
    (kernels/float32_rows.c): each output one chain of FMAs over k in order. So a row gets the same
    bits alone, among other rows, at any position, and in calls whose row count ends a pass over the
    panel anywhere (29 rows: 12 + 12 + 5 at AVX-512, 6 x 4 + 5 at AVX2; 70 outputs end a panel
    part-way at both widths). Against the float64 product of the numbers the `gguf` package
    dequantizes, the error of a sequential sum of K products with one rounding each is at most
    K * 2^-24 * sum_k |x_k w_k| (the standard bound, gamma_K, for K * 2^-24 << 1)."""
    from plainllama.engine.cpu import packed as packed_module

    monkeypatch.setattr(kernels, "amx", lambda: False)
    monkeypatch.setattr(packed_module, "_bf16_products_fast", lambda: False)
    n, k = 70, 96
    qtype = GGMLQuantizationType[type_name]
    raw = quants.quantize(np.random.default_rng(7).standard_normal((n, k)).astype(np.float32), qtype)
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    stored = torch.from_numpy(quants.dequantize(raw, qtype).reshape(n, k).astype(np.float64))
    packed = pack_gguf(torch.from_numpy(raw.copy()), type_name, (n, k))
    x = torch.randn(29, k, generator=torch.Generator().manual_seed(8))
    out = packed._unpacked_matmul(x)
    for i in (0, 11, 12, 24, 28):  # rows that open and close passes
        assert torch.equal(out[i], packed._unpacked_matmul(x[i : i + 1])[0]), f"row {i}"
    shuffled = packed._unpacked_matmul(torch.cat([x[20:], x[:20]]))  # every row at another position
    assert torch.equal(torch.cat([shuffled[9:], shuffled[:9]]), out)
    default = torch.get_num_threads()
    try:  # panels taken by other threads, in another order (for_each_group): the same chains
        torch.set_num_threads(3)
        assert torch.equal(packed._unpacked_matmul(x), out)
    finally:
        torch.set_num_threads(default)
    exact = x.double() @ stored.T
    bound = k * 2.0**-24 * (x.double().abs() @ stored.abs().T)
    assert ((out.double() - exact).abs() <= bound).all()
    assert (out.double() - exact).abs().max() > 0  # float32 sums, not float64 ones


@needs_kernels
@pytest.mark.parametrize("name", [name for name in packed_weights() if not name.startswith(("f16", "bf16"))])
def test_int8_prompt_rows_are_the_rows_a_decode_step_gives(name, isa, monkeypatch):
    """Where prompts multiply quantized weights with the direct kernels (CPUs without bfloat16
    arithmetic but with int8 dot products; forced here on any CPU), 150 rows go in calls of
    DIRECT_CALL_ROWS, and each row's result is bit for bit what that row gets alone (a decode step,
    the prefix cache), and the integer scheme's product of the stored numbers (float64 oracle)."""
    from plainllama.engine.cpu import packed as packed_module

    monkeypatch.setattr(kernels, "amx", lambda: False)
    monkeypatch.setattr(packed_module, "_bf16_products_fast", lambda: False)
    monkeypatch.setattr(packed_module, "_int8_prompts", lambda: True)
    packed = packed_weights()[name]
    x = torch.randn(150, K, generator=torch.Generator().manual_seed(4))
    assert x.shape[0] > 2 * packed_module.DIRECT_CALL_ROWS  # a call's rows, the next call's, a part call
    out = packed.matmul(x)
    for i in (0, 63, 64, 100, 149):  # the first and last rows of calls
        assert torch.equal(out[i], packed.matmul(x[i : i + 1])[0]), f"row {i}"
    assert_product_of_stored_numbers(packed, x, out)


def test_prompts_take_int8_where_the_kernels_run_at_avx512_or_without_bfloat16_arithmetic(monkeypatch):
    """Which path a prompt's products take, and the name `plainllama bench` gives it, for each
    combination of what the CPU has: AMX first; then the int8 kernels at the AVX-512 level (VNNI),
    with or without bfloat16 arithmetic (they beat oneDNN's bfloat16 there, unless oneDNN has AMX);
    then native bfloat16 (the AVX2 level on a CPU with it); then the int8 kernels of any level."""
    from plainllama.engine.cpu import packed as packed_module

    for amx, bf16, isa, path in [
        (True, True, "amx", "amx bfloat16"),
        (False, True, "avx512", "int8 kernels (16-bit weights: oneDNN bfloat16)"),
        (False, False, "avx512", "int8 kernels (16-bit weights: float32)"),
        (False, True, "avx2", "oneDNN bfloat16"),
        (False, False, "avx2", "int8 kernels (16-bit weights: float32)"),
        (False, True, "none", "torch weight-only"),
        (False, False, "none", "torch weight-only"),
    ]:
        monkeypatch.setattr(kernels, "amx", lambda amx=amx: amx)
        monkeypatch.setattr(kernels, "available", lambda isa=isa: isa != "none")
        monkeypatch.setattr(kernels, "isa", lambda isa=isa: isa)
        monkeypatch.setattr(packed_module, "_bf16_products_fast", lambda bf16=bf16: bf16)
        assert packed_module.prompt_products() == path
        assert packed_module._int8_prompts() == path.startswith("int8")
    # The kernels capped at AVX-512 on a CPU with AMX: oneDNN's bfloat16 runs on AMX, so it stays.
    monkeypatch.setattr(kernels, "amx", lambda: False)
    monkeypatch.setattr(kernels, "available", lambda: True)
    monkeypatch.setattr(kernels, "isa", lambda: "avx512")
    monkeypatch.setattr(packed_module, "_bf16_products_fast", lambda: True)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True, "avx512_bf16": True})
    assert packed_module.prompt_products() == "oneDNN bfloat16" and not packed_module._int8_prompts()


def test_parts_that_do_not_match_the_shape_are_refused():
    """The C kernels read a PackedWeight's buffers by its shape alone, so a part of another shape
    (which would make them read past its end) is refused when the weight is built."""
    with pytest.raises(ValueError, match=r"part 'w' has shape \(95, 512\), expected \(96, 512\)"):
        PackedWeight("f16", (N, K), {"w": torch.zeros(N - 1, K, dtype=torch.float16)})
    q8 = quantize_int8(torch.zeros(N, K))
    with pytest.raises(ValueError, match="part 'd'"):
        PackedWeight("q8", (N, K), {"qs": q8.qs, "d": q8.d[:, :-1]})
    with pytest.raises(ValueError, match="part 'qs'"):
        PackedWeight("q4", (N, K), {"qs": q8.qs.view(torch.uint8), "d": q8.d})


def test_packed_linear_reshapes_like_nn_linear_and_refuses_conversion():
    packed = packed_weights()["q8"]
    layer = PackedLinear(packed)
    x = torch.randn(2, 3, K)
    assert layer(x).shape == (2, 3, N)
    with pytest.raises(RuntimeError, match="dequantize=True"):
        layer.float()


def logits_tv(a, b):
    return 0.5 * (a.softmax(-1) - b.softmax(-1)).abs().sum(-1).max().item()


@needs_kernels
@pytest.mark.parametrize("prompt_path", ["chosen here", "int8"])
def test_default_model_packed_agrees_with_float_weights_and_llama_cpp(llm, model_path, prompt_path, monkeypatch):
    """The default model as it runs by default (Q4_1 and Q8_0 blocks kept, int8 activations)
    against the same file dequantized to float32 (the `llm` fixture) and against llama.cpp. Its
    prompt runs on the path this CPU takes, and on the int8 path of CPUs without bfloat16
    arithmetic (forced here; llama.cpp multiplies prompts with int8 activations too)."""
    if prompt_path == "int8":
        if not kernels.available():
            pytest.skip("the int8 path is the C kernels'")
        from plainllama.engine.cpu import decode_block, packed as packed_module

        monkeypatch.setattr(kernels, "amx", lambda: False)
        monkeypatch.setattr(packed_module, "_bf16_products_fast", lambda: False)
        monkeypatch.setattr(decode_block, "_bf16_products_fast", lambda: False)
        monkeypatch.setattr(packed_module, "_int8_prompts", lambda: True)
    packed = plainllama.load(device="cpu")
    assert type(packed.model.layers[0].attention.wqkv) is PackedLinear
    text = "Llamas are members of the camelid family. They are social animals that live in herds, and"
    ids = llm.tokenizer.encode(text)
    ours, float_logits = packed.logits(ids), llm.logits(ids)
    theirs = llama_cpp_logits(model_path, ids)
    assert logits_tv(ours, theirs) < 0.08  # measured 0.07 on either path
    agree = (ours.argmax(-1) == float_logits.argmax(-1)).float().mean().item()
    assert agree >= 0.85  # measured 1.0 (bfloat16 prompts), 0.95 (int8)
    if prompt_products().startswith("int8"):
        # int8 activations per block of 32 cost this small model more than bfloat16 inputs do:
        # llama.cpp's own int8 scheme is 0.068 from the float logits on this text, ours 0.089 (the
        # same scheme, other float order). Allowed: 1.75x the reference's own distance.
        assert logits_tv(ours, float_logits) < 1.75 * logits_tv(theirs, float_logits)
    else:
        assert logits_tv(ours, float_logits) < 0.08  # measured 0.02-0.03 on this text


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("file_type", ["F32", "F16", "BF16"])
def test_quantize_flag_on_a_float_model(tmp_path, vocab, mode, file_type):
    path = write_llama_gguf(
        tmp_path / "float.gguf",
        vocab,
        dim=128,
        n_heads=2,
        n_kv_heads=1,
        hidden_dim=256,
        matrix_type=file_type,
        embedding_type=file_type,
    )
    exact = plainllama.load(str(path), device="cpu", dtype="float32")
    quantized = plainllama.load(str(path), device="cpu", quantize=mode)
    layouts = {m.packed.layout for m in quantized.model.modules() if isinstance(m, (PackedLinear, PackedEmbedding))}
    assert layouts == {{"int8": "q8", "int4": "q4"}[mode]}  # 16-bit GGUF tensors too, not kept as stored
    ids = list(np.random.default_rng(0).integers(100, 40000, size=40))
    ours, reference = quantized.logits(ids), exact.logits(ids)
    # Against the float weights: random weights have no structure for quantization to lose
    # gracefully, so these bounds are the measured error (int8 0.025-0.027, int4 0.33 relative on the
    # AMX path's bfloat16 prompts) with room. Where prompts multiply with int8 activations too (CPUs
    # without bfloat16), the activations' rounding adds what the check below bounds (0.03; measured
    # 0.020 there, against 0.010): int8 weights 0.03 + 0.03 (measured 0.031-0.033).
    relative = ((ours - reference).norm() / reference.norm()).item()
    int8_prompts = prompt_products().startswith("int8")
    assert relative < {"int8": 0.06 if int8_prompts else 0.03, "int4": 0.5}[mode]
    # Against a float model holding the very numbers that were stored: what is left is the
    # int8 rounding of activations, for either weight width.
    for name, module in quantized.model.named_modules():
        if isinstance(
            module, (PackedLinear, PackedEmbedding)
        ):  # (the float weights are read-only file mappings: replace, not copy into)
            exact.model.get_submodule(name).weight = torch.nn.Parameter(module.weight, requires_grad=False)
    relative = ((ours - exact.logits(ids)).norm() / reference.norm()).item()
    assert relative < 0.03


def test_bad_quantize_settings_are_refused():
    with pytest.raises(plainllama.PlainLlamaError, match="expected int8 or int4"):
        plainllama.load(device="cpu", quantize="int3")
    with pytest.raises(plainllama.PlainLlamaError, match="contradict"):
        plainllama.load(device="cpu", quantize="int8", dequantize=True)


needs_amx = pytest.mark.skipif(
    not kernels.amx(), reason="amx_matmul needs a CPU with AMX (and Linux granting the tile registers)"
)


AMX_SHAPES = [  # rows, n, k
    (512, 256, 512),  # whole blocks of 32 rows and 16 panels of 16 outputs
    (77, 144, 4352),  # a partial block of rows, 9 panels (an odd one alone), 136 k-steps (chunks of 64, then 8)
    (40, 560, 2304),  # 35 panels (blocks of 16, then an odd 3), 72 k-steps: a chunk of 64, then 8
    (9, 48, 256),  # 3 panels: the last pair has only one
    (1, 16, 768),  # one row
    (77, 144, 4160),  # 130 k-steps: a last chunk of 2, a last staging group of 2 (layouts with blocks of 32)
    (33, 64, 2240),  # 70 k-steps: a last chunk of 6, short of one A_STEPS run of 8 (layouts with blocks of 32)
    (9, 48, 64),  # 2 k-steps (layouts with blocks of 32)
]
# The layouts amx_matmul.c unpacks itself (block_bf16), then those it unpacks through the oneDNN
# path's row unpacking (unpack.h): K-quant scales, fifth bits and the regrouped values of Q6_K, Q3_K
# and Q2_K.
AMX_DIRECT = ["q4", "q4 no minimums", "q8", "f16", "bf16"]
AMX_STAGED = ["Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "Q5_0", "Q5_1"]


def weight_in_layout(layout: str, n: int, k: int, generator: torch.Generator) -> PackedWeight:
    """A random [n, k] matrix held in `layout` (a name of AMX_DIRECT, or a GGUF type of AMX_STAGED)."""
    w = torch.randn(n, k, generator=generator) * 0.05
    if layout in AMX_STAGED:
        per_block = BLOCK_FORMATS[layout][0]
        raw = np.ascontiguousarray(random_blocks(layout, n * k // per_block, np.random.default_rng(n + k)))
        packed = pack_gguf(torch.from_numpy(raw.view(np.uint8).reshape(-1).copy()), layout, (n, k))
        assert packed.layout in ("q4", "q5", "q6", "q3", "q2")
        return packed
    return {
        "q4": lambda: quantize_int4(w),
        "q8": lambda: quantize_int8(w),
        "q4 no minimums": lambda: PackedWeight(
            "q4",
            (n, k),
            {
                "qs": torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=generator),
                "d": (torch.rand(n, k // 32, generator=generator) * 0.01).half(),
            },
        ),
        "f16": lambda: PackedWeight("f16", (n, k), {"w": w.half()}),
        "bf16": lambda: PackedWeight("bf16", (n, k), {"w": w.bfloat16()}),
    }[layout]()


@needs_amx
@pytest.mark.parametrize(
    "layout, rows, n, k",
    [
        (layout, *shape)
        for layout in AMX_DIRECT + AMX_STAGED
        for shape in AMX_SHAPES
        if shape[2] % BLOCK_FORMATS.get(layout, (32,))[0] == 0
    ],
)
def test_amx_products_are_float32_sums_of_bfloat16_products(layout, rows, n, k):
    """amx_matmul.c (many rows on an AMX CPU): inputs and weights rounded to bfloat16, products summed in
    float32. Oracle: the float64 product of the same bfloat16-rounded numbers (weights as gguf's exact
    values where the layout holds a GGUF type, via PackedWeight.dequantized, checked against gguf's
    dequantizer above)."""
    generator = torch.Generator().manual_seed(rows + n + k)
    packed = weight_in_layout(layout, n, k, generator)
    x = torch.randn(rows, k, generator=generator)
    out = packed._unpacked_matmul(x)
    reference = x.bfloat16().double() @ packed.dequantized().bfloat16().double().T
    # float32 sums of k products: relative error ~ k * 2^-24 at worst; a weight whose float32 value
    # differs in its last bit (the kernel fuses d * q + m) may round to the neighbouring bfloat16 value
    relative = ((out.double() - reference).norm(dim=-1) / reference.norm(dim=-1)).max().item()
    assert relative < 1e-5
    assert torch.isfinite(out).all()
    # and each row alone gives the same bits as in company (the prefix cache relies on it)
    alone = packed._unpacked_matmul(x[-1:].contiguous())
    assert torch.equal(alone[0], out[-1])


SWIGLU_SHAPES = [  # rows, f, k
    (512, 256, 512),  # whole blocks of rows; 8 panels of the gate and 8 of the up per thread block
    (77, 144, 4352),  # a partial block of rows, 9 panels, 136 k-steps (chunks of 64, then 8)
    (9, 16, 768),  # one panel of each
    (33, 64, 2240),  # 70 k-steps: a last chunk of 6, short of one A_STEPS run of 8 (layouts with blocks of 32)
]


@needs_amx
@pytest.mark.parametrize(
    "layout, rows, f, k",
    [
        (layout, *shape)
        for layout in AMX_DIRECT + AMX_STAGED
        for shape in SWIGLU_SHAPES
        if shape[2] % BLOCK_FORMATS.get(layout, (32,))[0] == 0
    ],
)
def test_amx_swiglu_is_the_product_then_swiglu(layout, rows, f, k):
    """amx_swiglu (kernels/amx_matmul.c: the feed-forward's stacked gate and up products finished with
    SwiGLU in one pass) gives the bits of amx_matmul followed by the layer step's SwiGLU (swiglu_rows),
    and, as the oracle for the formula, PyTorch's float64 silu(gate) * up of that product to float32
    rounding (a few float32 steps: the exponential's polynomial, a division, a product)."""
    generator = torch.Generator().manual_seed(rows + f + k)
    packed = weight_in_layout(layout, 2 * f, k, generator)
    x = torch.randn(rows, k, generator=generator)
    fused = packed.amx_swiglu(x)
    assert fused is not None and fused.shape == (rows, f)
    gate_up = packed._unpacked_matmul(x)  # [rows, 2f]
    separate = torch.empty(rows, f)
    kernels.check(kernels.function("swiglu_rows")(gate_up.data_ptr(), rows, f, separate.data_ptr()), "swiglu_rows")
    assert torch.equal(fused, separate)
    gate, up = gate_up.double().split(f, dim=-1)
    reference = torch.nn.functional.silu(gate) * up
    assert ((fused.double() - reference).abs() <= 1e-6 * reference.abs() + 1e-30).all()
    assert packed.amx_swiglu(x[:8]) is None  # a few rows take the direct kernels, not this path


def _anon_huge_kib(address: int) -> int | None:
    """AnonHugePages of the mapping holding `address` (/proc/self/smaps), None if no mapping does."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(v, 16) for v in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return None


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_resident_weights_are_placed_on_huge_pages():
    """memory.empty_for_weights: a large weight built while loading lies on 2 MiB pages (the kernel's
    own count, /proc/self/smaps), starts on a 2 MiB boundary, holds what the file holds, and its
    mapping goes away with it; outside loading, and for small tensors, it is a plain torch.empty."""
    from plainllama.engine.memory import HUGE_PAGE, empty_for_weights, weights_on_huge_pages

    packed = plainllama.load(device="cpu")
    table = packed.model.tok_embeddings.packed  # SmolLM2's 49152 x 576 Q8_0 table: 27 MiB of int8
    assert table.qs.data_ptr() % HUGE_PAGE == 0
    assert _anon_huge_kib(table.qs.data_ptr()) >= 2048
    ids = torch.tensor([0, 1, 2, 49151])
    floats = plainllama.load(device="cpu", dequantize=True).model.tok_embeddings(ids[None])[0]
    assert torch.equal(table.rows(ids, torch.float32), floats)

    assert empty_for_weights((4096, 4096), torch.uint8).untyped_storage().resizable()  # torch's own: not loading
    with weights_on_huge_pages():
        small = empty_for_weights((1000,), torch.float32)
        big = empty_for_weights((3, 4096, 1024), torch.float16)
    assert small.untyped_storage().resizable() and not big.untyped_storage().resizable()
    assert big.shape == (3, 4096, 1024) and big.dtype == torch.float16
    big.fill_(1.5)
    address = big.data_ptr()
    assert _anon_huge_kib(address) >= 2048 and torch.all(big == 1.5)
    del big
    gc.collect()
    assert _anon_huge_kib(address) is None  # unmapped with the tensor


REUSE_CHECK = """
import resource, torch
from plainllama.engine import memory

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

def second_of_two():  # page faults of a 48 MiB tensor made and written after a 64 MiB one was freed
    first = torch.ones(64 << 20, dtype=torch.uint8)
    del first
    before = faults()
    second = torch.ones(48 << 20, dtype=torch.uint8)  # smaller: it fits the freed block whatever
    count = faults() - before  # small blocks were placed around it, and its alignment
    del second
    return count

outside = second_of_two()
with memory.reusing_freed_memory():
    inside = second_of_two()
    kept = resident()
print(outside, inside, kept - resident())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator (mallopt, malloc_trim)")
def test_prompts_reuse_freed_memory_and_give_it_back_after():
    """memory.reusing_freed_memory, in a fresh process: outside it, a 48 MiB tensor made after a
    64 MiB one was freed is page-faulted in anew (glibc maps blocks over 32 MiB on their own and
    unmaps them when freed); inside, the freed block serves it with no faults; when the block
    ends, what was kept goes back to the system (the process's resident memory drops)."""
    import subprocess

    if THP.exists() and "[always]" in THP.read_text():
        pytest.skip("huge pages for every mapping: too few faults outside to compare")
    result = subprocess.run([sys.executable, "-c", REUSE_CHECK], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    outside, inside, given_back = map(int, result.stdout.split())
    assert outside > 12288 * 0.9  # 48 MiB of 4 KiB pages
    assert inside < 1000
    assert given_back > 40 << 20


def test_a_prompt_runs_reusing_freed_memory_and_one_token_steps_do_not():
    """A resident CPU model's forward passes over a prompt run inside memory.reusing_freed_memory
    (seen from inside the first layer); one-token steps do not, and nothing stays open after."""
    from plainllama.engine import memory
    from plainllama.model import KVCache

    llm = plainllama.load(device="cpu")
    seen = []
    hook = llm.model.layers[0].register_forward_hook(lambda *args: seen.append(memory.reusing_now()))
    try:
        cache = KVCache(llm.model.args, 1, 16, llm.dtype, llm.device)
        with torch.inference_mode():
            llm.model(torch.tensor([[1, 2, 3, 4, 5]]), 0, cache, last_only=True)
            llm.model(torch.tensor([[6]]), 5, cache, last_only=True)
    finally:
        hook.remove()
    assert seen == [True, False]
    assert not memory.reusing_now()


def test_weights_fall_back_to_torch_memory_when_no_mapping_can_be_made(monkeypatch):
    """A mapping refused (the process's limit on mappings, vm.max_map_count) is not an error: the
    tensor comes from torch's allocator, as outside loading."""
    import mmap

    from plainllama.engine.memory import empty_for_weights, weights_on_huge_pages

    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", refuse)
    with weights_on_huge_pages():
        t = empty_for_weights((4096, 1024), torch.float32)
    assert t.shape == (4096, 1024) and t.untyped_storage().resizable()  # torch's own
