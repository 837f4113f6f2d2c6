"""Llama 3's tokenizer: byte-level BPE over tiktoken's "mergeable ranks" file.

Meta's tokenizer.model for Llama 3 is a text file, one token per line: the token's bytes in base64
and its rank. There are no merge rules: tiktoken merges, at each step, the adjacent pair whose
joined bytes have the lowest rank. We let tiktoken (the library the file was made for) do the
merging, and add what Meta's reference tokenizer does around it: the pre-tokenizer pattern, the
256 special tokens after the ranks, and the splitting of very long inputs.
"""

from __future__ import annotations

from collections.abc import Iterator

from .pretokenize import LLAMA3

# Meta's special tokens, in id order after the base vocabulary (llama_models/llama3/tokenizer.py).
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]
LLAMA3_SPECIAL_TOKENS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIAL_TOKENS))]

# tiktoken's Rust core is quadratic on one huge pre-token; Meta cuts long inputs before encoding,
# and we cut at the same places so the ids stay identical to the reference.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


def split_long_runs(text: str, max_run: int) -> Iterator[str]:
    """Cut `text` so that no piece holds more than `max_run` consecutive whitespace or
    consecutive non-whitespace characters (Meta's _split_whitespaces_or_nonwhitespaces)."""
    run_length, run_is_space, start = 0, text[:1].isspace(), 0
    for i, ch in enumerate(text):
        is_space = ch.isspace()
        if is_space != run_is_space:
            run_length, run_is_space = 1, is_space
        else:
            run_length += 1
            if run_length > max_run:
                yield text[start:i]
                start, run_length = i, 1
    yield text[start:]


class TiktokenBPE:
    def __init__(self, ranks: dict[bytes, int], name: str = "llama3"):
        import tiktoken  # only needed for this kind of vocabulary

        self.pattern = LLAMA3
        self.encoding = tiktoken.Encoding(name=name, pat_str=LLAMA3, mergeable_ranks=ranks, special_tokens={})
        self.n_base = len(ranks)

    def encode(self, text: str) -> list[int]:
        ids = []
        for i in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in split_long_runs(text[i : i + MAX_ENCODE_CHARS], MAX_RUN_CHARS):
                ids.extend(self.encoding.encode_ordinary(piece))
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)
