"""The Python API. Everything the CLI does goes through here.

    import plainllama
    llm = plainllama.load()                      # the default model, on the best device
    ids = llm.tokenizer.encode("Hello")
    logits = llm.logits(ids)                     # [len(ids), vocab] float32
    out = llm.generate("The capital of France is", max_new_tokens=20)
    print(out.text)
    for piece in llm.stream("Once upon a time"):  # text as it is produced
        print(piece, end="")
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from .chat_format import chat_format_for
from .default_model import default_model_path
from .devices import pick_device, pick_dtype
from .errors import PlainLlamaError
from .formats import Checkpoint, open_checkpoint
from .generate import GenerationState, Timings, check_prompt, generate_tokens
from .loading import build_model
from .model import Transformer
from .sampling import Sampler
from .tokenizer import Tokenizer


@dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int]  # generated ids, end token excluded
    text: str  # the generated text (the continuation only)
    finish_reason: str
    timings: Timings


class GenerationStream:
    """Iterate for text pieces as they are produced; `.result` holds the Generation afterwards."""

    def __init__(self, llm: "LLM", prompt_ids: list[int], max_new_tokens: int, sampler: Sampler):
        self._llm, self._prompt_ids = llm, prompt_ids
        self._state = GenerationState()
        self._token_iter = generate_tokens(llm.model, prompt_ids, max_new_tokens, sampler, llm.tokenizer.end_ids, self._state)
        self._pieces: list[str] = []
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        decoder = self._llm.tokenizer.stream()
        for token_id in self._token_iter:
            piece = decoder.push(token_id)
            if piece:
                self._pieces.append(piece)
                yield piece
        tail = decoder.flush()
        if tail:
            self._pieces.append(tail)
            yield tail
        s = self._state
        self.result = Generation(self._prompt_ids, s.tokens, "".join(self._pieces), s.finish_reason, s.timings)


class LLM:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype, load_seconds: float):
        self.model = model
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint
        self.device, self.dtype = device, dtype
        self.load_seconds = load_seconds

    @property
    def args(self):
        return self.model.args

    def logits(self, ids: list[int]) -> torch.Tensor:
        """One forward pass over `ids` from position 0: float32 [len(ids), vocab]."""
        check_prompt(list(ids), self.args.context_length + 1)
        with torch.inference_mode():
            tokens = torch.tensor([list(ids)], device=self.device)
            return self.model(tokens)[0].float().cpu()

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if isinstance(prompt, (list, tuple)) else self.tokenizer.encode(prompt)

    def stream(
        self, prompt: str | list[int], max_new_tokens: int = 128, temperature: float = 0.0,
        top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
    ) -> GenerationStream:
        sampler = Sampler(temperature, top_k, top_p, seed)
        return GenerationStream(self, self.encode_prompt(prompt), max_new_tokens, sampler)

    @property
    def chat_format(self):
        """How this model's conversations are written (its Jinja template, or Meta's Llama 2/3 format)."""
        if not hasattr(self, "_chat_format"):
            self._chat_format = chat_format_for(self.tokenizer, self.checkpoint.chat_template, self.checkpoint.chat_format)
        return self._chat_format

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """[{"role": "user", "content": "..."}, ...] -> token ids, ending with the assistant's turn opened."""
        return self.chat_format.encode(messages, add_generation_prompt)

    def chat(self, messages, **settings) -> GenerationStream:
        """Stream the assistant's answer to a conversation."""
        return self.stream(self.encode_chat(messages), **settings)

    def generate(self, prompt: str | list[int], **settings) -> Generation:
        stream = self.stream(prompt, **settings)
        for _ in stream:
            pass
        return stream.result


def load(path: str | None = None, device: str = "auto", dtype: str = "auto") -> LLM:
    """Load a model file or folder (default: the bundled SmolLM2-135M-Instruct)."""
    start = time.perf_counter()
    checkpoint = open_checkpoint(path if path is not None else default_model_path())
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    model = build_model(checkpoint, torch_dtype, torch_device)
    # The model now holds every weight; dropping the loader's handles releases the source files'
    # memory maps (and any converted copies) instead of keeping them alive beside the model.
    checkpoint.tensors = {}
    return LLM(model, checkpoint.tokenizer, checkpoint, torch_device, torch_dtype, time.perf_counter() - start)


__all__ = ["LLM", "Generation", "GenerationStream", "PlainLlamaError", "load"]
