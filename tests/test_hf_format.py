"""Hugging Face model folders against Hugging Face transformers itself: random-weight
LlamaForCausalLM models written with save_pretrained, and tokenizer.json files made by transformers'
own converters (checked against Meta's reference tokenizer and the HF tokenizers library)."""

import json
import os

import pytest
import torch

import plainllama
from plainllama import PlainLlamaError
from helpers import oracle

transformers = oracle("transformers")

TEXTS = [
    "Hello world",
    "The llama (Lama glama) is a domesticated South American camelid.",
    "   x = [1, 22, 333, 4444]\n\tprint(x)  # ok",
    "日本語のテキスト 👨‍👩‍👧 e\u0301",
    "<|begin_of_text|>looks special but is text",
    "a" * 3000,
]


@pytest.fixture(scope="session")
def smollm_tokenizer_files(model_path, tmp_path_factory):
    """SmolLM2's tokenizer as transformers writes it from the GGUF file, with the pre-tokenizer
    SmolLM2's published tokenizer.json has (transformers' GGUF converter lacks the digit split)."""
    from tokenizers import pre_tokenizers

    folder, name = os.path.split(model_path)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    out = tmp_path_factory.mktemp("smollm-tokenizer")
    tok.save_pretrained(out)
    return out, tok


def save_random_llama(folder, tokenizer_folder, seed=0, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base = dict(
        vocab_size=49152,
        hidden_size=128,
        intermediate_size=320,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(config)
    model = LlamaForCausalLM(LlamaConfig(**base)).eval()
    with torch.no_grad():
        for p in model.parameters():  # HF initialises norms to exactly 1; make them matter
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    for f in os.listdir(tokenizer_folder):
        os.symlink(os.path.join(tokenizer_folder, f), os.path.join(folder, f))
    return model


CONFIGS = {
    "llama2-like": dict(),
    "llama3.1-like": dict(
        num_key_value_heads=2,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    ),
    "linear-rope": dict(num_key_value_heads=1, rope_scaling=dict(rope_type="linear", factor=4.0)),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_logits_match_hf_transformers(tmp_path, smollm_tokenizer_files, config):
    folder = tmp_path / config
    ref = save_random_llama(folder, smollm_tokenizer_files[0], **CONFIGS[config])
    ours = plainllama.load(str(folder), device="cpu", dtype="float32")
    ids = ours.tokenizer.encode(" ".join(TEXTS[:4]) * 3)
    assert len(ids) > 64  # long enough for the llama3 scaling (original context 32) to matter
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours.logits(ids), theirs, atol=1e-4, rtol=1e-4)
    assert ours.args.tie_embeddings == bool(CONFIGS[config].get("tie_word_embeddings"))


def test_sharded_safetensors_index(tmp_path, smollm_tokenizer_files):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    ref = LlamaForCausalLM(
        LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2)
    ).eval()
    ref.save_pretrained(tmp_path, max_shard_size="4MB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    for f in os.listdir(smollm_tokenizer_files[0]):
        os.symlink(os.path.join(smollm_tokenizer_files[0], f), tmp_path / f)
    ours = plainllama.load(str(tmp_path), device="cpu")
    ids = [1, 504, 3575, 282, 4649, 314, 2]
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ids), ref(torch.tensor([ids])).logits[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_tokenizer_json_matches_hf_tokenizers(smollm_tokenizer_files, tmp_path, text):
    folder, hf_tok = smollm_tokenizer_files
    (tmp_path / "config.json").write_text("{}")
    from plainllama.formats.hf_tokenizer import load_tokenizer_json

    ours = load_tokenizer_json(str(folder), set())
    hf_tok.backend_tokenizer.encode_special_tokens = True
    assert ours.encode(text) == hf_tok.backend_tokenizer.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="session")
def llama3_tokenizer_json(tmp_path_factory):
    """Meta's Llama 3 tokenizer.model converted by transformers' TikTokenConverter."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from meta_files import llama3_tokenizer_model
    from plainllama.tokenizer.tiktoken_bpe import LLAMA3_SPECIAL_TOKENS

    tk = TikTokenConverter(vocab_file=llama3_tokenizer_model()).converted()
    tk.add_special_tokens([AddedToken(t, special=True) for t in LLAMA3_SPECIAL_TOKENS])
    folder = tmp_path_factory.mktemp("llama3-tokenizer")
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True})
    )
    return folder


@pytest.mark.parametrize("text", TEXTS)
def test_llama3_tokenizer_json_matches_meta_reference(llama3_tokenizer_json, text):
    oracle("llama_models")
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    from plainllama.formats.hf_tokenizer import load_tokenizer_json

    ours = load_tokenizer_json(str(llama3_tokenizer_json), set())
    meta = MetaTokenizer.get_instance()
    assert ours.encode(text) == meta.encode(text, bos=True, eos=False)
    assert ours.decode(ours.encode(text, bos=False)) == text


# --- bad input ---


@pytest.fixture
def good_folder(tmp_path, smollm_tokenizer_files):
    save_random_llama(tmp_path / "m", smollm_tokenizer_files[0], num_hidden_layers=1)
    return tmp_path / "m"


def load_error(folder) -> str:
    with pytest.raises(PlainLlamaError) as e:
        plainllama.load(str(folder), device="cpu")
    return str(e.value)


def test_safetensors_header_cut_short(good_folder):
    path = good_folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    message = load_error(good_folder)
    assert "model.safetensors" in message and "corrupt" in message


def test_config_not_json(good_folder):
    (good_folder / "config.json").write_text("<html>404</html>")
    assert "config.json: not valid JSON" in load_error(good_folder)


def test_unsupported_rope_type(good_folder):
    config = json.loads((good_folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (good_folder / "config.json").write_text(json.dumps(config))
    assert "'yarn'" in load_error(good_folder)


def test_config_disagrees_with_tensors(good_folder):
    config = json.loads((good_folder / "config.json").read_text())
    config["intermediate_size"] = 256
    (good_folder / "config.json").write_text(json.dumps(config))
    message = load_error(good_folder)
    assert "320" in message and "256" in message and "config.json implies" in message


def test_unknown_config_key_is_reported(good_folder, caplog):
    config = json.loads((good_folder / "config.json").read_text())
    config["sliding_window"] = 4096
    (good_folder / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="plainllama"):
        plainllama.load(str(good_folder), device="cpu")
    assert "sliding_window" in caplog.text
