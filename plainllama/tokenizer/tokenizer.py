"""Text <-> token ids around a vocabulary model (byte-level BPE or SentencePiece BPE).

This layer adds what both kinds share: special tokens, the beginning-of-sequence token, end
tokens, and decoding back to text, including a streaming decoder for generation.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator

import regex

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end a turn in the chat formats we know. A file names one eos token, but chat models
# also stop on their end-of-turn marker (llama.cpp collects the same set of "end of generation"
# tokens by their text).
END_OF_TURN_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>", "</s>", "<|end|>", "<end_of_turn>")


class Tokenizer:
    def __init__(
        self, model, tokens: list[str], token_types: list[int], bos_id: int | None, eos_id: int | None, add_bos: bool
    ):
        self.model = model
        self.tokens = tokens
        self.token_types = token_types
        self.vocab_size = len(tokens)
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        # Control tokens (<|im_start|>, <s>) are matched in text only when the caller asks
        # (parse_special); user-defined tokens are always matched, as in llama.cpp and HF.
        self.control = {t: i for i, (t, k) in enumerate(zip(tokens, token_types, strict=False)) if k == CONTROL and t}
        kinds = list(enumerate(zip(tokens, token_types, strict=False)))
        self.user_defined = {t: i for i, (t, k) in kinds if k == USER_DEFINED and t}
        # Per parse_special: the special tokens matched in text, and one regex that finds them.
        self._specials = {False: self.user_defined, True: {**self.control, **self.user_defined}}
        self._splitters = {flag: self._splitter(specials) for flag, specials in self._specials.items()}
        self.token_bytes = [self._bytes_of(i) for i in range(len(tokens))]
        end = {eos_id} if eos_id is not None else set()
        end.update(i for t, i in self.control.items() if t in END_OF_TURN_TEXTS)
        self.end_ids = frozenset(end)

    @staticmethod
    def _splitter(specials: dict[str, int]):
        if not specials:
            return None
        # Longest first, so "<|im_start|>" is not cut short by a special token that is its prefix.
        alternatives = sorted(specials, key=len, reverse=True)
        return regex.compile("|".join(regex.escape(s) for s in alternatives))

    def _bytes_of(self, token_id: int) -> bytes:
        if self.token_types[token_id] in (CONTROL, USER_DEFINED, UNKNOWN):
            return self.tokens[token_id].encode("utf-8")
        return self.model.token_bytes(token_id)

    def encode(self, text: str, bos: bool | None = None, parse_special: bool = False, protect=()) -> list[int]:
        """Token ids of `text`. `bos`: put the beginning-of-sequence token first (default: what the
        vocabulary asks for). `parse_special`: turn the text of control tokens such as
        "<|im_start|>" into those tokens; off by default so user text can never forge them.
        `protect`: (start, end) character spans where special tokens are never parsed (the user's
        words inside a rendered chat template)."""
        ids = []
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids.append(self.bos_id)
        splitter, specials = self._splitters[parse_special], self._specials[parse_special]
        pos = 0
        matches = splitter.finditer(text) if splitter is not None else ()
        for match in matches:
            if any(start < match.end() and match.start() < end for start, end in protect):
                continue  # inside protected text: stays text
            if match.start() > pos:
                ids.extend(self._encode_plain(text[pos : match.start()]))
            ids.append(specials[match.group()])
            pos = match.end()
        if pos < len(text):
            ids.extend(self._encode_plain(text[pos:]))
        if len(ids) >= 2 and ids[0] == ids[1] == self.bos_id:
            ids.pop(0)  # the text began with the BOS token itself: never two
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        # Each stretch of plain text is encoded on its own: merges never cross a special token.
        # (SentencePiece vocabularies put their leading '▁' before each stretch, as llama.cpp does.)
        return self.model.encode(text)

    def decode(self, ids) -> str:
        """Text of a whole sequence. Control tokens show as their text; bytes that do not form
        valid UTF-8 become U+FFFD."""
        text = b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")
        if getattr(self.model, "add_space_prefix", False) and text.startswith(" "):
            text = text[1:]  # the space the encoder put in front (SentencePiece's dummy prefix)
        return text

    def piece(self, token_id: int) -> str:
        """How one token reads on its own, for display (may show U+FFFD for a partial character)."""
        return self.token_bytes[token_id].decode("utf-8", errors="replace")

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns ids into text one at a time without ever emitting half a character: a multi-byte
    character split over two tokens (emoji often are) is held back until its last byte arrives."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_bytes[token_id])

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)

    def decode_all(self, ids) -> Iterator[str]:
        for i in ids:
            text = self.push(i)
            if text:
                yield text
        tail = self.flush()
        if tail:
            yield tail
