"""Beam search: keep the N most likely continuations instead of one.

The prompt is run once; its keys and values are copied into N cache rows, one per beam. At each
step every beam proposes every token, scored by the beam's summed log-probability plus the token's;
the best 2N candidates are kept (a spare for each beam that just ended), candidates that end (an end
token, or the length limit) become finished hypotheses scored by sum / length**length_penalty, and
the best N unfinished ones continue. The cache rows are reordered in place to follow their beams.

The rules (which candidates may finish, when to stop early) are those of Hugging Face transformers'
`generate(num_beams=...)`, so the two give the same sequences and scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PlainLlamaError
from .generate import check_prompt, device_and_dtype
from ..model import KVCache, Transformer

NEG = -1.0e9


@dataclass
class Beam:
    tokens: list[int]  # generated ids, the end token included if the beam ended with one
    score: float  # summed log-probability / (generated length ** length_penalty)


def banned_by_ngrams(sequence: list[int], n: int) -> set[int]:
    """Tokens that would repeat an n-gram already in `sequence` (no_repeat_ngram_size)."""
    if n <= 0 or len(sequence) + 1 < n:
        return set()
    prefix = tuple(sequence[len(sequence) - n + 1 :]) if n > 1 else ()
    return {sequence[i + n - 1] for i in range(len(sequence) - n + 1) if tuple(sequence[i : i + n - 1]) == prefix}


def check_options(num_beams: int, num_return: int, early_stopping) -> None:
    if num_beams < 1:
        raise PlainLlamaError(f"--beams must be >= 1, got {num_beams}")
    if not 1 <= num_return <= num_beams:
        raise PlainLlamaError(f"--num-return must be between 1 and --beams ({num_beams}), got {num_return}")
    if early_stopping not in (True, False, "never"):
        raise PlainLlamaError(f"--early-stopping must be true, false or never, got {early_stopping!r}")


def ban_repeated_ngrams(logp: torch.Tensor, running: list[list[int]], n: int) -> None:
    """Set to -inf, in each beam's row of logp [N, V], the tokens that would repeat one of its n-grams."""
    for b, seq in enumerate(running):
        banned = banned_by_ngrams(seq, n)
        if banned:
            logp[b, list(banned)] = float("-inf")


def end_by_stop_strings(ends, top_scores, running, from_beam, token, prompt_len: int, stopped) -> None:
    """Mark as ending the candidates (not ended already, and not impossible) whose generated tokens
    `stopped` holds for."""
    for j in range(len(ends)):
        if not ends[j] and top_scores[j] > NEG / 2:
            ends[j] = stopped(running[from_beam[j]][prompt_len:] + [int(token[j])])


def beam_search(
    model: Transformer,
    prompt_ids: list[int],
    num_beams: int,
    max_new_tokens: int,
    end_ids,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    no_repeat_ngram_size: int = 0,
    num_return: int = 1,
    stopped=None,
) -> list[Beam]:
    """`stopped(generated tokens) -> bool`: an extra end test (stop strings); a candidate it holds
    for ends as if with an end token."""
    check_options(num_beams, num_return, early_stopping)
    check_prompt(prompt_ids, model.args.context_length)
    prompt_len = len(prompt_ids)
    max_len = prompt_len + min(max_new_tokens, model.args.context_length - prompt_len)
    if max_len == prompt_len:
        raise PlainLlamaError("no room to generate: --max-new-tokens is 0 or the prompt fills the context")
    device, dtype = device_and_dtype(model)
    end = torch.tensor(sorted(end_ids), dtype=torch.long)
    keep = max(2, 1 + len(end)) * num_beams  # candidates per step: spares for beams that end
    cache = KVCache(model.args, num_beams, max_len, dtype, device)

    running = [list(prompt_ids) for _ in range(num_beams)]
    running_scores = torch.full((num_beams,), NEG)
    running_scores[0] = 0.0  # all beams start identical: only the first may expand at step one
    finished: list[tuple[float, list[int]]] = []  # (score, full sequence), best num_beams kept
    improvable = True
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids], device=device), 0, cache, last_only=True)[:, -1]  # [1, V]
        for layer in cache.layers:  # the prompt's keys and values, shared by every beam
            layer.k[1:, :, :prompt_len] = layer.k[:1, :, :prompt_len]
            layer.v[1:, :, :prompt_len] = layer.v[:1, :, :prompt_len]
        logits = logits.expand(num_beams, -1)
        cur = prompt_len
        while True:
            logp = logits.float().cpu().log_softmax(-1)  # [N, V]
            if no_repeat_ngram_size:
                ban_repeated_ngrams(logp, running, no_repeat_ngram_size)
            vocab = logp.shape[-1]
            total = (logp + running_scores[:, None]).reshape(-1)
            top_scores, top_index = torch.topk(total, keep)
            from_beam, token = top_index // vocab, top_index % vocab
            ends = torch.isin(token, end) | (cur + 1 >= max_len)  # an end token, or the length limit
            if stopped is not None:
                end_by_stop_strings(ends, top_scores, running, from_beam, token, prompt_len, stopped)

            # Candidates that end, among the best num_beams only, join the finished hypotheses.
            if improvable and not (early_stopping is True and len(finished) == num_beams):
                for j in range(num_beams):
                    if ends[j] and top_scores[j] > NEG / 2:
                        score = float(top_scores[j]) / ((cur + 1 - prompt_len) ** length_penalty)
                        finished.append((score, running[from_beam[j]] + [int(token[j])]))
                finished.sort(key=lambda f: -f[0])
                del finished[num_beams:]

            # The best num_beams candidates that do not end continue.
            alive = top_scores + ends.float() * NEG
            best = torch.topk(alive, num_beams).indices
            running_scores = alive[best]
            parents = from_beam[best]
            running = [running[p] + [int(t)] for p, t in zip(parents.tolist(), token[best].tolist(), strict=True)]
            cur += 1
            for layer in cache.layers:  # each beam's cache row now follows its parent
                layer.k[:, :, :cur] = layer.k[parents.to(device), :, :cur]
                layer.v[:, :, :cur] = layer.v[parents.to(device), :, :cur]

            # Stop when no running beam can beat the worst finished one (transformers' heuristic).
            if len(finished) == num_beams:
                if early_stopping == "never" and length_penalty > 0:
                    best_length = max_len - prompt_len
                else:
                    best_length = cur - prompt_len
                improvable = improvable and float(running_scores[0]) / (best_length**length_penalty) > finished[-1][0]
            done = (
                not improvable
                or (early_stopping is True and len(finished) == num_beams)
                or bool(ends.all())
                or cur >= max_len
            )
            if done:
                break
            step = torch.tensor([[t[-1]] for t in running], device=device)
            logits = model(step, cur - 1, cache, last_only=True)[:, -1]
    return [Beam(seq[prompt_len:], score) for score, seq in finished[:num_return]]
