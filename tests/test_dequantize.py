"""Every GGUF tensor type we read, against the `gguf` package's numpy dequantizers (llama.cpp's
own Python reference), on random blocks."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from gguf_files import random_blocks
from plainllama.formats.gguf_quants import BLOCK_FORMATS, dequantize


@pytest.mark.parametrize("type_name", sorted(BLOCK_FORMATS))
def test_block_formats_match_gguf_package_bit_for_bit(type_name):
    rng = np.random.default_rng(sum(map(ord, type_name)))
    per_block, _, _ = BLOCK_FORMATS[type_name]
    raw = random_blocks(type_name, 512, rng)
    expected = quants.dequantize(raw.reshape(-1), GGMLQuantizationType[type_name]).reshape(-1)
    ours = dequantize(torch.from_numpy(raw.reshape(-1).copy()), type_name, (512 * per_block,))
    assert ours.dtype == torch.float32
    np.testing.assert_array_equal(ours.numpy(), expected)


@pytest.mark.parametrize("type_name", ["F16", "BF16"])
def test_float_formats_match_gguf_package(type_name):
    rng = np.random.default_rng(1)
    weights = rng.standard_normal((8, 64)).astype(np.float32)
    qtype = GGMLQuantizationType[type_name]
    stored = quants.quantize(weights, qtype)
    expected = quants.dequantize(stored, qtype)
    ours = dequantize(
        torch.from_numpy(np.ascontiguousarray(stored).view(np.uint8).reshape(-1).copy()), type_name, (8, 64)
    )
    np.testing.assert_array_equal(ours.float().numpy(), expected)


def test_quantized_values_come_back_close_to_the_original():
    """A sanity check of meaning, not only of agreement: Q8_0 of smooth data is within 1%."""
    weights = np.linspace(-1, 1, 32 * 64, dtype=np.float32)
    stored = quants.quantize(weights, GGMLQuantizationType.Q8_0)
    ours = dequantize(torch.from_numpy(stored.reshape(-1).copy()), "Q8_0", (32 * 64,))
    assert np.abs(ours.numpy() - weights).max() < 0.01
