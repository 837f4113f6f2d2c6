"""Decode steps of a layer in one C call (decode_block.py, kernels/decode_layer.c) against model.py.

The oracle is model.py's TransformerBlock.forward run on the same layer object: same packed weights,
same product kernels, the in-between arithmetic done by PyTorch ops. The C layer must do that same
arithmetic, so a layer's output and its cache writes agree to float32 rounding (summation order in
the norm and in attention differ). model.py's path is itself checked against transformers and
llama.cpp in test_model_vs_hf.py / test_model_vs_llama_cpp.py / test_packed.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import plainllama
from plainllama.engine.cpu import decode_block
from plainllama.engine.cpu import kernels
from plainllama.engine.cpu import packed
from plainllama import model as model_py
from plainllama.engine.cpu.decode_block import KernelBlock
from plainllama.default_model import default_model_path
from plainllama.export.hf import write_hf
from plainllama.formats import open_checkpoint
from plainllama.engine.loading import build_model
from plainllama.model import KVCache, TransformerBlock, causal_mask, rotary_cos_sin
from plainllama.engine.cpu.packed import StackedLinear
from gguf_files import write_llama_gguf

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason="the C kernels cannot be built on this machine (no compiler or no AVX2)"
)

# name -> (matrix type, per-tensor types, shape): every layout the kernel reads, a file whose q/k/v
# have different layouts (a StackedLinear), and a head width (48) that is not a multiple of 16.
FILES = {
    "Q4_0": ("Q4_0", None, {}),
    "Q4_1": ("Q4_1", None, {}),
    "Q8_0": ("Q8_0", None, {}),
    "F16": ("F16", None, {}),
    "BF16": ("BF16", None, {}),
    "mixed": ("Q4_K", {"attn_v.weight": "Q6_K", "ffn_down.weight": "Q8_0"}, {}),
    "Q5_K_M-like": ("Q5_K", {"attn_v.weight": "Q6_K", "ffn_down.weight": "Q5_0"}, {}),
    "Q2_K-like": ("Q2_K", {"attn_output.weight": "Q3_K", "ffn_down.weight": "Q3_K"}, {}),  # llama.cpp's Q2_K mix
    "Q8_0-head48": ("Q8_0", None, dict(dim=192, n_heads=4, n_kv_heads=2, hidden_dim=384)),
}


@pytest.fixture(scope="module", params=list(FILES))
def model(request, tmp_path_factory, vocab, module_isa):
    """A 2-layer model of each kind, built with the kernels of each level this CPU runs."""
    matrix_type, tensor_types, shape = FILES[request.param]
    shape = {**dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, hidden_dim=512), **shape}
    path = write_llama_gguf(
        tmp_path_factory.mktemp("decode") / f"{request.param}.gguf",
        vocab,
        matrix_type=matrix_type,
        embedding_type="F16",
        tensor_types=tensor_types,
        seed=3,
        **shape,
    )
    model = build_model(open_checkpoint(path), torch.float32, torch.device("cpu"), "packed")
    assert all(isinstance(layer, KernelBlock) for layer in model.layers), "every packed layer should use the kernel"
    model.float_layouts = matrix_type in ("F16", "BF16")
    if request.param == "mixed":
        assert isinstance(model.layers[0].attention.wqkv, StackedLinear)
    return model


def random_cache(args, rows, length, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    cache = KVCache(args, rows, length, dtype, "cpu")
    for layer in cache.layers:
        layer.k.copy_(torch.randn(layer.k.shape, generator=generator))
        layer.v.copy_(torch.randn(layer.v.shape, generator=generator))
    return cache


def copy_cache(cache, args):
    other = KVCache(args, cache.layers[0].k.shape[0], cache.length, cache.layers[0].k.dtype, "cpu")
    for mine, theirs in zip(other.layers, cache.layers, strict=True):
        mine.k.copy_(theirs.k)
        mine.v.copy_(theirs.v)
    return other


# (rows, left padding, position): one row, a batch, a padded batch, the most rows the kernel takes,
# and a long cache (attention spread over threads); each with the cache in float32 and in float16
# (decode_block.cache_dtype: what the loader picks for these models), which model.py widens to
# float32 as decode_layer.c does, so the two read the same numbers.
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=["float32-cache", "float16-cache"])
@pytest.mark.parametrize(
    "rows, padded, start", [(1, False, 37), (3, False, 37), (3, True, 37), (8, True, 37), (2, True, 1000)]
)
def test_layer_step_matches_model_py(model, rows, padded, start, cache_dtype):
    args = model.args
    pad = torch.tensor([0, 5, 36, 2, 0, 9, 1, 30][:rows]) if padded else None
    positions = torch.full((1, 1), start) if pad is None else start - pad[:, None]  # [1 or B, 1]
    cos, sin = rotary_cos_sin(args, positions)
    mask = causal_mask(start, 1, "cpu", pad)
    x = torch.randn(rows, 1, args.dim, generator=torch.Generator().manual_seed(rows)) * 3
    for i, layer in enumerate(model.layers):
        fast_cache = random_cache(args, 8, start + 20, seed=i, dtype=cache_dtype)
        slow_cache = copy_cache(fast_cache, args)
        with torch.inference_mode():
            assert layer._kernel_can_run(x, cos, mask, fast_cache.layers[i], start)
            fast = layer(x, cos, sin, mask, fast_cache.layers[i], start)
            slow = TransformerBlock.forward(layer, x, cos, sin, mask, slow_cache.layers[i], start)
        # 16-bit weights: rounding only. q4/q8: the products quantize their input to int8, and an input
        # differing in its last bit can round to the neighbouring int8 step (one step is ~0.4% of a
        # block's largest value), so a few outputs may move by that much; measured up to 6e-4 x scale.
        tolerance = 1e-5 if model.float_layouts else 2e-3
        scale = slow.abs().max().item()
        assert (fast - slow).abs().max().item() <= tolerance * scale, f"layer {i}: output differs from model.py"
        # A float16 cache holds the new key and value rounded to nearest (C: vcvtps2ph; model.py: the
        # copy into the cache): where the two float32 values differ as above, they can round to
        # neighbouring float16 numbers, one step apart, 2^-10 of the value at most.
        held = tolerance + (2**-10 if cache_dtype == torch.float16 else 0)
        for name in ("k", "v"):
            a, b = getattr(fast_cache.layers[i], name), getattr(slow_cache.layers[i], name)
            assert a.dtype == b.dtype == cache_dtype
            assert (a.float() - b.float()).abs().max().item() <= held * b.abs().max().item(), (
                f"layer {i}: cache {name} differs"
            )
            assert torch.equal(a[:, :, :start], b[:, :, :start]) and torch.equal(
                a[:, :, start + 1 :], b[:, :, start + 1 :]
            )


def test_float16_cache_holds_keys_past_its_range_at_its_largest_value(model):
    """A key or value beyond float16's range (65504) is held at +-65504 by both paths (decode_layer.c's
    store_halves, LayerCache.update), not as inf, which would make the whole softmax NaN. Made here by
    scaling a layer's attention norm by 1e6 (the C layer reads the same tensor)."""
    args, layer = model.args, model.layers[0]
    cos, sin = rotary_cos_sin(args, torch.full((1, 1), 37))
    x = torch.randn(1, 1, args.dim, generator=torch.Generator().manual_seed(2))
    weight = layer.attention_norm.weight
    saved = weight.clone()
    try:
        with torch.inference_mode():
            weight.mul_(1e6)
            fast_cache = random_cache(args, 1, 60, seed=0, dtype=torch.float16)
            slow_cache = copy_cache(fast_cache, args)
            fast = layer(x, cos, sin, None, fast_cache.layers[0], 37)
            slow = TransformerBlock.forward(layer, x, cos, sin, None, slow_cache.layers[0], 37)
    finally:
        with torch.inference_mode():
            weight.copy_(saved)
    for cache in (fast_cache, slow_cache):
        written = cache.layers[0].k[:, :, 37].float()
        assert written.abs().max().item() == 65504 and torch.isfinite(written).all()
    assert torch.equal(fast_cache.layers[0].k, slow_cache.layers[0].k)
    assert torch.isfinite(fast).all() and torch.isfinite(slow).all()


