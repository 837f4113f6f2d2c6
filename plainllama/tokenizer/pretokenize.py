"""Pre-tokenization: cutting text into pieces before byte-pair merging.

A BPE vocabulary's merges were learned on text cut a particular way (words with their leading space,
runs of digits, punctuation), and merging never crosses a cut. Using another cut gives other ids,
so each vocabulary names its rule (`tokenizer.ggml.pre` in GGUF). Some rules are several patterns
applied in turn, each cutting the pieces the previous one left.
"""

from __future__ import annotations

import logging

import regex  # the `regex` module: Unicode classes like \p{L} that the standard `re` lacks

log = logging.getLogger("plainllama")

# GPT-2's pattern: English contractions, words with one optional leading space, numbers,
# punctuation runs, and whitespace (a run of spaces keeps its last space for the next word).
GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Llama 3 (Meta's tokenizer.py): case-insensitive contractions, a word may take one leading
# non-letter, numbers in groups of at most three digits, newlines kept together.
LLAMA3 = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# name -> (patterns applied in turn, whether a piece that is already a whole token skips merging)
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "gpt2": ((GPT2,), False),
    # SmolLM / StarCoder: every digit on its own, then GPT-2's pattern.
    "smollm": ((r"\p{N}", GPT2), False),
    "starcoder": ((r"\p{N}", GPT2), False),
    "refact": ((r"\p{N}", GPT2), False),
    # Llama 3 encodes a piece found whole in the vocabulary as that token, merges or not (as tiktoken does).
    "llama-bpe": ((LLAMA3,), True),
    "llama3": ((LLAMA3,), True),
    "llama-v3": ((LLAMA3,), True),
}
DEFAULT = "gpt2"


def pre_tokenizer_for(name: str | None) -> tuple[tuple[str, ...], bool]:
    if name in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[name]
    log.warning("unknown pre-tokenizer %r; using GPT-2's pattern, ids may differ from the original tokenizer", name)
    return PRE_TOKENIZERS[DEFAULT]


def split_pieces(text: str, patterns: list) -> list[str]:
    """Apply each compiled pattern in turn: matches become pieces, and so does any text between them."""
    pieces = [text]
    for pattern in patterns:
        cut = []
        for piece in pieces:
            pos = 0
            for match in pattern.finditer(piece):
                if match.start() > pos:
                    cut.append(piece[pos : match.start()])
                if match.end() > match.start():
                    cut.append(match.group())
                pos = match.end()
            if pos < len(piece):
                cut.append(piece[pos:])
        pieces = cut
    return pieces


def compile_patterns(patterns: tuple[str, ...]) -> list:
    return [regex.compile(p) for p in patterns]
