"""Hugging Face tokenizer.json (+ tokenizer_config.json) -> our Tokenizer.

tokenizer.json describes a pipeline (normalizer, pre-tokenizer, model, decoder). Llama-family files
use one of two shapes, both of which our own classes implement exactly:
- byte-level BPE (Llama 3, SmolLM, GPT-2): a pre-tokenizer made of Split(regex), Digits and
  ByteLevel steps, merges, and `ignore_merges` for Llama 3;
- SentencePiece-style BPE (Llama 1/2 converted): '▁' for spaces (a normalizer or a Metaspace
  pre-tokenizer), byte fallback, merges ordered as the SentencePiece scores were.
Anything else is reported by name rather than tokenized differently from the original.
"""

from __future__ import annotations

import json
import os

import regex

from ..errors import PlainLlamaError
from .fields import integer
from ..tokenizer import BytePairEncoding, SentencePieceBPE, Tokenizer
from ..tokenizer.pretokenize import GPT2
from ..tokenizer.sentencepiece import SPACE
from ..tokenizer.tokenizer import BYTE, CONTROL, NORMAL, USER_DEFINED


def read_json(path: str) -> dict:
    """A JSON file that must hold an object (every config and tokenizer file does)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlainLlamaError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise PlainLlamaError(f"{path}: JSON nested too deeply to be a config file") from None
    if not isinstance(value, dict):
        raise PlainLlamaError(f"{path}: expected a JSON object, found a {type(value).__name__}")
    return value


def token_text(value) -> str | None:
    """tokenizer_config.json writes a token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_tokenizer_json(folder: str, extra_end_ids: set[int]) -> Tokenizer:
    path = os.path.join(folder, "tokenizer.json")
    spec = read_json(path)
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = read_json(config_path) if os.path.isfile(config_path) else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise PlainLlamaError(f"{path}: tokenizer model {model.get('type')!r} is not supported (plainllama reads BPE)")

    vocab: dict[str, int] = model.get("vocab") or {}
    added = spec.get("added_tokens") or []
    if not isinstance(vocab, dict) or not isinstance(added, list):
        raise PlainLlamaError(f"{path}: model.vocab must be an object and added_tokens a list")
    for text, i in vocab.items():
        integer(path, f"the id of vocabulary entry {text!r}", i, minimum=0)
    for t in added:
        if not isinstance(t, dict) or not isinstance(t.get("content"), str):
            raise PlainLlamaError(
                f"{path}: an added token must be an object with a 'content' string, got {str(t)[:60]}"
            )
        integer(path, f"the id of added token {t['content']!r}", t.get("id"), minimum=0)
    size = 1 + max([*vocab.values(), *(t["id"] for t in added)], default=-1)
    # The token table is sized by the largest id: it must be about as large as the entries are many.
    if size > len(vocab) + len(added) + 1024:
        raise PlainLlamaError(
            f"{path}: token ids go up to {size - 1}, but the file holds only {len(vocab) + len(added)} tokens; "
            "it is corrupt"
        )
    tokens, types = [""] * size, [NORMAL] * size
    for text, i in vocab.items():
        tokens[i] = text
    for t in added:
        tokens[t["id"]] = t["content"]
        types[t["id"]] = CONTROL if t.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    for text in (*tokens, *merges):
        try:  # JSON's \ud800 escapes give lone surrogates, which no text can contain
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise PlainLlamaError(f"{path}: the vocabulary holds {text!r}, which is not valid Unicode") from None

    try:
        bpe: SentencePieceBPE | BytePairEncoding
        if is_sentencepiece_style(spec):
            bpe = sentencepiece_style(path, spec, tokens, types, merges, vocab, model)
        else:
            bpe = BytePairEncoding(
                tokens, merges, byte_level_patterns(path, spec.get("pre_tokenizer")), bool(model.get("ignore_merges"))
            )
    except ValueError as e:
        raise PlainLlamaError(f"{path}: {e}") from None

    ids = {t: i for i, t in enumerate(tokens)}
    bos = ids.get(token_text(config.get("bos_token")) or "")
    eos = ids.get(token_text(config.get("eos_token")) or "")
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # newer files say it in the post-processor instead: does it put BOS first?
        add_bos = bos is not None and bos_in_post_processor(spec.get("post_processor"), tokens[bos])
    tokenizer = Tokenizer(bpe, tokens, types, bos, eos, bool(add_bos))
    tokenizer.end_ids = tokenizer.end_ids | frozenset(i for i in extra_end_ids if 0 <= i < size)
    return tokenizer


def is_sentencepiece_style(spec: dict) -> bool:
    model, normalizer, pre = spec.get("model") or {}, spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    return bool(model.get("byte_fallback")) or pre.get("type") == "Metaspace" or SPACE in json.dumps(normalizer)


def sentencepiece_style(path, spec, tokens, types, merges, vocab, model) -> SentencePieceBPE:
    # The merges list is the SentencePiece scores in another form: the earlier a token is made by
    # a merge, the higher its score.
    scores = [0.0] * len(tokens)
    first_rank: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        first_rank.setdefault(merge.replace(" ", "", 1), rank)
    for text, i in vocab.items():
        scores[i] = -float(first_rank.get(text, len(merges)))
    for i, text in enumerate(tokens):
        if len(text) == 6 and text.startswith("<0x") and text.endswith(">") and types[i] == NORMAL:
            types[i] = BYTE
    normalizer, pre = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    prefix = '"Prepend"' in json.dumps(normalizer) or (
        pre.get("type") == "Metaspace" and pre.get("prepend_scheme", "always") != "never"
    )
    unk = vocab.get(model.get("unk_token")) if model.get("unk_token") else None
    return SentencePieceBPE(tokens, scores, types, unk, add_space_prefix=prefix)


def byte_level_patterns(path: str, pre: dict | None) -> tuple[str, ...]:
    """The pre-tokenizer steps, as the regex patterns our BPE applies in turn."""
    steps = ((pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre] if pre else []) or []
    patterns = []
    for step in steps:
        kind = step.get("type")
        if kind == "Split":
            if step.get("behavior") not in ("Isolated", "isolated") or step.get("invert"):
                raise PlainLlamaError(
                    f"{path}: Split pre-tokenizer with behavior {step.get('behavior')!r} is not supported"
                )
            pattern = step.get("pattern") or {}
            patterns.append(pattern["Regex"] if "Regex" in pattern else regex.escape(pattern.get("String", "")))
        elif kind == "Digits":
            patterns.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "ByteLevel":
            if step.get("add_prefix_space"):
                raise PlainLlamaError(f"{path}: ByteLevel with add_prefix_space is not supported")
            if step.get("use_regex", True):
                patterns.append(GPT2)
        else:
            raise PlainLlamaError(f"{path}: pre-tokenizer {kind!r} is not supported")
    if not patterns:
        raise PlainLlamaError(f"{path}: no pre-tokenizer; byte-level BPE needs one")
    return tuple(patterns)


def bos_in_post_processor(post: dict | None, bos_text: str) -> bool:
    if not post:
        return False
    if post.get("type") == "Sequence":
        return any(bos_in_post_processor(p, bos_text) for p in post.get("processors", []))
    if post.get("type") == "TemplateProcessing":
        single = post.get("single") or []
        return bool(single) and single[0].get("SpecialToken", {}).get("id") == bos_text
    return False