@pytest.mark.parametrize("start", [37, 700])
def test_layer_step_gives_a_row_the_same_bits_with_any_threads_and_company(model, start):
    """decode_layer.c's attention cuts a cache into pieces of 128 positions that any thread takes, and
    combines them in order: a row's output is the same bits with one thread or two, and alone or
    beside left-padded rows (other rows, other masks: the server's and a batch's situation)."""
    args, layer = model.args, model.layers[0]
    x = torch.randn(3, 1, args.dim, generator=torch.Generator().manual_seed(5)) * 3
    pad = torch.tensor([0, 5, start - 3])
    cos1, sin1 = rotary_cos_sin(args, torch.full((1, 1), start))
    cos3, sin3 = rotary_cos_sin(args, start - pad[:, None])
    mask = causal_mask(start, 1, "cpu", pad)
    outs, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.inference_mode():
                alone, company = random_cache(args, 3, start + 20, seed=1), random_cache(args, 3, start + 20, seed=1)
                outs.append(layer(x[:1], cos1, sin1, None, alone.layers[0], start))
                outs.append(layer(x, cos3, sin3, mask, company.layers[0], start)[:1])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(out, outs[0]) for out in outs[1:])


# Prompt steps (KernelBlock._prompt_step): norms, rotation and SwiGLU in C, attention in bfloat16
# where the CPU multiplies bfloat16 natively. The products of many rows take one of three paths
# (packed.PackedWeight._unpacked_matmul), and every path this CPU can run is tested here, whichever
# the machine would pick by itself:
#   "amx"      amx_matmul.c: inputs rounded to bfloat16, float32 sums, float32 outputs
#   "bf16"     weights unpacked to bfloat16, oneDNN's bfloat16 product: float32 sums, and the
#              outputs rounded to bfloat16 (the path of AVX-512 BF16 CPUs without AMX, e.g. AMD Zen 4/5;
#              oneDNN also runs it, widening to float32 itself, on AVX-512 CPUs without BF16)
#   "int8"     quantized weights: the direct kernels, activations quantized to int8 per block as in
#              decoding (CPUs without bfloat16 arithmetic but with VNNI); 16-bit weights: as "float32"
#   "float32"  weights unpacked to float32, float32 product (CPUs with neither)
PRODUCT_PATHS = {
    "amx": kernels.amx,
    "bf16": packed._bf16_products_possible,
    "int8": lambda: True,
    "float32": lambda: True,
}


