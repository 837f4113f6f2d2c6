"""`plainllama serve`: load once, answer OpenAI's API (server/)."""

from __future__ import annotations

import contextlib
import os
import sys

from ..default_model import default_model_path
from ..engine.planner import parse_size
from ..errors import PlainLlamaError
from .chat import name_of
from .options import load_model


def run_command(args) -> int:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that after a graceful shutdown on SIGINT or SIGTERM it does not raise
        the signal again (which would end the process with the signal's status): a stop is a normal exit."""

        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                server.drain(args.grace)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:
                    self._captured_signals.clear()

    from ..server.app import Server as ModelServer, build_app

    for name in ("max_batch", "max_queue"):
        if getattr(args, name) < 1:
            raise PlainLlamaError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.port < 65536:
        raise PlainLlamaError(f"--port must be between 0 and 65535, got {args.port}")
    path = args.model or default_model_path()
    if not os.path.exists(path):
        raise PlainLlamaError(f"{path}: no such file or folder")
    name = args.served_model_name or name_of(path)

    prefix_bytes = 0 if args.prefix_cache in ("0", "off") else parse_size(args.prefix_cache)

    if os.environ.get("RANK", "0") != "0":  # a tensor-parallel rank: rank 0 serves, this one steps with it
        from ..server.scheduler import Scheduler

        llm = load_model(args, path, prefix_cache=prefix_bytes)
        Scheduler(llm, args.max_batch, args.max_queue, prefix_cache_bytes=prefix_bytes).follow()
        return 0

    def load():
        llm = load_model(args, path, prefix_cache=prefix_bytes)
        print(f"plainllama: {name} loaded ({llm.compute}); answering requests", file=sys.stderr)
        return llm

    server = ModelServer(load, name, args.max_batch, args.max_queue, prefix_bytes)
    config = uvicorn.Config(
        build_app(server),
        host=args.host,
        port=args.port,
        timeout_graceful_shutdown=args.grace + 5,  # a backstop: drain() ends every response at args.grace
        log_level="info",
        access_log=False,
    )
    web = Server(config)
    failure = []

    def load_failed(message: str) -> None:
        failure.append(message)
        web.should_exit = True

    server.on_load_failure = load_failed
    print(f"plainllama: serving {name} on http://{args.host}:{args.port}/v1 (loading the model)", file=sys.stderr)
    web.run()
    if failure:
        raise PlainLlamaError(failure[0])
    return 0 if web.started else 1
