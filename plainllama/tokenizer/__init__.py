"""Tokenizers: text -> token ids -> text. See tokenizer.py for the shared layer, bpe.py and
sentencepiece.py for the two ways a vocabulary turns text into pieces."""

from .bpe import BytePairEncoding
from .sentencepiece import SentencePieceBPE
from .tokenizer import StreamDecoder, Tokenizer

__all__ = ["BytePairEncoding", "SentencePieceBPE", "StreamDecoder", "Tokenizer"]