def bf16_step(value: float) -> float:
    """The distance between neighbouring bfloat16 numbers (8 significant bits) at |value|."""
    return 2.0 ** (math.floor(math.log2(value)) - 7) if value > 0 else 0.0


# (rows, left padding, start): a prompt, a padded batch of prompts, and a chunk of a prompt after 37
# cached positions.
@pytest.mark.parametrize("rows, padded, start", [(1, False, 0), (3, True, 0), (2, False, 37)])
@pytest.mark.parametrize(
    "products, attention_dtype",
    [
        ("amx", "bfloat16"),
        ("amx", "float32"),
        ("bf16", "bfloat16"),
        ("bf16", "float32"),
        ("int8", "float32"),
        ("float32", "bfloat16"),
        ("float32", "float32"),
    ],
)
def test_prompt_step_matches_model_py(model, rows, padded, start, products, attention_dtype, monkeypatch):
    if not PRODUCT_PATHS[products]():
        pytest.skip(f"this CPU cannot run the {products} product path")
    if products != "amx":
        monkeypatch.setattr(kernels, "amx", lambda: False)
    monkeypatch.setattr(packed, "_bf16_products_fast", lambda: products == "bf16")
    monkeypatch.setattr(packed, "_int8_prompts", lambda: products == "int8")
    monkeypatch.setattr(decode_block, "_bf16_products_fast", lambda: attention_dtype == "bfloat16")
    if attention_dtype == "bfloat16":
        # The prompt path's attention reads q, k, v as bfloat16 (as the products' inputs are): model.py's
        # attention given the same rounded inputs is the oracle. (Against float32 attention, the error
        # is 2^-9 of the scores, which on random weights reach thousands and reorder the softmax.)
        float_attention = model_py.attention
        monkeypatch.setattr(
            model_py,
            "attention",
            lambda q, k, v, mask: float_attention(*(t.bfloat16().float() for t in (q, k, v)), mask),
        )
    args, T = model.args, 40
    pad = torch.tensor([0, 5, 36][:rows]) if padded else None
    positions = (
        torch.arange(start, start + T)[None, :]
        if pad is None
        else torch.arange(start, start + T)[None, :] - pad[:, None]
    )
    cos, sin = rotary_cos_sin(args, positions)
    mask = causal_mask(start, T, "cpu", pad)
    x = torch.randn(rows, T, args.dim, generator=torch.Generator().manual_seed(rows)) * 3
    for i, layer in enumerate(model.layers):
        fast_cache = random_cache(args, rows, start + T + 5, seed=i)
        slow_cache = copy_cache(fast_cache, args)
        largest = {}  # the largest output of each product, over both paths

        def record(name, largest=largest):
            return lambda module, inputs, output: largest.__setitem__(
                name, max(largest.get(name, 0.0), output.abs().max().item())
            )

        hooks = [
            layer.attention.wqkv.register_forward_hook(record("wqkv")),
            layer.attention.wo.register_forward_hook(record("wo")),
            layer.feed_forward.w2.register_forward_hook(record("w2")),
        ]
        with torch.inference_mode():
            fast = layer(x, cos, sin, mask, fast_cache.layers[i], start)
            slow = TransformerBlock.forward(layer, x, cos, sin, mask, slow_cache.layers[i], start)
        for hook in hooks:
            hook.remove()
        # The error each path can have, relative to the largest value compared (`scale`):
        # - float32 products: the same arithmetic but the C norm's summation order (float32 rounding,
        #   ~1e-7 relative, grown by two products and attention to ~1e-6): 1e-4.
        # - bfloat16 inputs (amx, bf16): where the two norms' last-bit difference moves an input across
        #   a bfloat16 rounding boundary, one term of a 256-wide dot product changes by up to 2^-7 of
        #   itself: ~2e-4 of the result (measured on AMX up to 3.7e-4): 1e-3.
        # - bfloat16 outputs (bf16 only): both paths round each product's outputs to bfloat16, and an
        #   unrounded difference as small as the above can round to the neighbouring bfloat16 number:
        #   one bfloat16 step of that product's largest output. A cached k mixes two rounded outputs
        #   (the rotation), a cached v is one; the layer's output adds wo's and w2's.
        # - int8 activations (int8, quantized weights): the products quantize their inputs per block
        #   of 32, and an input whose last bit differs between the two paths' norms can round to the
        #   neighbouring int8 step (~0.4% of its block's largest value): 2e-3, as for a decode step
        #   (test_layer_step_matches_model_py). 16-bit weights take the float32 path: 1e-4.
        # - bfloat16 attention: PyTorch rounds the softmax weights to bfloat16 before they
        #   multiply v, 2^-9 relative, carried through wo and w2: 2e-3.
        # A wrong rotation, mask or SwiGLU is off by O(1) of the scale.
        int8 = products == "int8" and not model.float_layouts
        relative = {"float32": 1e-4, "amx": 1e-3, "bf16": 1e-3, "int8": 2e-3 if int8 else 1e-4}[products] + (
            2e-3 if attention_dtype == "bfloat16" else 0.0
        )
        # amx_matmul reads every layout (q5 and q6 too), with float32 outputs: no rounding steps
        steps = products == "bf16"
        scale = slow.abs().max().item()
        error = (fast - slow).abs().max().item()
        allowed = relative * scale + steps * (bf16_step(largest["wo"]) + bf16_step(largest["w2"]))
        assert error <= allowed, (
            f"layer {i}: output differs from model.py by {error / scale:.2e} x scale (allowed {allowed / scale:.2e})"
        )
        for name, rounded_outputs in (("k", 2), ("v", 1)):  # steps as above
            a, b = getattr(fast_cache.layers[i], name), getattr(slow_cache.layers[i], name)
            written = (slice(None), slice(None), slice(start, start + T))
            cache_error = (a[written] - b[written]).abs().max().item()
            cache_allowed = relative * b[written].abs().max().item() + steps * rounded_outputs * bf16_step(
                largest["wqkv"]
            )
            assert cache_error <= cache_allowed, (
                f"layer {i}: cache {name} differs by {cache_error:.3g} (allowed {cache_allowed:.3g})"
            )
            assert torch.equal(a[:, :, :start], b[:, :, :start]) and torch.equal(
                a[:, :, start + T :], b[:, :, start + T :]
            )


