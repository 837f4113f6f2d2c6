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
    """A sequence's own KV cache (batch 1, in the model's cache dtype: float16 or float32), with its
    layers' addresses ready for decode_rows."""

    def __init__(self, model: Transformer, length: int):
        super().__init__(model.args, 1, length, model.kv_dtype or torch.float32, torch.device("cpu"))
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
        f16 = caches[0].layers[0].k.dtype == torch.float16  # every SequenceCache of a model holds one dtype
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
                    f16,
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


def prefill_rows(
    model: Transformer, chunks: list[list[int]], starts: list[int], caches: list[KVCache], align: int | None = None
) -> torch.Tensor:
    """Several sequences' prompt chunks in one pass -> the logits after each chunk's last token [B, V]
    float32; each chunk's keys and values go into its own cache (batch 1) from its own start.

    What a server gains: a chunk of a short prompt costs as much as a long one (the pass reads and
    unpacks every weight), so new requests that arrive together share that cost. Each chunk's
    numbers are those of model(chunk, start, cache) alone (KernelBlock.prompt_segments says why):
    every chunk needs more than DIRECT_ROWS tokens (`can_prefill_together`).

    On a CPU with AMX each chunk starts at a multiple of 32 rows (zero rows between chunks), where
    its rows sit alone too: amx_matmul takes rows 32 at a time, and a row's numbers must not depend
    on its place in such a block (`align`: the row multiple chunks start at, by default that)."""
    assert all(can_prefill_together(len(c)) for c in chunks)
    args, lengths = model.args, [len(c) for c in chunks]
    if align is None:
        align = 32 if kernels.amx() else 1
    offsets, rows = [], 0
    for n in lengths:
        offsets.append(rows)
        rows = -(-(rows + n) // align) * align
    with torch.inference_mode():
        x = torch.zeros(1, rows, args.dim)  # [1, R, D]: the chunks' rows at their offsets, zeros between
        cos = torch.zeros(1, rows, 1, args.head_dim)
        sin = torch.zeros(1, rows, 1, args.head_dim)
        for chunk, start, at in zip(chunks, starts, offsets, strict=True):
            T = len(chunk)
            rows_in = model.tok_embeddings(torch.tensor([chunk]))  # [1, T, D]
            assert rows_in.dtype == torch.float32  # as in KernelBlock's own prompt step
            x[:, at : at + T] = rows_in
            # each chunk's angles computed as for it alone (a vectorized cos may round a value
            # differently at another index of a longer table)
            cos[:, at : at + T], sin[:, at : at + T] = rotary_cos_sin(args, torch.arange(start, start + T)[None, :])
        masks = [causal_mask(s, n, x.device) for s, n in zip(starts, lengths, strict=True)]
        for i, layer in enumerate(model.layers):
            with kernel_layer(layer, rows) as block:
                x = block.prompt_segments(x, cos, sin, masks, [c.layers[i] for c in caches], starts, offsets, lengths)
        ends = torch.tensor(offsets) + torch.tensor(lengths) - 1
        h = model.norm(x[0, ends][:, None, :]).reshape(len(chunks), args.dim)  # [B, D]
        assert isinstance(model.output, PackedLinear)
        return model.output.packed.matmul_each_row(h)  # [B, V]
