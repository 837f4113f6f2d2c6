"""Seeing what the model does: a traced forward pass, as plain tensors and records.

`trace(llm, prompt)` optionally generates a few tokens (recording each step's candidates), then runs
one forward pass over the whole text with PyTorch forward hooks attached, and records for every layer:

- the residual stream's size (L2 norm per position) after the layer;
- the attention weights of every head, softmax(q k^T / sqrt(d)) with the causal mask: the fused
  attention kernel never materialises them, so the hook recomputes them from the layer's own
  inputs and projections;
- the logit lens: the final norm and output projection applied to the residual after this layer,
  read as a next-token distribution (nostalgebraist, 2020), i.e. what the model would predict if it
  stopped here.

Hooks only read; the model's code path and numbers are those of a plain forward pass, and with no
trace running the model pays nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import PlainLlamaError


@dataclass
class TokenInfo:
    id: int
    piece: str  # the token's text (U+FFFD where it holds part of a character)
    bytes: list[int]  # the exact bytes it stands for


@dataclass
class LayerTrace:
    residual_norm: torch.Tensor  # [T] L2 norm of the residual stream after this layer
    attention: torch.Tensor  # [H, T, T] attention weights, rows sum to 1
    lens_top: list[list[tuple[int, float]]]  # per position: the k most likely next tokens by the logit lens
    lens_final_prob: torch.Tensor  # [T] the lens probability of the token the full model predicts there


@dataclass
class StepTrace:
    chosen: int
    candidates: list[tuple[int, float]]  # the most likely tokens and their probabilities


@dataclass
class Trace:
    tokens: list[TokenInfo]  # prompt + generated, as traced
    prompt_length: int
    layers: list[LayerTrace]
    logits: torch.Tensor  # [T, V] the model's output (float32)
    steps: list[StepTrace] = field(default_factory=list)

    @property
    def predictions(self) -> list[int]:
        """The model's top-1 next token at each position."""
        return self.logits.argmax(-1).tolist()

    def first_layer_knowing(self, position: int = -1) -> int | None:
        """The first layer whose logit lens already puts the final prediction on top."""
        target = self.predictions[position]
        for i, layer in enumerate(self.layers):
            if layer.lens_top[position][0][0] == target:
                return i
        return None


class Recorder:
    """Forward hooks on every block and attention module of a model; removed on exit."""

    def __init__(self, model):
        self.model = model
        self.residuals: list[torch.Tensor] = []
        self.attentions: list[torch.Tensor] = []
        self.handles = []

    def __enter__(self):
        for layer in self.model.layers:
            self.handles.append(layer.register_forward_hook(self.on_block))
            self.handles.append(layer.attention.register_forward_hook(self.on_attention))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def on_block(self, module, inputs, output):
        self.residuals.append(output.detach()[0].float())  # [T, D]

    def on_attention(self, module, inputs, output):
        x, cos, sin, mask, cache, start_pos = inputs
        q, k, _ = module.queries_keys_values(x, cos, sin)  # [B, H, T, Hd], [B, K, T, Hd]
        k = k.repeat_interleave(module.n_heads // module.n_kv_heads, dim=1)  # each query head's key head
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(module.head_dim)  # [B, H, T, T]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        self.attentions.append(scores.softmax(-1)[0].detach())  # [H, T, T]


def trace(llm, prompt, max_new_tokens: int = 0, top_k: int = 5, **sampling) -> Trace:
    """Trace `prompt` (text or ids); with max_new_tokens, generate first and trace the whole text."""
    if llm.streamer is not None:
        raise PlainLlamaError(
            "inspect needs every layer in memory, and this model streams layers from disk; give it more --max-memory"
        )
    prompt_ids = llm.encode_prompt(prompt)
    steps = []
    generated = []
    if max_new_tokens:
        result = llm.generate(prompt_ids, max_new_tokens=max_new_tokens, logprobs=top_k, **sampling)
        generated = result.tokens
        for lp in result.logprobs:
            steps.append(StepTrace(lp.token, [(t, math.exp(v)) for t, v in lp.top]))
    ids = prompt_ids + generated
    model = llm.model
    with torch.inference_mode(), Recorder(model) as rec:
        logits = model(torch.tensor([ids], device=llm.device))[0].float().cpu()  # [T, V]
        final = logits.argmax(-1)  # [T]
        layers = []
        for residual, attention in zip(rec.residuals, rec.attentions, strict=True):
            lens = model.output(model.norm(residual.to(llm.dtype))).float().softmax(-1).cpu()  # [T, V]
            top = torch.topk(lens, top_k)
            layers.append(
                LayerTrace(
                    residual_norm=residual.norm(dim=-1).cpu(),
                    attention=attention.cpu(),
                    lens_top=[
                        list(zip(i.tolist(), p.tolist(), strict=True))
                        for i, p in zip(top.indices, top.values, strict=True)
                    ],
                    lens_final_prob=lens.gather(1, final[:, None])[:, 0],
                )
            )
    tok = llm.tokenizer
    tokens = [TokenInfo(i, tok.piece(i), list(tok.token_bytes[i])) for i in ids]
    return Trace(tokens, len(prompt_ids), layers, logits, steps)
