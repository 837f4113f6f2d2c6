"""The HTTP side of `plainllama serve` (Starlette routes on uvicorn).

    POST /v1/chat/completions, POST /v1/completions   JSON, or server-sent events with "stream": true
    GET  /v1/models, /health (503 until the model is loaded), /metrics (Prometheus)

The model runs on the scheduler's own thread, so the event loop never waits on a forward pass: a
request is checked (requests.py), becomes one Job per choice, and its events come back through an
asyncio queue that the engine thread fills with call_soon_threadsafe. A client that goes away
(a closed stream, or a dropped connection while waiting for a whole answer) cancels its jobs, which
the scheduler drops at its next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import PlainLlamaError
from .metrics import Metrics
from .requests import Parsed, RequestError, parse
from .responses import OPENAI_FINISH, chat_logprobs, completion_logprobs, error, head, new_id, usage
from .scheduler import Event, Job, QueueFull, Scheduler

log = logging.getLogger("plainllama")
RETRY_SECONDS = 2
DISCONNECT_POLL_SECONDS = 0.5


class Server:
    """The model (loaded on a thread of its own once the port is open) and its scheduler."""

    def __init__(self, load: Callable, served_name: str, max_batch: int, max_queue: int, prefix_cache_bytes: int):
        self.load, self.served_name = load, served_name
        self.max_batch, self.max_queue, self.prefix_cache_bytes = max_batch, max_queue, prefix_cache_bytes
        self.llm = None
        self.scheduler: Scheduler | None = None
        self.metrics = Metrics()
        self.created = int(time.time())
        self.on_load_failure: Callable[[str], None] = lambda message: None

    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="plainllama-load", daemon=True).start()

    def _load(self) -> None:
        try:
            llm = self.load()
        except PlainLlamaError as e:
            self.on_load_failure(str(e))
            return
        scheduler = Scheduler(llm, self.max_batch, self.max_queue, prefix_cache_bytes=self.prefix_cache_bytes)
        scheduler.start()
        self.llm, self.scheduler = llm, scheduler

    def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop(timeout=10)

    def drain(self, grace: float) -> None:
        """Shutting down: what runs may finish within `grace` seconds; then everything still running
        is cancelled, each client told so, before the HTTP server closes the connections."""
        timer = threading.Timer(grace, self.stop)
        timer.daemon = True
        timer.start()


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    kind = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
            429: "rate_limit_error", 503: "server_error"}.get(status, "server_error")  # fmt: skip
    return JSONResponse(error(message, kind, param, code), status_code=status, headers=headers)


def busy(message: str) -> JSONResponse:
    return error_response(503, message, None, "unavailable", {"Retry-After": str(RETRY_SECONDS)})


async def chat_completions(request: Request) -> Response:
    return await answer(request, chat=True)


async def completions(request: Request) -> Response:
    return await answer(request, chat=False)


async def answer(request: Request, chat: bool) -> Response:
    server: Server = request.app.state.server
    endpoint = request.url.path
    response = await _answer(request, server, chat)
    server.metrics.count(endpoint, response.status_code)
    return response


async def _answer(request: Request, server: Server, chat: bool) -> Response:
    if server.scheduler is None:
        return busy("the model is still loading")
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return error_response(400, f"the request body is not valid JSON ({e})", None, "invalid_json")
    try:
        parsed = parse(body, chat, server.llm, server.served_name)
    except RequestError as e:
        return error_response(e.status, e.message, e.param, e.code)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    jobs = []
    for p, prompt in enumerate(parsed.prompts):
        for k in range(parsed.n):
            seed = parsed.settings.seed
            settings = dataclasses.replace(parsed.settings, seed=None if seed is None else (seed + k) % (1 << 64))
            index = p * parsed.n + k

            def emit(event: Event, index=index) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (index, event))

            jobs.append(Job(prompt, parsed.max_tokens, settings, emit, parsed.stop, parsed.logprobs))
    try:
        for job in jobs:
            server.scheduler.submit(job)
    except QueueFull as e:
        for job in jobs:
            job.cancelled.set()
        return error_response(429, f"too many requests waiting ({e}); retry shortly", None, "queue_full",
                              {"Retry-After": str(RETRY_SECONDS)})  # fmt: skip
    shape = Shape(chat, parsed, server.served_name, server.scheduler.tokenizer)
    if parsed.stream:
        return StreamingResponse(stream_events(shape, queue, jobs), media_type="text/event-stream")
    return await whole_answer(request, shape, queue, jobs)


class Shape:
    """How this request's answer is written: chat or completion, its id, model and choices."""

    def __init__(self, chat: bool, parsed: Parsed, model: str, tokenizer):
        self.chat, self.parsed, self.model, self.tokenizer = chat, parsed, model, tokenizer
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.prompt_tokens = sum(len(p) for p in parsed.prompts)
        self.cached_tokens: dict[int, int] = {}  # prompt -> its tokens read from the prefix cache (by any choice)

    def cached(self, index: int, tokens: int) -> None:
        prompt = index // self.parsed.n
        self.cached_tokens[prompt] = max(tokens, self.cached_tokens.get(prompt, 0))

    def usage(self, completion_tokens: int) -> dict:
        return usage(self.prompt_tokens, completion_tokens, sum(self.cached_tokens.values()))

    def head(self, streamed: bool) -> dict:
        kind = ("chat.completion" + (".chunk" if streamed else "")) if self.chat else "text_completion"
        return head(self.id, kind, self.model)

    def logprobs(self, entries, offset=0):
        if self.parsed.logprobs is None:
            return None
        if self.chat:
            return chat_logprobs(self.tokenizer, entries)
        return completion_logprobs(self.tokenizer, entries, offset)


