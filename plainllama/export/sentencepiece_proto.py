"""A SentencePiece vocabulary (as GGUF files carry it: pieces, scores, types) -> the bytes of a
`tokenizer.model`, the serialized ModelProto that Meta's Llama 2 tokenizer.model is and that the
sentencepiece library loads.

Only the fields a BPE model with byte fallback needs are written, in protobuf's wire format (a
field is a key, (number << 3) | wire type, then a varint, a 4-byte float or a length-prefixed
body). Field numbers are those of sentencepiece_model.proto:

    ModelProto      1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec
    SentencePiece   1 piece, 2 score (float), 3 type (1 normal, 2 unknown, 3 control, 4 user
                    defined, 5 unused, 6 byte: the numbering GGUF's token types use too)
    TrainerSpec     3 model_type (2 = BPE), 4 vocab_size, 35 byte_fallback, 45-47 unk/bos/eos pieces
    NormalizerSpec  1 name, 3 add_dummy_prefix, 4 remove_extra_whitespaces, 5 escape_whitespaces

The normalizer is "identity" with whitespace kept as it is, which is what plainllama's SentencePiece
encoder does with a GGUF vocabulary (and Llama 2's own tokenizer.model says)."""

from __future__ import annotations

import struct

VARINT, FIXED32, LENGTH = 0, 5, 2
BPE = 2


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32s are written as 10-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, wire: int, payload: bytes) -> bytes:
    return varint(number << 3 | wire) + payload


def integer(number: int, value: int) -> bytes:
    return field(number, VARINT, varint(value))


def text(number: int, value: str | bytes) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    return field(number, LENGTH, varint(len(data)) + data)


def model_proto(
    tokens: list[str],
    scores: list[float],
    types: list[int],
    unk: str | None,
    bos: str | None,
    eos: str | None,
    add_dummy_prefix: bool,
) -> bytes:
    pieces = b"".join(
        text(1, text(1, t) + field(2, FIXED32, struct.pack("<f", s)) + integer(3, k))
        for t, s, k in zip(tokens, scores, types, strict=True)
    )
    trainer = integer(3, BPE) + integer(4, len(tokens)) + integer(35, int(6 in types))
    for number, piece in ((45, unk), (46, bos), (47, eos)):
        if piece is not None:
            trainer += text(number, piece)
    normalizer = text(1, "identity") + integer(3, int(add_dummy_prefix)) + integer(4, 0) + integer(5, 1)
    return pieces + text(2, trainer) + text(3, normalizer)
