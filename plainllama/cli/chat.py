"""`plainllama chat`: an interactive conversation in the terminal.

Each turn re-encodes the whole conversation with the model's chat format and generates the answer.
When the conversation outgrows the model's context, the oldest turns are dropped (the system
prompt stays) and a notice says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sys

from ..chat_format import Message
from ..errors import PlainLlamaError
from ..sampling_settings import SamplingSettings
from ..server.scheduler import Job, Scheduler
from .options import SETTABLE, load_model, sampling_settings

HELP = "Type a message; /help lists the commands. Ctrl+C stops an answer, Ctrl+D or /bye ends the chat."
COMMANDS = """commands:
  /help                 this list
  /set                  show the sampling settings and the system prompt
  /set NAME VALUE       change a setting: temperature, top_k, top_p, min_p, typical_p, repetition_penalty,
                        frequency_penalty, presence_penalty, seed; or `/set system TEXT`
  /save FILE, /load FILE  the conversation as JSON ([{"role": ..., "content": ...}, ...])
  /reset                clear the conversation
  /bye                  end (also Ctrl+D)
  \"\"\" ... \"\"\"         a message of several lines, between lines of three quotes"""
# Sampling when neither the command line nor the model's files say otherwise: greedy answers of small
# models repeat themselves ("strength and strength and ..."); these are the usual chat settings.
CHAT_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}


def fit_to_context(llm, history: list[Message], answer_room: int) -> tuple[list[int], int]:
    """Token ids of the conversation with room for an answer; drops the oldest turns if needed.
    Returns (ids, number of messages dropped)."""
    limit = llm.args.context_length - answer_room
    dropped = 0
    while True:
        ids = llm.encode_chat(history)
        if len(ids) <= limit:
            return ids, dropped
        first = 1 if history and history[0].role == "system" else 0
        if len(history) - first <= 1:  # only the newest message is left, and it alone is too long
            raise PlainLlamaError(
                f"this message needs {len(ids)} tokens; with room for the answer, the context holds {limit}"
            )
        del history[first]
        dropped += 1
        if len(history) > first and history[first].role == "assistant":  # keep turns whole
            del history[first]
            dropped += 1


def model_name(llm) -> str:
    return name_of(llm.checkpoint.path)


def name_of(path: str) -> str:
    """A name people recognise for a model: the file's name without extension, or the folder's."""
    path = path.rstrip(os.sep)
    return os.path.splitext(os.path.basename(path))[0] if os.path.isfile(path) else os.path.basename(path)


def read_message(interactive: bool) -> str:
    """One message: a line, or the lines between two lines of three quotes (as in Ollama)."""
    prompt = ">>> " if interactive else ""
    line = input(prompt)
    if not line.strip().startswith('"""'):
        return line
    lines, rest = [], line.strip()[3:]
    while not rest.rstrip().endswith('"""'):
        lines.append(rest)
        rest = input("... " if interactive else "")
    lines.append(rest.rstrip()[:-3])
    return "\n".join(lines).strip("\n")


def set_setting(sampling: dict, words: list[str], history: list[Message]) -> str:
    """/set NAME VALUE; returns what to show."""
    if not words:
        system = history[0].content if history and history[0].role == "system" else None
        return (
            ", ".join(f"{k} {v}" for k, v in sampling.items() if v not in (None, {})) + f"; system prompt: {system!r}"
        )
    name, value = words[0].replace("-", "_"), " ".join(words[1:])
    if name == "system":
        if history and history[0].role == "system":
            history.pop(0)
        if value:
            history.insert(0, Message("system", value))
        return f"system prompt: {value!r}"
    if name not in SETTABLE or not value:
        raise PlainLlamaError(
            f"/set {' '.join(words)}: expected /set NAME VALUE with NAME one of {', '.join(SETTABLE)}, or system"
        )
    try:
        parsed = int(value) if name in ("top_k", "seed") else float(value)
    except ValueError:
        raise PlainLlamaError(f"/set {name}: {value!r} is not a number") from None
    SamplingSettings(**{**sampling, name: parsed}).check()
    sampling[name] = parsed
    return f"{name} {parsed}"


def save(history: list[Message], path: str) -> str:
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump([{"role": m.role, "content": m.content} for m in history], f, ensure_ascii=False, indent=1)
    except OSError as e:
        raise PlainLlamaError(f"/save {path}: {e.strerror}") from None
    return f"saved {len(history)} messages to {path}"


