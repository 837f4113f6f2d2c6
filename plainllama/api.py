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

import operator
import os
import time

import torch

from .chat_format import chat_format_for
from .default_model import default_model_path
from .engine.compiled import compile_decode
from .engine.cpu import kernels
from .engine.devices import pick_device, pick_dtype
from .engine.loading import load_planned, weight_mode
from .engine.planner import MemoryPlan, available_ram, gb, kv_bytes, parse_size
from .errors import PlainLlamaError
from .formats import Checkpoint, open_checkpoint
from .generation.batch import generate_batch
from .generation.beam import Beam, beam_search
from .generation.generate import check_prompt, device_and_dtype
from .generation.stops import StopMatcher
from .generation.stream import Generation, GenerationStream
from .model import Transformer
from .sampling import Sampler, SamplingSettings
from .tokenizer import Tokenizer


def valid_text(text: str, what: str) -> str:
    """`text`, if it can be encoded as UTF-8. Python turns invalid UTF-8 on the command line or in a
    file into lone surrogates, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PlainLlamaError(
            f"{what} is not valid Unicode: character {e.object[e.start]!r} at position {e.start} "
            "(bytes that are not UTF-8?)"
        ) from None
    return text


class LLM:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        checkpoint: Checkpoint,
        device: torch.device,
        dtype: torch.dtype,
        load_seconds: float,
        plan: MemoryPlan | None = None,
        weights: str = "float",
        ranks=None,
    ):
        self.model = model
        self.ranks = ranks  # this process's place among tensor-parallel ranks (parallel/ranks.py), or None
        self.weights = weights  # how the weights are held (engine/loading.py's WEIGHT_MODES)
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint
        self.device, self.dtype = device, dtype
        self.load_seconds = load_seconds
        self.plan = plan  # which layers are resident and which stream from disk (planner.py)

    @property
    def streamer(self):
        """The layer reader when some layers stream from disk (streaming.py), else None."""
        from .engine.streaming import StreamedBlock

        for layer in self.model.layers:
            if isinstance(layer, StreamedBlock):
                return layer._streamer[0]
        return None

    def close(self) -> None:
        """Stop the layer reader thread, if any (also done at exit)."""
        if self.streamer is not None:
            self.streamer.close()

    def _check_request(self, rows: int, length: int) -> None:
        """A generation of `rows` sequences of up to `length` tokens must fit: within the memory plan's
        KV cache, and its cache and logits within the memory the machine has now (checked before
        anything is allocated, so that 100000 beams are an error, not minutes of swapping)."""
        length = min(length, self.args.context_length)
        if self.plan is not None:
            self.plan.check_request(rows, length)
        if self.device.type == "cpu":
            needed = (
                kv_bytes(self.args, rows * length, device_and_dtype(self.model)[1])
                + 4 * rows * self.args.vocab_size * 4
            )
            if needed > available_ram():
                raise PlainLlamaError(
                    f"this request ({rows} row(s) of up to {length} tokens) needs {gb(needed)} for its KV cache and "
                    f"logits, but {gb(available_ram())} of memory is available"
                )

    @property
    def compute(self) -> str:
        """Which path the products take: "kernels amx" / "kernels avx512" / "kernels avx2" (compressed
        weights, the C kernels), "torch weight-only" (compressed weights, PyTorch's weight-only
        operators: where the kernels do not run) or "float weights" (weights converted to the
        model's dtype)."""
        if self.weights == "float":
            return "float weights"
        return "torch weight-only" if kernels.isa() == "none" else f"kernels {kernels.isa()}"

    @property
    def args(self):
        return self.model.args

    def logits(self, ids: list[int]) -> torch.Tensor:
        """One forward pass over `ids` from position 0: float32 [len(ids), vocab]."""
        ids = self.encode_prompt(list(ids))
        check_prompt(ids, self.args.context_length + 1)
        self._check_request(1, len(ids))
        with torch.inference_mode():
            tokens = torch.tensor([list(ids)], device=self.device)
            return self.model(tokens)[0].float().cpu()

    def _token_id(self, token) -> int:
        """A prompt's token id as a Python int (numpy's and PyTorch's integers too), within the vocabulary."""
        vocab = self.args.vocab_size
        try:
            value = operator.index(token)
        except TypeError:
            value = -1
        if isinstance(token, bool) or not 0 <= value < vocab:
            raise PlainLlamaError(f"the prompt holds token id {token!r}, outside the vocabulary (0 to {vocab - 1})")
        return value

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Text -> token ids; a list of ids is checked against the vocabulary (an id beyond it, or a
        negative one, would index the embedding out of range or wrap around)."""
        if isinstance(prompt, (list, tuple)):
            return [self._token_id(token) for token in prompt]
        if not isinstance(prompt, str):
            raise PlainLlamaError(f"a prompt is text or a list of token ids, got {type(prompt).__name__}")
        return self.tokenizer.encode(valid_text(prompt, "the prompt"))

    def sampling_settings(self, sampling: dict) -> SamplingSettings:
        try:
            settings = SamplingSettings(**sampling)
        except TypeError as e:
            raise PlainLlamaError(f"unknown sampling setting: {e}") from None
        settings.check(self.args.vocab_size)
        return settings

    def stream(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 128,
        stop=(),
        logprobs: int | None = None,
        draft: LLM | None = None,
        speculate_k: int = 4,
        **sampling,
    ) -> GenerationStream:
        """Stream the continuation of `prompt`. `sampling`: the fields of SamplingSettings (sampling.py).
        `stop`: strings that end the text; `logprobs`: record N alternatives per token; `draft`:
        a smaller model with the same vocabulary for speculative decoding, `speculate_k` tokens ahead."""
        sampler = Sampler(self.sampling_settings(sampling))
        if self.ranks is not None:  # rank 0 draws each token and the others take it
            from .parallel.ranks import LeaderSampler

            sampler = LeaderSampler(sampler, self.ranks)
        if logprobs is not None and not 0 <= logprobs <= self.args.vocab_size:
            raise PlainLlamaError(
                f"--logprobs must be between 0 and the vocabulary's {self.args.vocab_size}, got {logprobs}"
            )
        if draft is not None and draft.tokenizer.tokens != self.tokenizer.tokens:
            raise PlainLlamaError(
                "--draft-model: its vocabulary differs from the target model's; speculative decoding needs the same "
                "tokens"
            )
        ids = self.encode_prompt(prompt)
        self._check_request(1, len(ids) + max_new_tokens + (speculate_k if draft is not None else 0))
        return GenerationStream(
            self.model,
            self.tokenizer,
            ids,
            max_new_tokens,
            sampler,
            stop,
            logprobs,
            draft.model if draft is not None else None,
            speculate_k,
        )

    def trace(self, prompt: str | list[int], max_new_tokens: int = 0, top_k: int = 5, **sampling):
        """What happens inside: tokens, per-layer residual norms, attention weights and logit lens,
        and per generated step the candidates (see tracing.py)."""
        from .inspection.tracing import trace

        return trace(self, prompt, max_new_tokens, top_k, **sampling)

    def generate_batch(self, prompts, max_new_tokens: int = 128, stop=(), **sampling) -> list[Generation]:
        """Several prompts in one batch (one forward pass per step for all); results in order."""
        settings = self.sampling_settings(sampling)
        ids = [self.encode_prompt(p) for p in prompts]
        self._check_request(len(ids), max((len(i) for i in ids), default=0) + max_new_tokens)
        stops = StopMatcher(stop)

        def hit_stop(row, tokens):
            return stops.find(self.tokenizer.decode(tokens)) is not None

        states = generate_batch(
            self.model, ids, max_new_tokens, settings, self.tokenizer.end_ids, hit_stop if stops else None
        )
        results = []
        for prompt_ids, state in zip(ids, states, strict=True):
            text = "".join(self.tokenizer.stream().decode_all(state.tokens))
            assert state.finish_reason is not None  # every row ends with a reason
            results.append(Generation(prompt_ids, state.tokens, stops.cut(text), state.finish_reason, state.timings))
        return results

    def beam_search(
        self,
        prompt: str | list[int],
        num_beams: int = 4,
        max_new_tokens: int = 64,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        no_repeat_ngram_size: int = 0,
        num_return: int = 1,
        stop=(),
    ) -> list[Beam]:
        """The num_return best continuations by beam search (best first), with their scores. A beam
        whose text reaches a `stop` string ends there, as it would on an end token."""
        ids = self.encode_prompt(prompt)
        self._check_request(num_beams, len(ids) + max_new_tokens)
        stops = StopMatcher(stop)

        def hit_stop(tokens):
            return stops.find(self.tokenizer.decode(tokens)) is not None

        return beam_search(
            self.model,
            ids,
            num_beams,
            max_new_tokens,
            self.tokenizer.end_ids,
            length_penalty,
            early_stopping,
            no_repeat_ngram_size,
            num_return,
            hit_stop if stops else None,
        )

    @property
    def chat_format(self):
        """How this model's conversations are written (its Jinja template, or Meta's Llama 2/3 format)."""
        if not hasattr(self, "_chat_format"):
            self._chat_format = chat_format_for(
                self.tokenizer, self.checkpoint.chat_template, self.checkpoint.chat_format
            )
        return self._chat_format

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """[{"role": "user", "content": "..."}, ...] -> token ids, ending with the assistant's turn opened."""
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
            if isinstance(content, str):
                valid_text(content, "a chat message")
        return self.chat_format.encode(messages, add_generation_prompt)

    def chat(self, messages, **settings) -> GenerationStream:
        """Stream the assistant's answer to a conversation."""
        return self.stream(self.encode_chat(messages), **settings)

    def generate(self, prompt: str | list[int], **settings) -> Generation:
        stream = self.stream(prompt, **settings)
        for _ in stream:
            pass
        assert stream.result is not None  # set once the stream is exhausted
        return stream.result


