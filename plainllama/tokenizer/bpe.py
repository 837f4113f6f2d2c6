"""Byte-level BPE (GPT-2, SmolLM, Llama 3): text -> UTF-8 bytes -> merged tokens.

Every byte has a token, so any text encodes without an "unknown" token. The vocabulary files spell
tokens with one printable character per byte (GPT-2's `bytes_to_unicode` table: a space is 'Ġ'),
and the merges are listed most frequent first: to encode a piece, repeatedly merge the adjacent pair
that comes earliest in that list until no listed pair is left.
"""

from __future__ import annotations

from typing import Any

import heapq

from .pretokenize import compile_patterns, split_pieces


def byte_to_char_table() -> list[str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves, the
    other 68 bytes (controls, space, ...) are moved to code points 256 and up."""
    kept = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in kept:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


BYTE_TO_CHAR = byte_to_char_table()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


def merge_word(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge adjacent symbols, lowest-ranked pair first (leftmost on ties), until no pair has a rank.

    A heap of candidate pairs over a linked list keeps this O(n log n), so a megabyte without a
    single space is as safe to encode as a short word. Heap entries go stale when a neighbour
    merges; they are recognised and skipped when popped.
    """
    n = len(symbols)
    if n < 2:
        return symbols
    sym: list[Any] = list(symbols)  # a str, or None once merged into its left neighbour
    nxt = list(range(1, n)) + [-1]
    prv = [-1] + list(range(n - 1))
    heap = [(ranks[(sym[i], sym[i + 1])], i, sym[i], sym[i + 1]) for i in range(n - 1) if (sym[i], sym[i + 1]) in ranks]
    heapq.heapify(heap)
    while heap:
        _, i, left, right = heapq.heappop(heap)
        j = nxt[i]
        if sym[i] != left or j == -1 or sym[j] != right:
            continue  # stale: one side has merged with something else since this entry was pushed
        sym[i] = left + right
        sym[j] = None
        nxt[i] = nxt[j]
        if nxt[j] != -1:
            prv[nxt[j]] = i
        for a, b in ((prv[i], i), (i, nxt[i])):
            if a != -1 and b != -1 and (sym[a], sym[b]) in ranks:
                heapq.heappush(heap, (ranks[(sym[a], sym[b])], a, sym[a], sym[b]))
    return [s for s in sym if s is not None]


class BytePairEncoding:
    def __init__(self, tokens: list[str], merges: list[str], patterns: tuple[str, ...], whole_piece_first: bool):
        self.tokens = tokens
        self.ids = {token: i for i, token in enumerate(tokens)}
        self.ranks = {}
        for rank, merge in enumerate(merges):
            left, _, right = merge.partition(" ")
            self.ranks[(left, right)] = rank
        self.pattern_strings = patterns
        self.patterns = compile_patterns(patterns)
        self.whole_piece_first = whole_piece_first
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in split_pieces(text, self.patterns):
            cached = self._cache.get(piece)
            if cached is None:
                cached = self._encode_piece(piece)
                if len(self._cache) < 100_000 and len(piece) < 256:
                    self._cache[piece] = cached
            ids.extend(cached)
        return ids

    def _encode_piece(self, piece: str) -> list[int]:
        chars = [BYTE_TO_CHAR[b] for b in piece.encode("utf-8")]
        if self.whole_piece_first:
            whole = self.ids.get("".join(chars))
            if whole is not None:
                return [whole]
        # Some vocabularies have no token for a few control bytes (SmolLM2 lacks 21); such bytes are
        # dropped, as Hugging Face tokenizers and llama.cpp both do.
        return [self.ids[s] for s in merge_word(chars, self.ranks) if s in self.ids]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a vocabulary entry stands for. Entries outside the byte table (added tokens
        written as plain text) stand for their own UTF-8."""
        token = self.tokens[token_id]
        if all(c in CHAR_TO_BYTE for c in token):
            return bytes(CHAR_TO_BYTE[c] for c in token)
        return token.encode("utf-8")
