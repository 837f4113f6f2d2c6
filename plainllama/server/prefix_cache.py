"""Keys and values of recent prompts, kept so that a request starting with one of them prefills only
what follows (a chat sends its whole history each turn: its fourth turn need not read the first three
again).

Reuse must not change a single number: a request's answer is the same with or without the cache.
The prompt path computes rows in blocks, and a row's arithmetic can depend on where its block starts
(measured: chunks starting at multiples of 16 rows give bit-identical keys and values, a chunk
starting at row 100 does not). So the scheduler starts every prefill chunk at a multiple of
ALIGN and ends every chunk but a prompt's last at a multiple of its chunk size, with or without a
cache, and only whole ALIGN-token blocks of a previous *prompt* are kept (its generated tokens' keys
were computed by decode steps, another arithmetic). tests/test_server.py checks a 4-turn chat's
answers against runs without the cache.
"""

from __future__ import annotations

import collections

import torch

from ..engine.cpu.packed import DIRECT_ROWS
from ..model import KVCache

ALIGN = 64  # tokens per reusable block; a multiple of every block size the prompt path uses (16, AMX's 32)


class PrefixCache:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: collections.OrderedDict[tuple[int, ...], KVCache] = collections.OrderedDict()  # LRU order
        self.nbytes = 0
        self.hits = 0
        self.reused_tokens = 0

    @staticmethod
    def size(cache: KVCache) -> int:
        return sum(layer.k.nbytes + layer.v.nbytes for layer in cache.layers)

    def store(self, prompt: list[int], cache: KVCache, make_cache) -> None:
        """Keep the whole ALIGN-blocks of `prompt` from `cache` (a copy, sized to them)."""
        n = len(prompt) // ALIGN * ALIGN
        key = tuple(prompt[:n])
        if n == 0 or key in self.entries:
            if key in self.entries:
                self.entries.move_to_end(key)
            return
        kept = make_cache(n)
        for mine, theirs in zip(kept.layers, cache.layers, strict=True):
            mine.k.copy_(theirs.k[:, :, :n])
            mine.v.copy_(theirs.v[:, :, :n])
        nbytes = self.size(kept)
        if nbytes > self.budget:
            return
        while self.nbytes + nbytes > self.budget:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= self.size(old)
        self.entries[key] = kept
        self.nbytes += nbytes

    def lookup(self, prompt: list[int]) -> tuple[int, KVCache | None]:
        """(n, cache): the longest kept prefix of `prompt` in whole ALIGN-blocks that leaves more than
        DIRECT_ROWS tokens to prefill: a shorter last chunk would be computed by the few-rows kernels
        (or the one-token decode step), another arithmetic than the same rows inside the longer chunk
        a run without the cache reads them in. (0, None) if none."""
        best, found = 0, None
        for key, cache in self.entries.items():
            common = 0
            limit = min(len(key), len(prompt) - 1)
            while common < limit and key[common] == prompt[common]:
                common += 1
            n = common // ALIGN * ALIGN
            while n > 0 and len(prompt) - n <= DIRECT_ROWS:
                n -= ALIGN  # a chunk this short would take the few-rows product path, not the fresh run's
            if n > best:
                best, found = n, (key, cache)
        if found is None:
            return 0, None
        self.entries.move_to_end(found[0])
        self.hits += 1
        self.reused_tokens += best
        return best, found[1]


def copy_prefix(source: KVCache, target: KVCache, n: int) -> None:
    with torch.inference_mode():
        for mine, theirs in zip(target.layers, source.layers, strict=True):
            mine.k[:, :, :n].copy_(theirs.k[:, :, :n])
            mine.v[:, :, :n].copy_(theirs.v[:, :, :n])
