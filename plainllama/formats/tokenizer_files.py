"""Meta's tokenizer.model, in either of its two formats, recognised by content:
Llama 3's is text (base64 token, space, rank per line), Llama 1/2's a SentencePiece protobuf."""

from __future__ import annotations

import base64
import binascii
import re

from ..errors import PlainLlamaError
from ..tokenizer import Tokenizer
from ..tokenizer.sentencepiece import SentencePieceModelFile
from ..tokenizer.tiktoken_bpe import LLAMA3_SPECIAL_TOKENS, TiktokenBPE
from ..tokenizer.tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED

RANK_LINE = re.compile(rb"[A-Za-z0-9+/=]+ \d+")


def load_tokenizer_model(path: str) -> tuple[Tokenizer, str]:
    """-> (tokenizer, chat format name: "llama3" or "llama2")."""
    with open(path, "rb") as f:
        head = f.read(256)
    if RANK_LINE.match(head):
        return tiktoken_tokenizer(path), "llama3"
    return sentencepiece_tokenizer(path), "llama2"


def tiktoken_tokenizer(path: str) -> Tokenizer:
    ranks = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise PlainLlamaError(
                    f"{path}: line {number} is not '<base64 token> <rank>'; the file is corrupt"
                ) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise PlainLlamaError(f"{path}: token ranks are not 0..{len(ranks) - 1} without gaps; the file is corrupt")
    model = TiktokenBPE(ranks)
    tokens = [model.token_bytes(i).decode("utf-8", errors="replace") for i in range(len(ranks))] + LLAMA3_SPECIAL_TOKENS
    types = [NORMAL] * len(ranks) + [CONTROL] * len(LLAMA3_SPECIAL_TOKENS)
    special = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
    return Tokenizer(
        model, tokens, types, bos_id=special["<|begin_of_text|>"], eos_id=special["<|end_of_text|>"], add_bos=True
    )


def sentencepiece_tokenizer(path: str) -> Tokenizer:
    import sentencepiece  # only needed for this kind of vocabulary

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.load(path)
    except (RuntimeError, OSError) as e:
        raise PlainLlamaError(
            f"{path}: neither a Llama 3 tokenizer (base64 ranks) nor a SentencePiece model ({str(e).splitlines()[0]})"
        ) from None
    tokens, types = [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        types.append(
            UNKNOWN
            if sp.is_unknown(i)
            else CONTROL
            if sp.is_control(i)
            else BYTE
            if sp.is_byte(i)
            else UNUSED
            if sp.is_unused(i)
            else NORMAL
        )
    bos, eos = sp.bos_id(), sp.eos_id()
    return Tokenizer(
        SentencePieceModelFile(sp), tokens, types, bos if bos >= 0 else None, eos if eos >= 0 else None, add_bos=True
    )
