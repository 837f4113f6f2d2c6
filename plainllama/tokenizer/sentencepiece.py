"""SentencePiece-style BPE (Llama 1 and 2): text -> characters -> merged pieces, scored.

Spaces are written as '▁' (U+2581) and one is put in front of the text, so "Hello world" is
encoded as "▁Hello▁world". Encoding starts from single characters and repeatedly merges the
adjacent pair whose joined text is a vocabulary piece with the highest score (leftmost on ties).
A character with no piece of its own falls back to its UTF-8 bytes, as the tokens <0x00>..<0xFF>.
"""

from __future__ import annotations

from typing import Any

import heapq

SPACE = "\u2581"
BYTE_TOKEN = 6  # GGUF token type of the <0xNN> byte-fallback pieces
UNUSED_TOKEN = 5


class SentencePieceBPE:
    def __init__(
        self, tokens: list[str], scores: list[float], token_types: list[int], unk_id: int | None, add_space_prefix: bool
    ):
        self.tokens = tokens
        self.scores = scores
        self.token_types = token_types
        # Unused pieces exist in the vocabulary but are never produced by the encoder.
        self.ids = {t: i for i, t in enumerate(tokens) if token_types[i] != UNUSED_TOKEN}
        self.byte_ids = {}
        for i, (t, kind) in enumerate(zip(tokens, token_types, strict=False)):
            if kind == BYTE_TOKEN and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                self.byte_ids[int(t[3:5], 16)] = i
        self.byte_of_id = {i: b for b, i in self.byte_ids.items()}
        self.unk_id = unk_id
        self.add_space_prefix = add_space_prefix

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        if self.add_space_prefix:
            text = " " + text
        symbols = self._merge(list(text.replace(" ", SPACE)))
        ids = []
        for s in symbols:
            if s in self.ids:
                ids.append(self.ids[s])
            else:
                ids.extend(self._fallback(s))
        return ids

    def _fallback(self, symbol: str) -> list[int]:
        if self.byte_ids:
            return [self.byte_ids[b] for b in symbol.encode("utf-8")]
        if self.unk_id is None:
            raise ValueError(f"cannot encode {symbol!r}: the vocabulary has neither byte tokens nor an unknown token")
        return [self.unk_id]

    def _merge(self, sym: list[Any]) -> list[str]:  # sym: str, or None once merged into its left neighbour
        """Merge highest-scoring pairs first; a heap over a linked list, stale entries skipped."""
        n = len(sym)
        nxt = list(range(1, n)) + [-1]
        prv = [-1] + list(range(n - 1))
        heap: list[tuple[float, int, str, str]] = []

        def push(a: int, b: int):
            joined = sym[a] + sym[b]
            if joined in self.ids:
                heapq.heappush(heap, (-self.scores[self.ids[joined]], a, sym[a], sym[b]))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = nxt[i]
            if sym[i] != left or j == -1 or sym[j] != right:
                continue
            sym[i] = left + right
            sym[j] = None
            nxt[i] = nxt[j]
            if nxt[j] != -1:
                prv[nxt[j]] = i
            if prv[i] != -1:
                push(prv[i], i)
            if nxt[i] != -1:
                push(i, nxt[i])
        return [s for s in sym if s is not None]

    def token_bytes(self, token_id: int) -> bytes:
        byte = self.byte_of_id.get(token_id)
        if byte is not None:
            return bytes([byte])
        return self.tokens[token_id].replace(SPACE, " ").encode("utf-8")


class SentencePieceModelFile:
    """A SentencePiece `tokenizer.model` (Llama 1/2), encoded by the sentencepiece library itself:
    the file carries its own normalization rules, which the library applies exactly."""

    add_space_prefix = True  # decode drops the dummy prefix space, as sentencepiece does

    def __init__(self, processor):
        self.sp = processor
        self.byte_of_id = {}
        for i in range(processor.get_piece_size()):
            if processor.is_byte(i):
                self.byte_of_id[i] = int(processor.id_to_piece(i)[3:5], 16)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text) if text else []

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self.byte_of_id:
            return bytes([self.byte_of_id[token_id]])
        return self.sp.id_to_piece(token_id).replace(SPACE, " ").encode("utf-8")
