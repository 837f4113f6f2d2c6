"""Llama 3's tokenizer.model (tiktoken ranks) against Meta's reference Tokenizer
(llama_models.llama3.tokenizer, llama-models 0.3.0) reading the same real file."""

import pytest

from meta_files import llama3_tokenizer_model
from plainllama.formats.tokenizer_files import load_tokenizer_model
from helpers import CORPUS, oracle

oracle("llama_models")


@pytest.fixture(scope="module")
def ours():
    tokenizer, chat_format = load_tokenizer_model(llama3_tokenizer_model())
    assert chat_format == "llama3"
    return tokenizer


@pytest.fixture(scope="module")
def meta():
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


@pytest.mark.parametrize("text", CORPUS)
def test_ids_match_meta_reference(ours, meta, text):
    assert ours.encode(text) == meta.encode(text, bos=True, eos=False)
    assert ours.decode(ours.encode(text, bos=False)) == meta.decode(meta.encode(text, bos=False, eos=False))


def test_special_tokens_match_meta_reference(ours, meta):
    text = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|python_tag|>x"
        "<|reserved_special_token_100|>"
    )
    assert ours.encode(text, bos=False, parse_special=True) == meta.encode(
        text, bos=False, eos=False, allowed_special="all"
    )
    assert ours.encode(text, bos=False) == meta.encode(text, bos=False, eos=False)  # as text by default, in both
    assert {t: i for t, i in ours.control.items()} == meta.special_tokens


def test_very_long_inputs_match_meta_reference(ours, meta):
    # Meta cuts runs of more than 25,000 (non-)whitespace characters before encoding; so do we.
    no_spaces = "abcdefghijklmnopqrstuvwxyz0123456789" * 30_000  # ~1 MB without a space
    assert ours.encode(no_spaces) == meta.encode(no_spaces, bos=True, eos=False)
    spaces = " " * 60_000 + "x" + "\n" * 30_000
    assert ours.encode(spaces) == meta.encode(spaces, bos=True, eos=False)


def test_end_tokens_and_single_bos(ours, meta):
    assert ours.end_ids == {meta.eos_id, meta.eot_id, meta.eom_id}
    assert ours.bos_id == meta.bos_id and ours.vocab_size == meta.n_words
    assert ours.encode("<|begin_of_text|>Hello", parse_special=True) == [meta.bos_id] + meta.encode(
        "Hello", bos=False, eos=False
    )