async def whole_answer(request: Request, shape: Shape, queue: asyncio.Queue, jobs: list[Job]) -> Response:
    n = len(jobs)
    texts: list[list[str]] = [[] for _ in range(n)]
    entries: list[list] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    completion_tokens = 0
    try:
        while any(f is None for f in finish):
            try:
                index, event = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_SECONDS)
            except TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody is listening; the jobs are cancelled below
                continue
            if event.error:
                return error_response(503, event.error, None, "engine_error")
            texts[index].append(event.text)
            if event.logprob is not None:
                entries[index].append(event.logprob)
            if event.finish_reason:
                finish[index] = OPENAI_FINISH[event.finish_reason]
                completion_tokens += event.completion_tokens
                shape.cached(index, event.cached_tokens)
    finally:
        for job in jobs:
            job.cancelled.set()
    choices = []
    for i in range(n):
        text = "".join(texts[i])
        if shape.chat:
            message = {"role": "assistant", "content": text, "refusal": None}
            choice = {
                "index": i,
                "message": message,
                "logprobs": shape.logprobs(entries[i]),
                "finish_reason": finish[i],
            }
        else:
            choice = {"index": i, "text": text, "logprobs": shape.logprobs(entries[i]), "finish_reason": finish[i]}
        choices.append(choice)
    return JSONResponse({**shape.head(False), "choices": choices, "usage": shape.usage(completion_tokens)})


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def stream_events(shape: Shape, queue: asyncio.Queue, jobs: list[Job]):
    n = len(jobs)
    finished = 0
    completion_tokens = 0
    offsets = [0] * n
    try:
        if shape.chat:
            for i in range(n):
                delta = {"role": "assistant", "content": "", "refusal": None}
                yield sse({**shape.head(True), "choices": [{"index": i, "delta": delta, "logprobs": None,
                                                             "finish_reason": None}]})  # fmt: skip
        while finished < n:
            index, event = await queue.get()
            if event.error:
                yield sse(error(event.error, "server_error", None, "engine_error"))
                return
            logprobs = shape.logprobs([event.logprob], offsets[index]) if event.logprob is not None else None
            if event.text or logprobs is not None:
                piece = {"content": event.text} if shape.chat else None
                choice = {"index": index, "delta": piece} if shape.chat else {"index": index, "text": event.text}
                yield sse({**shape.head(True), "choices": [{**choice, "logprobs": logprobs, "finish_reason": None}]})
                offsets[index] += len(event.text)
            if event.finish_reason:
                finished += 1
                completion_tokens += event.completion_tokens
                shape.cached(index, event.cached_tokens)
                reason = OPENAI_FINISH[event.finish_reason]
                choice = {"index": index, "delta": {}} if shape.chat else {"index": index, "text": ""}
                yield sse({**shape.head(True), "choices": [{**choice, "logprobs": None, "finish_reason": reason}]})
        if shape.parsed.include_usage:
            yield sse({**shape.head(True), "choices": [], "usage": shape.usage(completion_tokens)})
        yield sse("[DONE]")
    finally:  # also when the client went away: Starlette cancels this generator then
        for job in jobs:
            job.cancelled.set()


async def models(request: Request) -> Response:
    server: Server = request.app.state.server
    entry = {"id": server.served_name, "object": "model", "created": server.created, "owned_by": "plainllama"}
    if "model" in request.path_params:
        if request.path_params["model"] != server.served_name:
            return error_response(404, f"The model '{request.path_params['model']}' does not exist", "model",
                                  "model_not_found")  # fmt: skip
        return JSONResponse(entry)
    return JSONResponse({"object": "list", "data": [entry]})


async def health(request: Request) -> Response:
    server: Server = request.app.state.server
    if server.scheduler is None:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": str(RETRY_SECONDS)})
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    server: Server = request.app.state.server
    return PlainTextResponse(server.metrics.text(server.scheduler), media_type="text/plain; version=0.0.4")


async def http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods, in OpenAI's error shape."""
    assert isinstance(exc, HTTPException)
    message = "Unknown request URL: " + request.method + " " + request.url.path
    if exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    return error_response(exc.status_code, message, None, "unknown_url" if exc.status_code == 404 else None)


def build_app(server: Server) -> Starlette:
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.start_loading()
        yield
        server.stop()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.server = server
    return app
