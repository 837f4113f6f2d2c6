"""What several test modules share: running the command line, requiring an oracle, a text corpus,
Meta-format test configs, and llama.cpp's logits."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch


def run_cli(*args, timeout=300, check=False, **kwargs) -> subprocess.CompletedProcess:
    """`python -m plainllama ARGS` as a real subprocess; `check`: assert it succeeded."""
    result = subprocess.run(
        [sys.executable, "-m", "plainllama", *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def oracle(module: str, why: str = "installed by `scripts/setup.sh --test`"):
    """Import a reference implementation the tests compare against. Locally a missing one skips its
    tests; in CI (CI=true) it fails them, so that a broken install cannot turn the oracle tests into
    skips while CI stays green."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"the oracle {module!r} is missing in CI ({why}): {e}", pytrace=False)
        pytest.skip(f"the oracle {module!r} is missing ({why})", allow_module_level=True)


# Text for tokenizer comparisons: prose, code, whitespace, scripts, emoji, digits, fake special tokens.
CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's a well-known pangram; we'll use it, they'd say.",
    "I'M SHOUTING, YOU'RE NOT, WE'VE SEEN IT",
    "def add(a, b):\n    return a + b  # sum\n\n\nclass Foo:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { total += x[i] * 2.5e-3; }",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\r\nand\n\n\n\nmany blank lines\n",
    "a" + " " * 17 + "b",
    "日本語のテキストとカタカナ。中文测试：你好，世界！한국어 텍스트입니다",
    "مرحبا بالعالم، هذه جملة عربية.",
    "नमस्ते दुनिया, यह हिंदी वाक्य है।",
    "Family: 👨‍👩‍👧‍👦, flags: 🇫🇷🇯🇵, skin tone: 👍🏽, heart: ❤️",
    "e\u0301 a\u0308 n\u0303 Z\u0351\u0358a\u0360l\u0334g\u0315o",  # combining marks
    "3141592653589793238462643383279502884197169399375105820974944",
    "Prices: $1,234.56, 10%, 2024-01-15, v1.2.3, 0x1F, 1e10",
    "<|im_start|>user\nThis looks like a special token<|im_end|> but is only text",
    "<|endoftext|><repo_name>x</s><s>[INST]",
    "Ünïcödé ünder ßtraße, naïve café, Ελληνικά, Русский текст",
    "control\x01\x04\x1fbytes and \x7f delete",
    "",
    " ",
    "\n",
    "'s 's 'S 'll",
]


# Meta checkpoint shapes for the comparisons with Meta's reference model (test_meta_format, test_convert)
LLAMA3_VOCAB = 128256
IDS = [128000, 791, 6864, 315, 9822, 374, 12366, 13, 578, 43876, 374, 264, 5679, 13, 128009, 40, 1093, 433, 0, 3639] * 3

CONFIGS = {
    # Llama 2: no GQA, ffn_dim_multiplier, vocab_size -1, no rope_theta in params.json (Llama 2 used 10000)
    "llama2": (
        {
            "dim": 128,
            "n_layers": 2,
            "n_heads": 4,
            "multiple_of": 64,
            "ffn_dim_multiplier": 1.3,
            "norm_eps": 1e-5,
            "vocab_size": -1,
        },
        10000.0,
    ),
    # Llama 3.1: GQA, scaled rope, theta 500000
    "llama3.1": (
        {
            "dim": 128,
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": 2,
            "multiple_of": 64,
            "ffn_dim_multiplier": 1.3,
            "norm_eps": 1e-5,
            "vocab_size": LLAMA3_VOCAB,
            "rope_theta": 500000.0,
            "use_scaled_rope": True,
        },
        500000.0,
    ),
}


GGML_F32 = 0  # ggml's type id for float32, for llama.cpp's KV cache


def llama_cpp_logits(path, ids):
    # A float32 KV cache (llama.cpp's default is float16) so that float32 files compare exactly.
    model = oracle("llama_cpp").Llama(
        model_path=str(path),
        n_ctx=max(64, len(ids) + 8),
        n_threads=2,
        n_batch=512,
        logits_all=True,
        type_k=GGML_F32,
        type_v=GGML_F32,
        verbose=False,
    )
    model.eval(ids)
    return torch.tensor(np.array(model.scores[: len(ids)]))
