"""The server's engine: one thread that runs the model for every request at once (continuous batching).

Each step of the loop:
1. admits waiting jobs while fewer than `max_batch` run (each gets its own KV cache, sized to its
   prompt and its token budget);
2. prefills one chunk (at most `prefill_chunk` tokens) of one job whose prompt is not yet in its
   cache, oldest first. A long prompt is taken in chunks so that the streams already running wait
   for at most one chunk between their tokens, not for a whole 4000-token prompt; 256 tokens is about
   as long as one decode step of 16 rows takes on the default model, so a new prompt costs the
   running streams at most about half their speed while it is read;
3. decodes one token for every job past its prompt, all in one pass over the weights
   (engine/continuous.py), then samples each job's token with its own sampler, seed, stop strings
   and budget.
Jobs join and leave between steps. A job whose client went away is dropped at the next step and its
cache freed.

Under tensor parallelism (parallel/) every rank runs this engine in step: rank 0's decides (which
jobs join, which were cancelled, when to stop) and broadcasts its decisions before each step; the
other ranks `follow()` them with the same jobs, caches and prefix cache, so that every forward pass
is entered by all ranks together. Rank 0 draws every token and broadcasts it (LeaderSampler).

A job's arithmetic is its own: its prompt is prefilled alone, chunked at the same positions
whatever else runs, and its decode rows are computed row by row (continuous.py), so its tokens do
not depend on the other jobs. Events go back to the HTTP side through each job's `emit`, which
must be safe to call from this thread (app.py hands them to the event loop).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..engine.continuous import (
    SequenceCache,
    can_prefill_together,
    prefill_rows,
    rows_can_step,
    step_alone,
    step_rows,
)
from ..errors import PlainLlamaError
from ..generation.generate import TokenLogprob, device_and_dtype, record_logprob, GenerationState
from ..generation.stops import StopMatcher
from ..generation.stream import StreamedText
from ..model import KVCache
from .prefix_cache import PrefixCache, copy_prefix
from ..sampling import Sampler, SamplingSettings

log = logging.getLogger("plainllama")

HEARTBEAT_SECONDS = 5.0  # an idle rank 0 tells the other ranks it is still there, well within their deadline
PREFILL_CHUNK = 256  # a multiple of prefix_cache.ALIGN: chunks end on whole blocks
GROWTH = 256  # positions a cache gains at first beyond the prompt; it doubles when full


@dataclass
class Event:
    """What a job produced in one step: text (possibly empty while a stop string may be starting),
    the token, and at the end the finish reason and token counts."""

    text: str = ""
    token: int | None = None
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # "stop", "length" (its max_tokens) or "context" (the model's limit)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    error: str | None = None


@dataclass
class Job:
    """One sequence to generate (one choice of one request)."""

    prompt_ids: list[int]
    max_tokens: int
    settings: SamplingSettings
    emit: Callable[[Event], None]
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # record this many alternatives per token (None: no log-probabilities)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


class QueueFull(Exception):
    pass


class Running:
    """A job in the engine: its cache, sampler, text and where it is."""

    def __init__(self, job: Job, scheduler: Scheduler):
        args = scheduler.model.args
        self.job, self.scheduler = job, scheduler
        self.budget = min(job.max_tokens, args.context_length - len(job.prompt_ids))
        self.length = len(job.prompt_ids) + max(self.budget, 1)  # the positions this job can reach
        # The cache starts with room for the prompt and a first stretch of tokens and grows as they come:
        # a chat's default budget is the rest of the context, and most answers are far shorter.
        self.cache = scheduler.new_cache(min(self.length, len(job.prompt_ids) + GROWTH))
        self.prefilled, reused = 0, None  # prompt tokens in the cache
        if scheduler.prefix_cache is not None:
            self.prefilled, reused = scheduler.prefix_cache.lookup(job.prompt_ids)
        if reused is not None:
            copy_prefix(reused, self.cache, self.prefilled)
        self.cached_tokens = self.prefilled
        self.sampler = Sampler(job.settings)
        if scheduler.ranks is not None:
            from ..parallel.ranks import LeaderSampler

            self.sampler = LeaderSampler(self.sampler, scheduler.ranks)
        self.text = StreamedText(scheduler.tokenizer, StopMatcher(job.stop))
        self.state = GenerationState()
        self.next_token = -1  # the last sampled token, fed at the next decode step
        self.finished = False

    @property
    def decoding(self) -> bool:
        return not self.finished and self.prefilled == len(self.job.prompt_ids)

    @property
    def position(self) -> int:
        return len(self.job.prompt_ids) + len(self.state.tokens) - 1

    def make_room(self) -> None:
        """Before a decode step: a cache that is full grows (doubles, up to what the job can reach)."""
        if self.position < self.cache.length:
            return
        bigger = self.scheduler.new_cache(min(self.length, 2 * self.cache.length))
        copy_prefix(self.cache, bigger, self.cache.length)
        self.cache = bigger


class Scheduler:
    def __init__(
        self,
        llm,
        max_batch: int = 16,
        max_queue: int = 256,
        prefill_chunk: int = PREFILL_CHUNK,
        prefix_cache_bytes: int | None = None,
    ):
        """`prefix_cache_bytes`: the prefix cache's budget (0: none); by default what the model's
        memory plan set aside for it (load(prefix_cache=...))."""
        self.llm, self.model, self.tokenizer = llm, llm.model, llm.tokenizer
        self.ranks = getattr(llm, "ranks", None)  # tensor-parallel ranks, or None
        if prefix_cache_bytes is None:
            plan = getattr(llm, "plan", None)
            prefix_cache_bytes = plan.prefix_cache if plan is not None else 0
        if self.ranks is not None:  # the same budget everywhere, or ranks would evict different prefixes
            from ..parallel.ranks import share_object

            prefix_cache_bytes = share_object(self.ranks, prefix_cache_bytes)
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.rows = rows_can_step(self.model)  # decode_rows in C; else each job through model.py alone
        self.end_ids = llm.tokenizer.end_ids
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Running] = []
        self.condition = threading.Condition()
        self.stopping = False
        self.broken: str | None = None  # under tensor parallelism: why the ranks can no longer step together
        self.thread = threading.Thread(target=self._loop, name="plainllama-engine", daemon=True)
        # for GET /metrics
        self.generated_tokens = 0
        self.prefilled_tokens = 0
        self.steps = 0
        self.last_batch = 0
        self.decode_seconds = 0.0

    def start(self) -> None:
        self.thread.start()

    def new_cache(self, length: int) -> KVCache:
        if self.rows:
            return SequenceCache(self.model, length)
        device, dtype = device_and_dtype(self.model)
        return KVCache(self.model.args, 1, length, dtype, device)

    def submit(self, job: Job) -> None:
        with self.condition:
            if self.stopping or self.broken:
                raise QueueFull(self.broken or "the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.append(job)
            self.condition.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Cancel what waits and what runs (each client gets an error event), and end the thread."""
        with self.condition:
            self.stopping = True
            self.condition.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.running)

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.waiting and not self.running and not self.stopping:
                    if not self.condition.wait(HEARTBEAT_SECONDS if self.ranks is not None else None):
                        break  # idle: rank 0 still tells the other ranks, which wait on its word
                stopping = self.stopping
                if stopping:  # every client is told, so that no response waits forever
                    for job in [*self.waiting, *(r.job for r in self.running)]:
                        job.emit(Event(error="the server is shutting down; the request was cancelled"))
                    self.waiting.clear()
                admitted: list[Job] = []
                while not stopping and self.waiting and len(self.running) + len(admitted) < self.max_batch:
                    job = self.waiting.popleft()
                    if not job.cancelled.is_set():
                        admitted.append(job)
            cancelled = [i for i, r in enumerate(self.running) if r.job.cancelled.is_set()]
            if self.ranks is not None:
                try:
                    self._tell_ranks(admitted, cancelled, stopping)
                except RuntimeError as e:
                    self._break(e, admitted)
                    return
            if stopping:
                self.running = []
                return
            for job in admitted:
                self._admit(job)
            self._step(cancelled)
            if self.broken:
                return

    def _tell_ranks(self, admitted: list[Job], cancelled: list[int], stopping: bool) -> None:
        """Rank 0's decisions for this step, to every other rank (what follow() receives)."""
        from ..parallel.ranks import share_object

        assert self.ranks is not None
        jobs = [(j.prompt_ids, j.max_tokens, j.settings, j.stop, j.logprobs) for j in admitted]
        share_object(self.ranks, (jobs, cancelled, stopping))

    def follow(self) -> None:
        """A rank other than 0: take rank 0's decisions and step with it, until it stops. Its clients
        are rank 0's; the jobs here only keep the caches and tokens in step."""
        import signal

        from ..parallel.ranks import share_object

        assert self.ranks is not None, "follow() is for tensor-parallel ranks other than 0"
        if threading.current_thread() is threading.main_thread():
            # Ctrl+C and SIGTERM (which torchrun sends every rank) are rank 0's to act on: it drains its
            # clients and then tells this rank to stop
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            jobs, cancelled, stopping = share_object(self.ranks, None)
            if stopping:
                return
            for prompt_ids, max_tokens, settings, stop, logprobs in jobs:
                self._admit(Job(prompt_ids, max_tokens, settings, lambda event: None, stop, logprobs))
            if self.running:
                self._step(cancelled)
            if self.broken:
                raise PlainLlamaError(self.broken)

    def _break(self, error: BaseException, admitted=()) -> None:
        """Under tensor parallelism a failed step cannot be skipped (the ranks would fall out of step):
        every job ends with the error, and no more are taken."""
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        self.broken = f"the tensor-parallel ranks can no longer run together ({reason}); restart the server"
        log.error("%s", self.broken)
        for job in [*admitted, *(r.job for r in self.running)]:
            job.emit(Event(error=self.broken))
        self.running = []

    def _admit(self, job: Job) -> None:
        try:
            self.running.append(Running(job, self))
        except (MemoryError, RuntimeError, PlainLlamaError) as e:  # torch reports a failed allocation as RuntimeError
            job.emit(Event(error=f"cannot start this request: {e}"))

    def _step(self, cancelled: list[int]) -> None:
        """One step; `cancelled`: indices into self.running of jobs whose clients went away."""
        for i in cancelled:
            self.running[i].finished = True
        self.running = [r for r in self.running if not r.finished]
        try:
            prefilling = [r for r in self.running if not r.decoding]
            if prefilling:
                self._prefill(prefilling)
            decoding = [r for r in self.running if r.decoding]
            if decoding:
                self._decode(decoding)
        except (RuntimeError, PlainLlamaError, MemoryError) as e:
            if self.ranks is not None:
                self._break(e)
                return
            log.exception("engine step failed")
            for running in self.running:
                running.job.emit(Event(error=f"generation failed: {e}"))
                running.finished = True
        self.running = [r for r in self.running if not r.finished]

    def _chunk(self, running: Running) -> tuple[int, int]:
        """The next chunk [start, end) of a job's prompt. Chunks end at multiples of prefill_chunk
        whatever the first one's start: with or without a reused prefix, the same rows are computed in
        the same blocks (see prefix_cache.py)."""
        start = running.prefilled
        return start, min(len(running.job.prompt_ids), (start // self.prefill_chunk + 1) * self.prefill_chunk)

    def _prefill(self, prefilling: list[Running]) -> None:
        """The oldest job's next chunk, and with it those of other new jobs that can share its pass
        (continuous.prefill_rows: chunks of more than 8 tokens, up to prefill_chunk tokens in all, so
        that the running streams still wait for at most about one chunk)."""
        for running in prefilling:
            if running.budget <= 0:
                self._finish(running, "length" if running.job.max_tokens == 0 else "context")
        prefilling = [r for r in prefilling if not r.finished]
        if not prefilling:
            return
        first = prefilling[0]
        start, end = self._chunk(first)
        if not (self.rows and can_prefill_together(end - start)):
            device = self.model.norm.weight.device
            with torch.inference_mode():
                tokens = torch.tensor([first.job.prompt_ids[start:end]], device=device)
                logits = self.model(tokens, start, first.cache, last_only=True)[0, -1]
            self._prefilled(first, end, logits)
            return
        together, spans, rows = [first], [(start, end)], end - start
        for running in prefilling[1:]:
            start, end = self._chunk(running)
            if can_prefill_together(end - start) and rows + end - start <= self.prefill_chunk:
                together.append(running)
                spans.append((start, end))
                rows += end - start
        logits = prefill_rows(
            self.model,
            [r.job.prompt_ids[s:e] for r, (s, e) in zip(together, spans, strict=True)],
            [s for s, _ in spans],
            [r.cache for r in together],
        )
        for running, (_, end), row in zip(together, spans, logits, strict=True):
            self._prefilled(running, end, row)

    def _prefilled(self, running: Running, end: int, logits: torch.Tensor) -> None:
        prompt = running.job.prompt_ids
        self.prefilled_tokens += end - running.prefilled
        running.prefilled = end
        if running.prefilled == len(prompt):
            if self.prefix_cache is not None:
                self.prefix_cache.store(prompt, running.cache, self.new_cache)
            self._take(running, logits)

    def _decode(self, decoding: list[Running]) -> None:
        start = time.perf_counter()
        for running in decoding:
            running.make_room()
        tokens, positions, caches = (
            [r.next_token for r in decoding],
            [r.position for r in decoding],
            [r.cache for r in decoding],
        )
        if self.rows:
            logits = step_rows(self.model, tokens, positions, caches)  # type: ignore[arg-type]  # SequenceCaches
        else:
            logits = step_alone(self.model, tokens, positions, caches)
        self.decode_seconds += time.perf_counter() - start
        self.steps += 1
        self.last_batch = len(decoding)
        for running, row in zip(decoding, logits, strict=True):
            self._take(running, row)

    def _take(self, running: Running, logits: torch.Tensor) -> None:
        """Sample the job's next token from `logits` [V] and tell the client."""
        job, state = running.job, running.state
        token = running.sampler(logits, job.prompt_ids + state.tokens, state.tokens)
        if token in self.end_ids:
            self._finish(running, "stop")
            return
        state.tokens.append(token)
        self.generated_tokens += 1
        logprob = None
        if job.logprobs is not None:
            record_logprob(state, logits, token, job.logprobs)
            logprob = state.logprobs[-1]
        job.emit(Event(text=running.text.push(token), token=token, logprob=logprob))
        if running.text.stopped:
            self._finish(running, "stop")
        elif len(state.tokens) >= running.budget:
            self._finish(running, "length" if running.budget == job.max_tokens else "context")
        else:
            running.next_token = token

    def _finish(self, running: Running, reason: str) -> None:
        running.finished = True
        running.job.emit(
            Event(
                text=running.text.finish(),
                finish_reason=reason,
                prompt_tokens=len(running.job.prompt_ids),
                completion_tokens=len(running.state.tokens),
                cached_tokens=running.cached_tokens,
            )
        )
