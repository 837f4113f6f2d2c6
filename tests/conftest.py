import os

# Tests compare numbers with other libraries: keep every library's threads and warnings quiet and
# the runs repeatable.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

import plainllama
from plainllama.default_model import default_model_path


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