@pytest.fixture(scope="module")
def bf16_llm(tmp_path_factory):
    """The default model's weights written as a bfloat16 HF folder: the real model, with products the
    kernels do in float arithmetic (no int8 activations), so the two paths differ by rounding only."""
    folder = tmp_path_factory.mktemp("bf16")
    write_hf(open_checkpoint(default_model_path()), str(folder), torch.bfloat16)
    llm = plainllama.load(str(folder), device="cpu")
    assert all(isinstance(layer, KernelBlock) for layer in llm.model.layers)
    return llm


@pytest.fixture
def use_kernel(monkeypatch):
    """use_kernel(False) sends every step to model.py's path; returns counts of steps the C layer took."""
    counts = {"kernel": 0}
    original = KernelBlock._kernel_can_run

    def use(on: bool):
        def can_run(self, *args):
            ok = on and original(self, *args)
            counts["kernel"] += ok
            return ok

        monkeypatch.setattr(KernelBlock, "_kernel_can_run", can_run)
        return counts

    return use


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]
CODE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\nprint("


def teacher_forced_logprobs(llm, ids, cache_dtype=torch.float32):
    """log-probabilities after each of ids[5:], fed one decode step at a time."""
    cache = KVCache(llm.args, 1, len(ids), cache_dtype, "cpu")
    with torch.inference_mode():
        llm.model(torch.tensor([ids[:5]]), 0, cache)
        return torch.stack(
            [llm.model(torch.tensor([[ids[i]]]), i, cache)[0, -1].log_softmax(-1) for i in range(5, len(ids))]
        )


def test_real_model_same_tokens_and_scores(bf16_llm, use_kernel):
    """Greedy text, a left-padded batch, beam search and per-step log-probabilities of the real model:
    the same with the C layer as with model.py's (and the C layer really ran every decode step)."""
    runs = {}
    for on in (True, False):
        counts = use_kernel(on)
        runs[on] = (
            bf16_llm.generate(PROMPTS[0], max_new_tokens=24, temperature=0).tokens,
            [g.tokens for g in bf16_llm.generate_batch(PROMPTS, max_new_tokens=16, temperature=0)],
            bf16_llm.beam_search(PROMPTS[1], num_beams=3, max_new_tokens=12, num_return=3),
            teacher_forced_logprobs(bf16_llm, bf16_llm.encode_prompt(CODE)),
        )
        if on:
            assert counts["kernel"] >= 30 * (23 + 15 + 11)
    (text, batch, beams, logprobs), (text_ref, batch_ref, beams_ref, logprobs_ref) = runs[True], runs[False]
    assert text == text_ref and batch == batch_ref
    assert [b.tokens for b in beams] == [b.tokens for b in beams_ref]
    assert all(abs(b.score - r.score) < 1e-4 for b, r in zip(beams, beams_ref, strict=True))
    assert (logprobs - logprobs_ref).abs().max().item() < 1e-3


def test_float16_cache_is_chosen_and_stays_close_to_float32(bf16_llm, monkeypatch):
    """The loader holds the KV cache in float16 where the C layer runs (decode_block.cache_dtype), and
    float32 where model.py's attention would have to widen all of it at every step (PLAINLLAMA_ISA=none).
    The oracle is the same model with a float32 cache, the arithmetic HF transformers does: float16
    keeps 11 significant bits, so each cached key and value moves by up to 2^-12 of itself, and the
    next-token distribution by little. Measured on this prompt (229 steps of the real model, float
    products): total variation 0.0024 at most, the log-probability of a token above 1% by 0.02, the
    same argmax at every step; the bounds below are 4-5x that."""
    assert bf16_llm.model.kv_dtype == torch.float16
    assert decode_block.cache_dtype(torch.device("cpu"), torch.float32, "float") == torch.float32
    assert decode_block.cache_dtype(torch.device("cuda"), torch.bfloat16, "packed") == torch.bfloat16
    monkeypatch.setenv("PLAINLLAMA_ISA", "none")
    assert decode_block.cache_dtype(torch.device("cpu"), torch.float32, "packed") == torch.float32
    monkeypatch.undo()
    ids = bf16_llm.encode_prompt(CODE * 6)
    with_float16 = teacher_forced_logprobs(bf16_llm, ids, torch.float16)
    with_float32 = teacher_forced_logprobs(bf16_llm, ids, torch.float32)
    p, q = with_float16.exp(), with_float32.exp()
    assert 0.5 * (p - q).abs().sum(-1).max().item() < 0.01
    assert ((with_float16 - with_float32).abs() * (q > 0.01)).max().item() < 0.1
    assert (with_float16.argmax(-1) == with_float32.argmax(-1)).float().mean().item() >= 0.98


def test_quantized_model_distribution(use_kernel):
    """The default Q4_1 model as it runs by default. Its products quantize activations to int8 (as
    llama.cpp does), which makes the output sensitive to the last bit of a layer's input: perturbing
    model.py's own layer inputs by one part in a million moves the next-token distribution by up to
    0.07 in total variation (measured). So the check is the distributions' distance, not bit equality."""
    llm = plainllama.load(device="cpu")
    ids = llm.encode_prompt(CODE)
    use_kernel(True)
    fast = teacher_forced_logprobs(llm, ids)
    use_kernel(False)
    slow = teacher_forced_logprobs(llm, ids)
    tv = 0.5 * (fast.exp() - slow.exp()).abs().sum(-1)
    assert tv.max().item() < 0.15 and tv.mean().item() < 0.03, tv
    assert (fast.argmax(-1) == slow.argmax(-1)).float().mean().item() >= 0.9


def pytorch_tiles(dtype):
    def attend(q, k, v, mask, start):  # -> [B, T, H Hd], as KernelBlock._attention returns it
        B, H, T, Hd = q.shape
        return decode_block.query_tiles_attention(q, k, v, mask, start, dtype).transpose(1, 2).reshape(B, T, H * Hd)

    return attend


def c_kernel(q, k, v, mask, start):
    return decode_block.c_attention(q, k, v, mask)


def c_kernel_float32(q, k, v, mask, start):
    return decode_block.c_attention(q, k, v, mask, torch.float32)


def c_attention_level(level: str) -> bool:
    """Whether prompt_attention.c runs on its `level` engine (2 AMX, 1 AVX-512 BF16) on this CPU."""
    engine = {"amx": 2, "avx512": 1}[level]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PLAINLLAMA_ISA", level)
        return (
            kernels.available() and kernels.isa() == level and kernels.function("prompt_attention_engine")() == engine
        )


def c_float32_attention_runs(level: str) -> bool:
    """Whether prompt_attention_f32.c runs here at `level` (its AVX-512 or its AVX2 half)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PLAINLLAMA_ISA", level)
        return kernels.available() and kernels.function("kernel_level")() == {"avx512": 3, "avx2": 2}[level]


C_LEVELS = [level for level in ("amx", "avx512") if c_attention_level(level)]
C_FLOAT32 = [
    name for name, level in (("c-float32", "avx512"), ("c-float32-avx2", "avx2")) if c_float32_attention_runs(level)
]
ATTENTIONS = {  # the prompt path's attention, each way it is computed: name -> (function, its bfloat16 or not)
    "pytorch-bfloat16": (pytorch_tiles(torch.bfloat16), True),
    "pytorch-float32": (pytorch_tiles(torch.float32), False),
    **{f"c-{level}": (c_kernel, True) for level in C_LEVELS},  # prompt_attention.c's engines this CPU has
    **{name: (c_kernel_float32, False) for name in C_FLOAT32},  # prompt_attention_f32.c, AVX-512 and AVX2
}
C_ENGINE_LEVELS = {"c-amx": "amx", "c-avx512": "avx512", "c-float32": "avx512", "c-float32-avx2": "avx2"}


def float64_attention(q, k, v, mask) -> torch.Tensor:
    """The oracle: softmax(q k^T / sqrt(Hd)) v in float64 with a boolean mask -> [B, T, H Hd]."""
    B, H, T, Hd = q.shape
    repeat = H // k.shape[1]
    scores = (q.double() @ k.double().repeat_interleave(repeat, dim=1).transpose(-1, -2)) / math.sqrt(Hd)
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.double().repeat_interleave(repeat, dim=1)
    return out.transpose(1, 2).reshape(B, T, H * Hd)


@pytest.mark.parametrize("attention", list(ATTENTIONS))
@pytest.mark.parametrize(
    "length, cuts",
    [
        (137, [128]),  # the prefix cache's case: 9 queries after 128 cached positions
        (700, [9, 512, 690]),  # chunks that cross a block of 512 keys
        (1300, [1000, 1290]),
        (2100, [2047, 2050]),  # across prompt_attention.c's slabs of 2048 keys
    ],
)
def test_prompt_attention_gives_a_query_the_same_bits_in_any_company(attention, length, cuts, monkeypatch):
    """The prompt path's attention (decode_block.query_tiles_attention through PyTorch,
    kernels/prompt_attention.c on AMX and with AVX-512 BF16, or prompt_attention_f32.c in float32 on
    AVX-512 CPUs without BF16): a prompt's queries computed in chunks
    (each against the keys so far, as the prefix cache and chunked prompts do) equal the same queries
    computed together, bit for bit (PyTorch's fused attention alone did not: its blocking follows the
    number of queries and keys). Oracle for the numbers: float64 softmax attention with the same causal
    mask, within the rounding of the inputs (bfloat16 q, k, v: 2^-8 relative, and the softmax weights
    rounded to bfloat16 before they multiply v; float32: sums of float32 products)."""
    attend, bfloat16 = ATTENTIONS[attention]
    if attention.startswith("c-"):
        monkeypatch.setenv("PLAINLLAMA_ISA", C_ENGINE_LEVELS[attention])  # whatever a module fixture left set
    H, K, Hd = 9, 3, 64  # the default model's heads
    generator = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(1, n, length, Hd, generator=generator) for n in (H, K, K))
    positions = torch.arange(length)
    whole = attend(q, k, v, positions[None, :] <= positions[:, None], 0)
    pieces, start = [], 0
    for end in [*cuts, length]:
        mask = positions[None, :end] <= positions[start:end, None]  # [T, end]
        pieces.append(attend(q[:, :, start:end], k[:, :, :end], v[:, :, :end], mask, start))
        start = end
    assert torch.equal(torch.cat(pieces, dim=1), whole)
    reference = float64_attention(q, k, v, positions[None, :] <= positions[:, None])
    error = (whole.double() - reference).abs().max().item()
    assert error < (2e-2 if bfloat16 else 1e-5) * reference.abs().max().item()


def test_float32_c_attention_is_taken_at_every_kernel_level_and_not_without_kernels(monkeypatch):
    """prompt_attention_f32.c has an AVX-512 and an AVX2 half: the prompt path picks it at both levels
    (its numbers: the tests around this one), and not where no kernels run."""
    q, k, v = torch.randn(1, 2, 5, 32), torch.randn(1, 1, 5, 32), torch.randn(1, 1, 5, 32)
    for level in [*kernels.levels(), "none"]:
        monkeypatch.setenv("PLAINLLAMA_ISA", level)
        assert decode_block.c_attention_runs(q, k, v, torch.float32) == (level != "none")


@pytest.mark.skipif(not C_LEVELS + C_FLOAT32, reason="no C attention kernels here")
@pytest.mark.parametrize("engine", [f"c-{level}" for level in C_LEVELS] + C_FLOAT32)
@pytest.mark.parametrize("Hd", [64, 128, 96])
def test_c_attention_reads_caches_and_padded_batches(Hd, engine, monkeypatch):
    """kernels/prompt_attention.c (each engine this CPU runs) and prompt_attention_f32.c against
    float64 attention (the oracle above) where the model hands it its inputs: queries inside the
    layer's qkv product (heads side by side in rows of q, k and v), keys and values in a KV cache
    longer than the keys so far (read in place, through the cache's strides), a left-padded batch's
    mask (model.causal_mask with padding: each sequence its own mask row, and the padded rows see
    nothing but their own position) and a prompt continued after cached positions. Tolerance: bfloat16
    inputs and weights (2^-8 relative each), as in the test above; float32: sums of float32 products."""
    monkeypatch.setenv("PLAINLLAMA_ISA", C_ENGINE_LEVELS[engine])  # whatever level a module fixture left set
    dtype = torch.float32 if engine.startswith("c-float32") else torch.bfloat16
    B, T, start, H, K, capacity = 3, 45, 30, 8, 2, 96
    generator = torch.Generator().manual_seed(Hd)
    qkv = torch.randn(B, T, (H + 2 * K) * Hd, generator=generator)
    q, k_new, v_new = qkv.view(B, T, H + 2 * K, Hd).transpose(1, 2).split((H, K, K), dim=1)
    cache_k, cache_v = torch.zeros(2, B, K, capacity, Hd)
    cache_k[:, :, :start], cache_v[:, :, :start] = torch.randn(2, B, K, start, Hd, generator=generator)
    cache_k[:, :, start : start + T], cache_v[:, :, start : start + T] = k_new, v_new
    end = start + T
    k, v = cache_k[:, :, :end], cache_v[:, :, :end]
    mask = causal_mask(start, T, "cpu", pad=torch.tensor([0, 7, 33]))  # [B, 1, T, end]
    out = decode_block.c_attention(q, k, v, mask, dtype)
    reference = float64_attention(q, k, v, mask)
    assert out.shape == (B, T, H * Hd)
    bound = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert (out.double() - reference).abs().max().item() < bound * reference.abs().max().item()
    # the same numbers from contiguous copies: the strides are read, not assumed
    assert torch.equal(decode_block.c_attention(q.contiguous(), k.contiguous(), v.contiguous(), mask, dtype), out)
