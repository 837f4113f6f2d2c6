"""Tokenization against independent tokenizers.

- Byte-level BPE (the default model's GGUF vocabulary): Hugging Face `tokenizers`, built by
  transformers from the same GGUF, and llama.cpp's tokenizer (llama-cpp-python) reading the file.
  transformers' GGUF converter has no rule for the `smollm` pre-tokenizer and falls back to GPT-2's,
  so the HF oracle gets the pre-tokenizer SmolLM2's published tokenizer.json declares:
  Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)].
- SentencePiece BPE (Llama 2 style): the `sentencepiece` library, on a model this test trains and
  writes into a GGUF vocabulary.
"""

import os

import pytest

import plainllama
from helpers import CORPUS, oracle


@pytest.fixture(scope="session")
def hf_tokenizer(model_path):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    folder, name = os.path.split(model_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    backend = tok.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.encode_special_tokens = True  # split_special_tokens=True: text never becomes control tokens
    return backend


@pytest.fixture(scope="session")
def llama_cpp_vocab(model_path):
    llama_cpp = oracle("llama_cpp", "llama-cpp-python is installed by `scripts/setup.sh --test`")
    return llama_cpp.Llama(model_path=model_path, vocab_only=True, verbose=False)


@pytest.mark.parametrize("text", CORPUS)
def test_ids_match_hf_tokenizers(llm, hf_tokenizer, text):
    assert llm.tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("text", CORPUS)
def test_ids_match_llama_cpp(llm, llama_cpp_vocab, text):
    assert llm.tokenizer.encode(text) == llama_cpp_vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def test_long_inputs_match_hf_tokenizers(llm, hf_tokenizer):
    text = " ".join(CORPUS) * 20  # ~30 KB of mixed text
    assert llm.tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False).ids
    digits = "".join(str(i % 10) for i in range(20000))
    no_spaces = "abcdefghij" * 5000  # 50 KB without a single space: one pre-token
    for s in (digits, no_spaces):
        assert llm.tokenizer.encode(s) == hf_tokenizer.encode(s, add_special_tokens=False).ids


@pytest.mark.parametrize("text", [t for t in CORPUS if "\x04" not in t])
def test_decode_round_trips(llm, text):
    # (Four control bytes, \x04 among them, have no token in this vocabulary and are dropped, as
    # both oracles above also do.)
    assert llm.tokenizer.decode(llm.tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", CORPUS)
def test_stream_decode_never_emits_broken_utf8(llm, text):
    ids = llm.tokenizer.encode(text)
    pieces = list(llm.tokenizer.stream().decode_all(ids))
    assert "".join(pieces) == llm.tokenizer.decode(ids)
    for piece in pieces:
        assert "\ufffd" not in piece  # a replacement character would mean a character was cut
        piece.encode("utf-8")  # and every piece is a valid string on its own


def test_special_tokens_only_when_asked(llm, hf_tokenizer):
    text = "<|im_start|>user\nhi<|im_end|>"
    as_text = llm.tokenizer.encode(text)
    as_special = llm.tokenizer.encode(text, parse_special=True)
    assert 1 not in as_text and 2 not in as_text  # ids of <|im_start|> and <|im_end|>
    assert as_special[0] == 1 and as_special[-1] == 2
    hf_tokenizer.encode_special_tokens = False
    try:
        assert as_special == hf_tokenizer.encode(text, add_special_tokens=False).ids
    finally:
        hf_tokenizer.encode_special_tokens = True


def test_end_tokens_of_the_default_model(llm):
    # eos is <|im_end|> (2); <|endoftext|> (0) also ends generation, as in llama.cpp.
    assert llm.tokenizer.end_ids == {0, 2}


# --- SentencePiece (Llama 1/2 style vocabularies: tokenizer.ggml.model = "llama") ---


@pytest.mark.parametrize("text", CORPUS)
def test_sentencepiece_ids_match_sentencepiece_library(sentencepiece_model, sentencepiece_gguf, text):
    model = plainllama.load(str(sentencepiece_gguf), device="cpu")
    assert model.tokenizer.encode(text, bos=False) == sentencepiece_model.encode(text)


def test_sentencepiece_bos_and_decode(sentencepiece_model, sentencepiece_gguf):
    model = plainllama.load(str(sentencepiece_gguf), device="cpu")
    text = "Llamas live in herds. 日本語"
    ids = model.tokenizer.encode(text)
    assert ids[0] == sentencepiece_model.bos_id()  # llama vocabularies add BOS by default
    assert ids[1:] == sentencepiece_model.encode(text)
    assert model.tokenizer.decode(ids[1:]) == sentencepiece_model.decode(ids[1:]) == text
    # A prompt that already starts with the BOS text gets one BOS, not two.
    assert model.tokenizer.encode("<s>" + text, parse_special=True) == ids
    # The random-weight model runs on it.
    out = model.generate(text, max_new_tokens=4)
    assert len(out.tokens) == 4 and all(0 <= t < model.args.vocab_size for t in out.tokens)