def load(path: str) -> list[Message]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlainLlamaError(f"/load {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(data, list) or not all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
        for m in data
    ):
        raise PlainLlamaError(f'/load {path}: expected a list of {{"role": system|user|assistant, "content": text}}')
    return [Message(m["role"], m["content"]) for m in data]


def command(line: str, sampling: dict, history: list[Message], base: list[Message]) -> tuple[str, list[Message]]:
    """A /command: (what to show, the history after it)."""
    words = line.split()
    name = words[0]
    if name == "/help":
        return COMMANDS, history
    if name == "/reset":
        return "(conversation cleared)", list(base)
    if name == "/set":
        return set_setting(sampling, words[1:], history), history
    if name in ("/save", "/load") and len(words) == 2:
        return (save(history, words[1]), history) if name == "/save" else ("(conversation loaded)", load(words[1]))
    raise PlainLlamaError(f"{line}: unknown command; /help lists them")


def run_chat(llm, system: str | None, max_new_tokens: int, sampling: dict, stop=()) -> int:
    _ = llm.chat_format  # fail now, not after the first message, if the model has no chat format
    base = [Message("system", system)] if system else []
    history = list(base)
    answer_room = min(max_new_tokens, llm.args.context_length // 2)
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # line editing and history for input(), where Python has it
            import readline  # noqa: F401
    print(f"plainllama chat: {model_name(llm)} ({llm.chat_format.name} chat format). {HELP}", file=sys.stderr)
    # The server's engine, for one conversation: its prefix cache keeps the history's keys and values,
    # so that each turn prefills only what is new since the previous prompt.
    engine = Scheduler(llm, max_batch=1)  # its prefix cache: the one context's worth load_model planned
    engine.start()
    try:
        return converse(llm, engine, history, base, interactive, answer_room, max_new_tokens, sampling, stop)
    finally:
        engine.stop()  # its thread ends before the interpreter does (a thread inside PyTorch at exit aborts)


def converse(llm, engine, history, base, interactive, answer_room, max_new_tokens, sampling, stop) -> int:
    while True:
        try:
            line = read_message(interactive)
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        text = line.strip()
        if text in ("/bye", "/exit", "/quit"):
            return 0
        if not text:
            continue
        if text.startswith("/"):
            try:
                shown, history = command(text, sampling, history, base)
                print(shown, file=sys.stderr)
            except PlainLlamaError as e:
                print(f"({e})", file=sys.stderr)
            continue
        history.append(Message("user", line))
        try:
            ids, dropped = fit_to_context(llm, history, answer_room)
        except PlainLlamaError as e:
            history.pop()
            print(f"(not sent: {e})", file=sys.stderr)
            continue
        if dropped:
            print(
                f"(the conversation outgrew the context: the {dropped} oldest messages were dropped)", file=sys.stderr
            )
        pieces = []
        try:
            for piece in answer(engine, ids, max_new_tokens, stop, sampling):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append(Message("assistant", "".join(pieces)))


def answer(engine: Scheduler, ids: list[int], max_new_tokens: int, stop, sampling: dict):
    """The answer's text as it comes, from the engine (Ctrl+C, or any exit, cancels it)."""
    llm = engine.llm
    settings = llm.sampling_settings(sampling)
    llm._check_request(1, len(ids) + max_new_tokens)
    events: queue.Queue = queue.Queue()
    job = Job(ids, max_new_tokens, settings, events.put, list(stop or ()))
    engine.submit(job)
    try:
        while True:
            event = events.get()
            if event.error:
                raise PlainLlamaError(event.error)
            if event.text:
                yield event.text
            if event.finish_reason:
                return
    finally:
        job.cancelled.set()


def chat_sampling(llm, given: dict) -> dict:
    """The command line's settings, over the model's own (generation_config.json), over CHAT_DEFAULTS."""
    sampling = {**CHAT_DEFAULTS, **llm.checkpoint.sampling, **{k: v for k, v in given.items() if v is not None}}
    return {k: v for k, v in sampling.items() if v is not None}


def run_command(args) -> int:
    llm = load_model(args, prefix_cache="context")
    if llm.ranks is not None and not llm.ranks.leader:  # rank 0 talks to the user; this rank steps with it
        Scheduler(llm, max_batch=1).follow()
        return 0
    return run_chat(llm, args.system, args.max_new_tokens, chat_sampling(llm, sampling_settings(args)), args.stop)
