"""`plainllama chat`: an interactive conversation in the terminal.

Each turn re-encodes the whole conversation with the model's chat format and generates the answer.
When the conversation outgrows the model's context, the oldest turns are dropped (the system
prompt stays) and a notice says so.
"""

from __future__ import annotations

import sys

from ..chat_format import Message
from ..errors import PlainLlamaError
from .options import load_model, sampling_settings

HELP = "Type a message. /reset clears the conversation, /bye or Ctrl+D ends it, Ctrl+C stops an answer."


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


def run_chat(llm, system: str | None, max_new_tokens: int, sampling: dict, stop=()) -> int:
    _ = llm.chat_format  # fail now, not after the first message, if the model has no chat format
    base = [Message("system", system)] if system else []
    history = list(base)
    answer_room = min(max_new_tokens, llm.args.context_length // 2)
    print(
        f"plainllama chat: {llm.checkpoint.name or llm.checkpoint.path} ({llm.chat_format.name} chat format). {HELP}",
        file=sys.stderr,
    )
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        command = line.strip()
        if command in ("/bye", "/exit", "/quit"):
            return 0
        if command == "/reset":
            history = list(base)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not command:
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
            for piece in llm.stream(ids, max_new_tokens=max_new_tokens, stop=stop, **sampling):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append(Message("assistant", "".join(pieces)))


def run_command(args) -> int:
    llm = load_model(args)
    return run_chat(llm, args.system, args.max_new_tokens, sampling_settings(args), args.stop)
