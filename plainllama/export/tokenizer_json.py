"""Our Tokenizer -> Hugging Face tokenizer.json + tokenizer_config.json.

Each kind of vocabulary is written in the shape transformers itself uses for it:
- byte-level BPE (GGUF gpt2, HF): vocab, merges in rank order, the pre-tokenizer patterns as
  Split steps followed by ByteLevel;
- Llama 3's tiktoken ranks: the same, with the merges recovered from the ranks (tiktoken files have
  none: a token of rank r is the merge of the two parts BPE reaches using only lower ranks);
- SentencePiece: vocab, merges ordered by the merged piece's score, '▁' for spaces, byte fallback.
"""

from __future__ import annotations

import json

from ..tokenizer import BytePairEncoding, SentencePieceBPE, Tokenizer
from ..tokenizer.bpe import BYTE_TO_CHAR
from ..tokenizer.sentencepiece import SPACE, SentencePieceModelFile
from ..tokenizer.tiktoken_bpe import TiktokenBPE
from ..tokenizer.tokenizer import CONTROL, USER_DEFINED


def byte_level_spec(vocab: dict, merges: list[str], patterns, ignore_merges: bool) -> dict:
    steps = [{"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False} for p in patterns]
    steps.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False})
    return {
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": steps},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": merges,
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    }


def all_splits(vocab: dict[str, int], priority) -> list[str]:
    """Every way to build a token from two shorter tokens, as a merge rule, most urgent first.

    tiktoken (and SentencePiece) merge any adjacent pair whose concatenation is a token, the
    lowest-ranked (highest-scored) result first; listing every split of every token, ordered by
    the result's priority, makes HF's merge-list BPE do exactly that."""
    rules = []
    for token, i in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                rules.append((priority(i), vocab[left], vocab[right], left, right))
    rules.sort()
    return [f"{r[3]} {r[4]}" for r in rules]


def tiktoken_merges(model: TiktokenBPE) -> tuple[dict, list[str]]:
    """Vocab in GPT-2's byte-to-character spelling, and merges recovered from the ranks."""
    vocab = {"".join(BYTE_TO_CHAR[b] for b in model.token_bytes(i)): i for i in range(model.n_base)}
    return vocab, all_splits(vocab, priority=lambda i: i)


def sentencepiece_spec(tokens: list[str], scores: list[float], types: list[int], unk_id: int | None) -> dict:
    vocab = {t: i for i, t in enumerate(tokens)}
    normal = {t: i for t, i in vocab.items() if types[i] == 1}
    merges = all_splits(normal, priority=lambda i: -scores[i])
    return {
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": SPACE},
                {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
            ],
        },
        "pre_tokenizer": None,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": tokens[unk_id] if unk_id is not None else None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
    }


def tokenizer_json(tok: Tokenizer) -> dict:
    model = tok.model
    added_ids = [i for i, k in enumerate(tok.token_types) if k in (CONTROL, USER_DEFINED)]
    if isinstance(model, BytePairEncoding):
        vocab = {t: i for i, t in enumerate(tok.tokens) if i not in set(added_ids)}
        merges = [f"{left} {right}" for (left, right), _ in sorted(model.ranks.items(), key=lambda item: item[1])]
        spec = byte_level_spec(vocab, merges, model.pattern_strings, model.whole_piece_first)
    elif isinstance(model, TiktokenBPE):
        vocab, merges = tiktoken_merges(model)
        spec = byte_level_spec(vocab, merges, (model.pattern,), True)
    elif isinstance(model, SentencePieceBPE):
        spec = sentencepiece_spec(model.tokens, model.scores, model.token_types, model.unk_id)
    elif isinstance(model, SentencePieceModelFile):
        sp = model.sp
        spec = sentencepiece_spec(
            tok.tokens, [sp.get_score(i) for i in range(sp.get_piece_size())], tok.token_types, sp.unk_id()
        )
    else:
        raise TypeError(f"no tokenizer.json writer for {type(model).__name__}")
    added = [
        {
            "id": i,
            "content": tok.tokens[i],
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": tok.token_types[i] == CONTROL,
        }
        for i in added_ids
    ]
    if tok.add_bos and tok.bos_id is not None:
        bos = tok.tokens[tok.bos_id]
        post = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}},
        }
    else:
        post = None
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "post_processor": post,
        **spec,
    }


def tokenizer_config(tok: Tokenizer, chat_template: str | None) -> dict:
    config = {
        "add_bos_token": tok.add_bos,
        "bos_token": tok.tokens[tok.bos_id] if tok.bos_id is not None else None,
        "eos_token": tok.tokens[tok.eos_id] if tok.eos_id is not None else None,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    if chat_template:
        config["chat_template"] = chat_template
    return config


def write_tokenizer(folder: str, tok: Tokenizer, chat_template: str | None) -> None:
    with open(f"{folder}/tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_json(tok), f, ensure_ascii=False)
    with open(f"{folder}/tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(tok, chat_template), f, ensure_ascii=False, indent=2)
