import os
from helpers import oracle

# Tests compare numbers with other libraries: keep every library's threads and warnings quiet and
# the runs repeatable.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

import plainllama
from plainllama.default_model import default_model_path
from gguf_files import write_llama_gguf
from plainllama.engine.cpu import kernels

# Every instruction-set level whose kernels this CPU runs (on an AVX-512 machine: avx2 and avx512;
# with AMX also amx). Kernel tests take the fixture `isa` (or `module_isa`) and run at each, so one
# CI machine also checks the kernels of the CPUs below it.
KERNEL_LEVELS = kernels.levels() or ["none"]


def _use_level(level: str, patch: pytest.MonkeyPatch) -> str:
    patch.setenv("PLAINLLAMA_ISA", level)
    assert kernels.isa() == level, f"PLAINLLAMA_ISA={level} built the {kernels.isa()} kernels"
    return level


@pytest.fixture(params=KERNEL_LEVELS)
def isa(request, monkeypatch):
    """The kernels capped at each level this CPU runs, for one test."""
    return _use_level(request.param, monkeypatch)


@pytest.fixture(scope="module", params=KERNEL_LEVELS)
def module_isa(request):
    """The kernels capped at each level this CPU runs, for a module's fixtures and tests."""
    with pytest.MonkeyPatch.context() as patch:
        yield _use_level(request.param, patch)


@pytest.fixture(scope="session")
def model_path():
    return default_model_path()


@pytest.fixture(scope="session")
def llm():
    """The default model in float32 on the CPU, as the oracles run it."""
    return plainllama.load(device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def vocab():
    from gguf_files import default_vocabulary

    return default_vocabulary()


def hf_load_gguf(path):
    """Hugging Face transformers' own GGUF loading (it dequantizes with the gguf package)."""
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(str(path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_model(model_path):
    return hf_load_gguf(model_path)


# --- a Llama 2-style SentencePiece vocabulary, trained here (shared by tokenizer and convert tests) ---

SP_TRAINING_TEXT = [
    "The llama is a domesticated South American camelid, widely used as a meat and pack animal.",
    "Llamas are social animals and live with others as a herd. Their wool is soft and contains only a small amount "
    "of lanolin.",
    "def tokenize(text): return [piece for piece in text.split()]",
    "Numbers like 12345 and 3.14159 appear in text; so do dates such as 2024-05-01.",
    "Café, naïve, résumé: accented Latin letters are common in European languages.",
] * 40


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory):
    """A BPE SentencePiece model trained here, set up like Llama 2's: byte fallback, no
    normalization, whitespace kept as it is, a dummy prefix space."""
    spm = oracle("sentencepiece")
    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(SP_TRAINING_TEXT), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "sp"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=str(folder / "sp.model"))


@pytest.fixture(scope="session")
def sentencepiece_gguf(sentencepiece_model, tmp_path_factory):
    sp = sentencepiece_model
    types = []
    for i in range(sp.get_piece_size()):
        types.append(
            2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1
        )
    vocab = {
        "model": "llama",
        "tokens": [sp.id_to_piece(i) for i in range(sp.get_piece_size())],
        "scores": [sp.get_score(i) for i in range(sp.get_piece_size())],
        "types": types,
        "bos": sp.bos_id(),
        "eos": sp.eos_id(),
        "unk": sp.unk_id(),
    }
    path = tmp_path_factory.mktemp("spm-gguf") / "llama2-style.gguf"
    return write_llama_gguf(path, vocab, dim=64, n_heads=2, n_kv_heads=2, hidden_dim=128)
