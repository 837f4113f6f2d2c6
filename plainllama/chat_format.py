"""Conversations -> token ids, in the format each model was trained on.

- Llama 3 (Meta): <|begin_of_text|> then, per message, <|start_header_id|>role<|end_header_id|>\\n\\n
  content <|eot_id|>, and an open assistant header to ask for the answer.
- Llama 2 (Meta): [INST] user [/INST] answer </s><s>[INST] ..., the system prompt wrapped in
  <<SYS>> ... <</SYS>> inside the first [INST].
- A Jinja chat template carried by the file (GGUF's tokenizer.chat_template, HF's
  tokenizer_config.json), rendered in jinja2's sandbox as transformers renders it.

User text is never turned into control tokens: a message containing "<|eot_id|>" is encoded as
those characters, so nobody can end a turn or forge a role by typing.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import datetime

from .errors import PlainLlamaError
from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Message:
    role: str
    content: str


def as_messages(messages) -> list[Message]:
    out = []
    for m in messages:
        role, content = (m.role, m.content) if isinstance(m, Message) else (m["role"], m["content"])
        if role not in ROLES:
            raise PlainLlamaError(f"unknown chat role {role!r} (expected one of {', '.join(ROLES)})")
        out.append(Message(role, content))
    return out


class Llama3Chat:
    name = "llama3"

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.special = tokenizer.control

    def encode(self, messages, add_generation_prompt: bool = True) -> list[int]:
        ids = [self.special["<|begin_of_text|>"]]
        for m in as_messages(messages):
            ids += self.header(m.role)
            ids += self.tok.encode(m.content, bos=False)  # plain text: never parsed for special tokens
            ids.append(self.special["<|eot_id|>"])
        if add_generation_prompt:
            ids += self.header("assistant")
        return ids

    def header(self, role: str) -> list[int]:
        return [
            self.special["<|start_header_id|>"],
            *self.tok.encode("ipython" if role == "tool" else role, bos=False),
            self.special["<|end_header_id|>"],
            *self.tok.encode("\n\n", bos=False),
        ]


class Llama2Chat:
    """Meta's Llama 2 chat_completion format (llama/generation.py)."""

    name = "llama2"

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer

    def encode(self, messages, add_generation_prompt: bool = True) -> list[int]:
        messages = as_messages(messages)
        if messages and messages[0].role == "system":
            if len(messages) < 2:
                raise PlainLlamaError("a Llama 2 conversation needs a user message after the system prompt")
            first = messages[1]
            messages = [Message(first.role, f"<<SYS>>\n{messages[0].content}\n<</SYS>>\n\n{first.content}")] + messages[
                2:
            ]
        if [m.role for m in messages[0::2]] != ["user"] * len(messages[0::2]) or any(
            m.role != "assistant" for m in messages[1::2]
        ):
            raise PlainLlamaError(
                "a Llama 2 conversation alternates user and assistant messages, starting with the user"
            )
        ids = []
        for prompt, answer in zip(messages[0::2], messages[1::2], strict=False):
            ids += self.tok.encode(f"[INST] {prompt.content.strip()} [/INST] {answer.content.strip()} ", bos=True)
            ids += [self.tok.eos_id] if self.tok.eos_id is not None else []
        if len(messages) % 2 == 1:
            ids += self.tok.encode(f"[INST] {messages[-1].content.strip()} [/INST]", bos=True)
        return ids


RENDER_SECONDS = 5.0  # a template comes with a downloaded file: its loops must not hang the program
RENDER_CHARS = 10_000_000


class _OutOfTime(Exception):
    pass


def bounded_render(pieces) -> str:
    """Join a template's output pieces within RENDER_SECONDS and RENDER_CHARS. The time is checked on
    every line the template's compiled code runs (a trace function), so that loops which print
    nothing are stopped too. Any error inside the template (its own, or Python's: 1/0, a recursive
    macro) becomes one line."""
    deadline = time.monotonic() + RENDER_SECONDS

    def tracer(frame, event, arg):
        if time.monotonic() > deadline:
            raise _OutOfTime
        return tracer

    text, size = [], 0
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        for piece in pieces:
            text.append(piece)
            size += len(piece)
            if size > RENDER_CHARS:
                raise PlainLlamaError(
                    f"the model's chat template wrote more than {RENDER_CHARS} characters; it is broken"
                )
    except _OutOfTime:
        raise PlainLlamaError(
            f"the model's chat template ran for more than {RENDER_SECONDS:g} s; it is broken"
        ) from None
    except RecursionError:
        raise PlainLlamaError("the model's chat template recursed too deeply; it is broken") from None
    except PlainLlamaError:
        raise
    except Exception as e:  # the template is code from a file: jinja2's errors and Python's (1/0, bad types)
        raise PlainLlamaError(f"the model's chat template failed: {type(e).__name__}: {e}") from None
    finally:
        sys.settrace(previous)
    return "".join(text)


class JinjaChat:
    name = "jinja"

    def __init__(self, tokenizer: Tokenizer, template: str):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.tok = tokenizer

        def raise_exception(message):
            raise PlainLlamaError(f"the model's chat template refused the conversation: {message}")

        # The settings transformers uses, so templates written for it render the same here. The
        # sandbox keeps a template (it comes with a downloaded file) from reaching Python objects.
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            self.template = env.from_string(template)
        except jinja2.TemplateError as e:
            raise PlainLlamaError(f"the model's chat template does not parse: {e}") from None

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        tok = self.tok
        pieces = self.template.generate(
            messages=[{"role": m.role, "content": m.content} for m in as_messages(messages)],
            add_generation_prompt=add_generation_prompt,
            bos_token=tok.tokens[tok.bos_id] if tok.bos_id is not None else "",
            eos_token=tok.tokens[tok.eos_id] if tok.eos_id is not None else "",
        )
        return bounded_render(pieces)

    def encode(self, messages, add_generation_prompt: bool = True) -> list[int]:
        messages = as_messages(messages)
        text = self.render(messages, add_generation_prompt)
        # Find each message's content in the rendering, in order, and protect it from special-token
        # parsing; the template's own markup is parsed. (A template may trim the content.)
        protected, cursor = [], 0
        for m in messages:
            for needle in (m.content, m.content.strip()):
                at = text.find(needle, cursor) if needle else -1
                if at >= 0:
                    protected.append((at, at + len(needle)))
                    cursor = at + len(needle)
                    break
        return self.tok.encode(text, bos=False, parse_special=True, protect=protected)


def chat_format_for(tokenizer: Tokenizer, chat_template: str | None, chat_format: str | None):
    if chat_template:
        return JinjaChat(tokenizer, chat_template)
    if chat_format == "llama3":
        return Llama3Chat(tokenizer)
    if chat_format == "llama2":
        return Llama2Chat(tokenizer)
    raise PlainLlamaError("this model has no chat format (no chat template in its files): use plain generation")
