"""One prompt's generation as a stream of text: tokens from the loop (generate.py, or speculative.py
with a draft model) become text as it is produced, stop strings matched across token boundaries."""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterator

from ..model import Transformer
from ..sampling import Sampler
from ..tokenizer import Tokenizer
from .generate import GenerationState, Timings, TokenLogprob, generate_tokens
from .speculative import speculative_tokens
from .stops import StopMatcher


@dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int]  # generated ids, end token excluded
    text: str  # the generated text (the continuation only; a stop string and what follows removed)
    finish_reason: str  # "stop", "length" or "context"
    timings: Timings
    logprobs: list[TokenLogprob] | None = None  # with logprobs=N: per generated token
    draft_acceptance: float | None = None  # with a draft model: accepted / proposed


class GenerationStream:
    """Iterate for text pieces as they are produced; `.result` holds the Generation afterwards.

    Stop strings are matched across token boundaries: text that could be the start of one is held
    back until the next tokens show whether it is, so a stop string never reaches the output."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampler: Sampler,
        stop=(),
        logprobs: int | None = None,
        draft: Transformer | None = None,
        speculate_k: int = 4,
    ):
        self._tokenizer, self._prompt_ids = tokenizer, prompt_ids
        self._state = GenerationState()
        self._stops = StopMatcher(stop)
        self._logprobs = logprobs
        end_ids = tokenizer.end_ids
        if draft is None:
            self._token_iter = generate_tokens(
                model, prompt_ids, max_new_tokens, sampler, end_ids, self._state, logprobs
            )
        else:
            self._token_iter = speculative_tokens(
                model, draft, prompt_ids, max_new_tokens, sampler, speculate_k, end_ids, self._state, logprobs
            )
        self._draft = draft
        self._pieces: list[str] = []
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        text = StreamedText(self._tokenizer, self._stops)
        for token_id in self._token_iter:
            piece = text.push(token_id)
            if piece:
                self._pieces.append(piece)
                yield piece
            if text.stopped:
                break
        piece = text.finish()
        if piece:
            self._pieces.append(piece)
            yield piece
        s = self._state
        if text.stopped:
            s.finish_reason = "stop"
            self._token_iter.close()
        assert s.finish_reason is not None  # the loop sets it when it ends
        acceptance = s.draft_accepted / s.draft_proposed if self._draft is not None and s.draft_proposed else None
        self.result = Generation(
            self._prompt_ids,
            s.tokens,
            "".join(self._pieces),
            s.finish_reason,
            s.timings,
            s.logprobs if self._logprobs is not None else None,
            acceptance,
        )


class StreamedText:
    """Token ids in, text out once it is final: the text a stop string starts ends everything, and
    text that could be the beginning of one is held back until the next tokens show whether it is.
    Pushed one token at a time by GenerationStream, and by the server for each of its requests."""

    def __init__(self, tokenizer: Tokenizer, stops: StopMatcher):
        self._decoder = tokenizer.stream()
        self._stops = stops
        self._pending = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        self._pending += self._decoder.push(token_id)
        at = self._stops.find(self._pending)
        if at is not None:
            self.stopped = True
            ready, self._pending = self._pending[:at], ""
            return ready
        cut = len(self._pending) - self._stops.held_back(self._pending)
        ready, self._pending = self._pending[:cut], self._pending[cut:]
        return ready

    def finish(self) -> str:
        """What is held back, once no more tokens come (nothing if a stop string ended the text)."""
        if self.stopped:
            return ""
        rest, self._pending = self._pending + self._decoder.flush(), ""
        return rest
