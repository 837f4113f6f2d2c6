"""One decode step for sequences that are each at their own position with caches of their own: what a
server's continuous batch runs (server/scheduler.py), requests joining and leaving between steps.

    token of each sequence [M] --embedding--> [M, D] --layers (decode_rows in C)--> --norm, output--> logits [M, V]

The products read each weight matrix once for all M sequences (the point of batching: decoding is
bound by reading the weights). Everything else is per row, and the products use the kernels that
compute each row alone (`matmul_each_row`), so a sequence's logits are bit-for-bit those it gets
alone, or beside any other sequences: a request's answer does not depend on the company it keeps.
For M = 1 this is exactly the arithmetic of a single generation's decode step (decode_layer.c).

Only for models whose every layer runs in the C kernels (compressed weights on the CPU: the
default), held in memory or streamed from disk (a streamed layer is read once per step for all
sequences, so the disk's cost is shared by every sequence); others step each sequence through
model.py alone (`step_alone`).
"""

from __future__ import annotations

import contextlib
import ctypes

import torch

from ..errors import PlainLlamaError
from ..model import KVCache, Transformer, causal_mask, rotary_cos_sin
from .streaming import StreamedBlock
from .cpu import kernels
from .cpu.decode_block import KernelBlock
from .cpu.packed import DIRECT_ROWS, PackedLinear


def rows_can_step(model: Transformer) -> bool:
    return (
        kernels.available()
        and all(
            isinstance(layer, KernelBlock) or (isinstance(layer, StreamedBlock) and layer.on_cpu())
            for layer in model.layers
        )
        and isinstance(model.output, PackedLinear)
        and model.norm.weight.dtype == torch.float32
    )


@contextlib.contextmanager
def kernel_layer(layer, rows: int):
    """Layer `layer` as a KernelBlock: itself, or a streamed layer read and built for this step."""
    if isinstance(layer, KernelBlock):
        yield layer
        return
    with layer.built(rows) as block:
        if not isinstance(block, KernelBlock):
            raise PlainLlamaError(f"streamed layer {layer.index} cannot run in the C kernels (weights not packed)")
        yield block


class SequenceCache(KVCache):
    """A sequence's own KV cache (batch 1, float32), with its layers' addresses ready for decode_rows."""

    def __init__(self, model: Transformer, length: int):
        super().__init__(model.args, 1, length, torch.float32, torch.device("cpu"))
        self.k_addresses = torch.tensor([layer.k.data_ptr() for layer in self.layers], dtype=torch.int64)
        self.v_addresses = torch.tensor([layer.v.data_ptr() for layer in self.layers], dtype=torch.int64)


def step_rows(model: Transformer, tokens: list[int], positions: list[int], caches: list[SequenceCache]) -> torch.Tensor:
    """Each sequence's next token at its position -> logits [M, V] float32; writes each one's keys
    and values into its own cache."""
    M, args = len(tokens), model.args
    with torch.inference_mode():
        x = model.tok_embeddings(torch.tensor(tokens)[:, None]).reshape(M, args.dim).float().contiguous()  # [M, D]
        cos, sin = rotary_cos_sin(args, torch.tensor(positions)[:, None])  # [M, 1, 1, Hd] each
        cos, sin = cos.reshape(M, -1).contiguous(), sin.reshape(M, -1).contiguous()
        lengths = torch.tensor([c.length for c in caches], dtype=torch.long)
        starts = torch.tensor(positions, dtype=torch.int32)
        k_addresses = torch.stack([c.k_addresses for c in caches], dim=1).contiguous()  # [layers, M]
        v_addresses = torch.stack([c.v_addresses for c in caches], dim=1).contiguous()
        decode_rows = kernels.function("decode_rows")
        for i, layer in enumerate(model.layers):
            out = torch.empty_like(x)
            with kernel_layer(layer, M) as block:
                code = decode_rows(
                    ctypes.byref(block.layer),
                    x.data_ptr(),
                    M,
                    cos.data_ptr(),
                    sin.data_ptr(),
                    k_addresses[i].data_ptr(),
                    v_addresses[i].data_ptr(),
                    lengths.data_ptr(),
                    starts.data_ptr(),
                    out.data_ptr(),
                )
            kernels.check(code, "decode_rows")
            x = out
        h = model.norm(x[:, None, :]).reshape(M, args.dim)  # [M, D]
        assert isinstance(model.output, PackedLinear)
        return model.output.packed.matmul_each_row(h)  # [M, V]


def step_alone(model: Transformer, tokens: list[int], positions: list[int], caches: list[KVCache]) -> torch.Tensor:
    """The same step for any model: each sequence through model.py on its own (no shared weight read)."""
    with torch.inference_mode():
        return torch.cat(
            [
                model(torch.tensor([[t]], device=model.norm.weight.device), p, c, last_only=True)[0, -1:].float().cpu()
                for t, p, c in zip(tokens, positions, caches, strict=True)
            ]
        )


def can_prefill_together(chunk_tokens: int) -> bool:
    """Whether a prompt chunk of this many tokens can share prefill_rows' pass: chunks of more than
    DIRECT_ROWS tokens, whose products take the many-rows path alone and together alike."""
    return chunk_tokens > DIRECT_ROWS


def prefill_rows(model: Transformer, chunks: list[list[int]], starts: list[int], caches: list[KVCache]) -> torch.Tensor:
    """Several sequences' prompt chunks in one pass -> the logits after each chunk's last token [B, V]
    float32; each chunk's keys and values go into its own cache (batch 1) from its own start.

    What a server gains: a chunk of a short prompt costs as much as a long one (the pass reads and
    unpacks every weight), so new requests that arrive together share that cost. Each chunk's
    numbers are those of model(chunk, start, cache) alone (KernelBlock.prompt_segments says why):
    every chunk needs more than DIRECT_ROWS tokens (`can_prefill_together`)."""
    assert all(can_prefill_together(len(c)) for c in chunks)
    args, lengths = model.args, [len(c) for c in chunks]
    with torch.inference_mode():
        x = model.tok_embeddings(torch.tensor([t for c in chunks for t in c])[None, :])  # [1, R, D]
        # each chunk's angles and mask computed as for it alone (a vectorized cos may round a value
        # differently at another index of a longer table)
        tables = [rotary_cos_sin(args, torch.arange(s, s + n)[None, :]) for s, n in zip(starts, lengths, strict=True)]
        cos = torch.cat([c for c, _ in tables], dim=1)  # [1, R, 1, Hd]
        sin = torch.cat([s for _, s in tables], dim=1)
        masks = [causal_mask(s, n, x.device) for s, n in zip(starts, lengths, strict=True)]
        for i, layer in enumerate(model.layers):
            with kernel_layer(layer, x.shape[1]) as block:
                x = block.prompt_segments(x, cos, sin, masks, [c.layers[i] for c in caches], starts, lengths)
        ends = torch.tensor(lengths).cumsum(0) - 1
        h = model.norm(x[0, ends][:, None, :]).reshape(len(chunks), args.dim)  # [B, D]
        assert isinstance(model.output, PackedLinear)
        return model.output.packed.matmul_each_row(h)  # [B, V]
