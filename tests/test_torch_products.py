"""Compressed weights where the C kernels do not run (engine/cpu/torch_products.py): PyTorch's
weight-only operators multiply them, and memory stays near the file's size.

Oracles: the float64 product of the stored numbers (PackedWeight.dequantized before the conversion,
itself checked against the `gguf` package's dequantizers in test_packed.py), and the same model
loaded with float weights (--dtype float32, PyTorch's float32 operators) for whole forward passes.
Here the kernels are turned off with PLAINLLAMA_ISA=none, as on a CPU or platform they do not build on.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import plainllama
from gguf_files import random_blocks, write_llama_gguf
from plainllama.engine.cpu import kernels
from plainllama.engine.cpu.packed import (
    PackedLinear,
    PackedWeight,
    _pack_q2_k,
    pack_gguf,
    quantize_int4,
    quantize_int8,
)
from plainllama.engine.cpu.torch_products import HalfProduct, Int4PairProduct, Int4Product, Int8BlockProduct

# Relative error (L2 norm of a row's error / L2 norm of the row) each form may have against the
# float64 product of the stored numbers, from the roundings each makes (u = a unit roundoff):
#   q4 (int4pack), q5 and q8 (two int4 matrices), q6 and q3 (int8 per block column): activations, scales,
#       zero points and outputs (q5, q8: each half's product; q6: each block column's) rounded to
#       bfloat16, u = 2^-8 relative; the errors of K terms are independent, so a row's relative
#       error is ~ a few u: 1e-2.
#   f16: activations and outputs rounded to float16, u = 2^-11: 2e-3.
#   bf16: activations and outputs rounded to bfloat16: 1e-2.
TOLERANCE = {"q4": 1e-2, "q5": 1e-2, "q8": 1e-2, "q6": 1e-2, "q3": 1e-2, "q2": 1e-2, "f16": 2e-3, "bf16": 1e-2}
FORMS = {
    "q4": Int4Product,
    "q5": Int4PairProduct,
    "q8": Int4PairProduct,
    "q6": Int8BlockProduct,
    "q3": Int8BlockProduct,
    "q2": Int8BlockProduct,
    "f16": HalfProduct,
    "bf16": HalfProduct,
}


@pytest.fixture
def no_kernels(monkeypatch):
    monkeypatch.setenv("PLAINLLAMA_ISA", "none")
    assert not kernels.available()


def weights(n: int, k: int, seed: int) -> dict[str, PackedWeight | None]:
    """One random [n, k] matrix in each layout (K-quants: None where k is not a multiple of 256)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    q4 = quantize_int4(w)
    rng = np.random.default_rng(seed)
    q6_raw = np.ascontiguousarray(random_blocks("Q6_K", n * k // 256, rng)).view(np.uint8).reshape(-1)
    q5_raw = np.ascontiguousarray(random_blocks("Q5_K", n * k // 256, rng)).view(np.uint8).reshape(-1)
    q50_raw = np.ascontiguousarray(random_blocks("Q5_0", n * k // 32, rng)).view(np.uint8).reshape(-1)
    q3_raw = np.ascontiguousarray(random_blocks("Q3_K", n * k // 256, rng)).view(np.uint8).reshape(-1)
    q2_blocks = torch.from_numpy(np.ascontiguousarray(random_blocks("Q2_K", n * k // 256, rng)))
    return {
        "q6 (Q6_K)": pack_gguf(torch.from_numpy(q6_raw.copy()), "Q6_K", (n, k)) if k % 256 == 0 else None,
        "q3 (Q3_K)": pack_gguf(torch.from_numpy(q3_raw.copy()), "Q3_K", (n, k)) if k % 256 == 0 else None,
        # q2 is held only where the kernels run (pack_gguf gives Q8_0 here); built directly, as a
        # model loaded with the kernels and then run without them would hold it
        "q2 (Q2_K)": _pack_q2_k(q2_blocks, (n, k)) if k % 256 == 0 else None,
        "q5 (Q5_K)": pack_gguf(torch.from_numpy(q5_raw.copy()), "Q5_K", (n, k)) if k % 256 == 0 else None,
        "q5 (Q5_0)": pack_gguf(torch.from_numpy(q50_raw.copy()), "Q5_0", (n, k)),
        "q4 with minimums": q4,
        "q4 without minimums (Q4_0)": PackedWeight("q4", (n, k), {"qs": q4.qs.clone(), "d": q4.d.clone()}),
        "q8": quantize_int8(w),
        "f16": PackedWeight("f16", (n, k), {"w": w.half()}),
        "bf16": PackedWeight("bf16", (n, k), {"w": w.bfloat16()}),
    }


# 93 rows: torch's int4 layout takes rows in multiples of 16, so q4 is padded; 576 = SmolLM2's width
@pytest.mark.parametrize("n, k", [(96, 512), (93, 576), (2048, 64), (37, 768)])
@pytest.mark.parametrize("name", list(weights(16, 256, 0)))
def test_torch_forms_compute_the_product_of_the_stored_numbers(no_kernels, name, n, k):
    packed = weights(n, k, seed=n + k)[name]
    if packed is None:
        pytest.skip("K-quant rows are whole 256-weight blocks")
    exact = packed.dequantized().double()  # the stored numbers, before the conversion
    for rows in (1, 5, 40):  # a decode step, a small batch, a prompt: one path for all
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 2
        out = packed.matmul(x)
        assert out.shape == (rows, n) and out.dtype == torch.float32
        reference = x.double() @ exact.T
        relative = ((out.double() - reference).norm(dim=-1) / reference.norm(dim=-1)).max().item()
        assert relative < TOLERANCE[packed.layout], f"{name}, {rows} rows: relative error {relative:.2e}"
    # once converted, the matrix is held in the torch form only, and says which numbers it multiplies by
    assert packed.part_names == () and isinstance(packed._torch, FORMS[packed.layout])
    held = packed.dequantized().double()
    weight_error = ((held - exact).norm(dim=-1) / exact.norm(dim=-1)).max().item()
    # Rounding to bfloat16 (8 significant bits) moves a number by up to u = 2^-8 of itself.
    # q4, q5: scale and zero point rounded, so a weight moves by up to u (8 d + |zero|), about u x 2 max|w|
    # of its block: a row's RMS error is below 3u (measured up to 1.4u).
    # q8, q6, q3: the scale (q6, q3: d * sc) rounded: each weight moves by up to u. 16-bit layouts: the stored numbers.
    bound = {"q4": 3 * 2.0**-8, "q5": 3 * 2.0**-8, "q8": 2.0**-8, "q6": 2.0**-8, "q3": 2.0**-8, "f16": 0.0, "bf16": 0.0}
    if packed.layout == "q2":
        # q2 (no torch form takes its minimums) is requantized to int8 per 16: each weight moves by at
        # most half a step (max|w| of its 16 / 254) plus the scale's bfloat16 rounding (u |w|)
        blocks = exact.unflatten(-1, (-1, 16)).abs().amax(-1, keepdim=True).expand(-1, -1, 16).flatten(-2)
        allowed = ((blocks / 254).norm(dim=-1) + 2.0**-8 * exact.norm(dim=-1)) / exact.norm(dim=-1)
        per_row = (held - exact).norm(dim=-1) / exact.norm(dim=-1)
        assert (per_row <= allowed * (1 + 1e-6)).all()
        return
    assert weight_error <= bound[packed.layout]


def test_a_table_that_embeddings_read_keeps_its_rows(no_kernels):
    """Tied embeddings: the output product uses the torch form, the lookups the stored rows."""
    from plainllama.engine.cpu.packed import PackedEmbedding

    packed = weights(96, 512, seed=1)["q8"]
    stored = packed.dequantized()
    embedding, output = PackedEmbedding(packed, torch.float32), PackedLinear(packed)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(0))
    reference = x.double() @ stored.double().T
    assert ((output(x).double() - reference).norm(dim=-1) / reference.norm(dim=-1)).max() < TOLERANCE["q8"]
    assert packed.part_names == ("qs", "d")  # still there for the lookups
    assert torch.equal(embedding(torch.tensor([[3, 95]]))[0], stored[[3, 95]])


def test_default_model_without_kernels_stays_compressed_and_agrees_with_float_weights(no_kernels, llm):
    """The default model (Q4_1 + Q8_0) with PyTorch's weight-only products against the same file with
    float32 weights (the `llm` fixture). Expected difference: that of computing in bfloat16 (the q4
    matrices do). Measured on this prompt, relative L2 error of a position's logits: 0.052 for the
    model run with `dtype="bfloat16"` (PyTorch's bfloat16 operators), 0.040 for the C kernels
    (int8 activations), 0.037 here; bound 0.06. The top token must agree wherever float32's margin
    between its first two tokens exceeds a quarter of the logits' spread."""
    compressed = plainllama.load()
    assert compressed.compute == "torch weight-only"
    linears = [m for m in compressed.model.modules() if isinstance(m, PackedLinear)]
    assert linears and all(m.packed._torch is not None for m in linears)
    assert {m.packed.layout for m in linears} == {"q4", "q8"}
    ids = compressed.tokenizer.encode("The capital of France is Paris. The capital of Germany is")
    with torch.inference_mode():
        ours = compressed.logits(ids)
        reference = llm.logits(ids)
    relative = ((ours - reference).norm(dim=-1) / reference.norm(dim=-1)).max().item()
    assert relative < 0.06, f"relative error {relative:.3f}"
    spread = reference.std(dim=-1, keepdim=True)
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.25 * spread[:, 0]
    assert clear.sum() >= len(ids) // 2
    assert torch.equal(ours.argmax(-1)[clear], reference.argmax(-1)[clear])
    # memory: far below float32's (the default model is 98 MB on disk, 540 MB as float32 weights)
    held = sum(m.packed.nbytes for m in linears if not m.packed.serves_rows)
    float32 = sum(4 * m.out_features * m.in_features for m in linears if not m.packed.serves_rows)
    assert held < float32 / 3


@pytest.mark.parametrize("tied", [False, True])
def test_a_q4_file_stays_near_its_size(no_kernels, tmp_path, vocab, tied):
    """The issue's bound: without the kernels, a Q4 file is held in at most 1.3x its size. A tied
    table is held twice (lookups read its stored rows, the output product torch's int4 layout): in
    this small model the table is most of the file, in real ones ~21% (Llama 3.2 1B, SmolLM2), so
    there it costs ~1.2x; here the bound is 1.3x the file plus that second copy."""
    path = write_llama_gguf(
        tmp_path / "q4.gguf",
        vocab,
        dim=512,
        n_layers=2,
        n_heads=8,
        hidden_dim=1536,
        matrix_type="Q4_0",
        embedding_type="Q4_0",
        tied=tied,
    )
    llm = plainllama.load(str(path))
    assert llm.compute == "torch weight-only"
    linears = [m for m in llm.model.modules() if isinstance(m, PackedLinear)]
    held = sum(t.numel() * t.element_size() for t in [*llm.model.parameters(), *llm.model.buffers()])
    held += sum(m.packed._torch.nbytes for m in linears)
    second_copy = sum(m.packed._torch.nbytes for m in linears if m.packed.serves_rows)
    assert (second_copy > 0) == tied
    size = os.path.getsize(path)
    assert held <= 1.3 * size + second_copy, f"{held} bytes held for a {size}-byte file"
    assert llm.generate("Hi", max_new_tokens=3).finish_reason in ("length", "stop")


@pytest.mark.parametrize("matrix_type", ["Q4_0", "Q5_0", "Q8_0", "Q6_K", "Q3_K", "Q2_K"])
def test_the_memory_plan_counts_the_torch_forms(no_kernels, tmp_path, vocab, matrix_type):
    """Without the kernels a matrix is held in PyTorch's form (two int4 matrices for 8-bit values:
    more bytes than the file's Q8_0 or Q5_0; int8 for Q6_K): the planner, which sizes layers before
    building them, must count what is built, or a --max-memory budget would be overrun."""
    from plainllama.engine.loading import WeightBuilder
    from plainllama.engine.planner import plan_memory
    from plainllama.formats import open_checkpoint

    path = write_llama_gguf(
        tmp_path / "m.gguf", vocab, dim=256, n_layers=2, n_heads=4, hidden_dim=768, matrix_type=matrix_type
    )
    checkpoint = open_checkpoint(str(path))
    plan = plan_memory(WeightBuilder(checkpoint, torch.float32, torch.device("cpu"), "packed"), None, None, 64)
    layer = plainllama.load(str(path)).model.layers[0]
    linears = [m for m in layer.modules() if isinstance(m, PackedLinear)]
    assert linears and all(m.packed._torch is not None and m.packed.part_names == () for m in linears)
    built = sum(m.packed.nbytes for m in linears)
    built += sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])  # the norms
    assert plan.layers[0].held == built