def load(
    path: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str | None = None,
    dequantize: bool = False,
    max_memory: int | str | None = None,
    max_gpu_memory: int | str | None = None,
    context: int | None = None,
    report=None,
    compile: bool = False,
    threads: int | None = None,
    prefix_cache: int | str = 0,
) -> LLM:
    """Load a model file or folder (default: the bundled SmolLM2-135M-Instruct).

    On the CPU with dtype "auto", weights stay in their stored compressed form (a Q4 GGUF runs from
    4-bit blocks, a bfloat16 checkpoint from 16-bit floats); `quantize="int8"|"int4"` also
    compresses float checkpoints. An explicit dtype, or `dequantize=True`, converts every weight to
    that dtype instead (exact float arithmetic, as the reference implementations do; slower).

    Memory: the planner (planner.py) keeps the layers that fit in memory and streams the rest from
    disk on every forward pass. `max_memory` ("4G", or bytes) caps the process's RAM, `max_gpu_memory`
    the GPU's; `context` is the KV cache to reserve, in tokens (all rows of a batch together).
    `report(text)` receives the plan when anything streams or a cap was given.
    `compile=True`: decode steps on PyTorch's operators go through torch.compile (compiled.py).
    `threads`: threads for PyTorch and the C kernels, which share one OpenMP pool (default: one per core).
    `prefix_cache`: memory to plan for a prefix cache beside the KV cache (bytes, "512M", or "context" for
    one context's worth); `plainllama serve` and `chat` keep prompts' keys and values there (server/).

    Started by torchrun (or `plainllama ... --tp N`), with WORLD_SIZE > 1 in the environment, each
    process joins the others and holds 1/N of every layer (parallel/): call load() on every rank."""
    from .parallel.ranks import from_environment

    ranks = from_environment()
    if threads is not None:
        if threads < 1:
            raise PlainLlamaError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    elif ranks is not None:  # ranks on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks.local_world))
    start = time.perf_counter()
    checkpoint = open_checkpoint(path if path is not None else default_model_path())
    if context is not None:
        # A hard cap, as llama.cpp's -c: generation stops ("context") and a chat trims its turns there.
        trained = checkpoint.args.context_length
        if isinstance(context, bool) or not isinstance(context, int) or not 2 <= context <= trained:
            raise PlainLlamaError(
                f"--context must be between 2 and the model's context of {trained} tokens, got {context}"
            )
        checkpoint.args.context_length = context
    torch_device = pick_device(device)
    if ranks is not None and torch_device.type == "cuda":  # one GPU per rank on each machine
        torch_device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(torch_device)
    torch_dtype = pick_dtype(dtype, torch_device)
    weights = weight_mode(torch_device, dtype, quantize, dequantize)
    if isinstance(prefix_cache, str) and prefix_cache != "context":
        prefix_cache = parse_size(prefix_cache)
    if ranks is not None:
        from .parallel.tensor_parallel import load_rank

        model, plan = load_rank(
            checkpoint,
            ranks,
            torch_dtype,
            torch_device,
            weights,
            parse_size(max_memory) if isinstance(max_memory, str) else max_memory,
            parse_size(max_gpu_memory) if isinstance(max_gpu_memory, str) else max_gpu_memory,
            context,
            prefix_cache,
            report,
        )
    else:
        model, plan = load_planned(
            checkpoint, torch_dtype, torch_device, weights, max_memory, max_gpu_memory, context, report, prefix_cache
        )
    if compile:
        compile_decode(model)
    seconds = time.perf_counter() - start
    return LLM(model, checkpoint.tokenizer, checkpoint, torch_device, torch_dtype, seconds, plan, weights, ranks)


__all__ = ["LLM", "Beam", "Generation", "GenerationStream", "PlainLlamaError", "load"]
