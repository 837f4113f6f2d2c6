"""Tensor parallelism: each of N ranks holds 1/N of every layer, and the ranks add up their parts.

model.py stays the single-device model; a rank runs that same Transformer, built with its own
slice (slicing.py: its heads, its feed-forward width, its vocabulary rows), plus four collectives:

  tok_embeddings   each rank holds some vocabulary rows; a token's row comes from the rank that has
                   it, the others add zeros                           -> one all-reduce
  attention        q, k, v of this rank's heads; attention over them needs nothing from others;
                   wo reads only those heads, so its product is a partial sum  -> one all-reduce
  feed_forward     w1, w3 rows of this rank's hidden units; w2 reads only those -> one all-reduce
  output           logits for this rank's vocabulary rows           -> one all-gather

So a decode step costs two all-reduces of D numbers per layer, as in Meta's fairscale layers
(ColumnParallelLinear for wq/wk/wv/w1/w3, RowParallelLinear for wo/w2). The residual stream, the
norms and the rotary embedding are computed by every rank on identical numbers. Sums are taken in
float32 whatever the model's dtype; their order differs from one device's product, so logits
match a single process to within float32 reduction-order error, not bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..engine.loading import WeightBuilder, skip_random_init
from ..engine.planner import MemoryPlan, plan_memory
from ..errors import PlainLlamaError
from ..formats import Checkpoint
from ..model import Transformer
from .ranks import Ranks, agree_on_model, model_fingerprint
from .slicing import rank_checkpoint, vocabulary_rows


GATHERED_SUM_BYTES = 64 << 10  # all-reduces up to this size are an all-gather and a local sum


@dataclass
class Collectives:
    """Time this rank spent in collectives (waiting for the slowest rank included) and the bytes it
    handed them: what `plainllama bench` reports per decoded token under --tp."""

    calls: int = 0
    seconds: float = 0.0
    bytes: int = 0

    def all_reduce(self, t: torch.Tensor) -> None:
        """t <- the sum of every rank's t. A small message (a decode step's [M, D]) is gathered and
        added up here, in rank order: gloo's all-reduce of 2048 floats takes ~3x its all-gather's time
        on a 2-core VM (1.5 ms against 0.5 ms, benchmarks/parallel.py), its ring costing two rounds of
        messages and wake-ups where a gather takes one. Large ones (prompts) take the ring, which moves
        2/N of the bytes a gather does."""
        start = time.perf_counter()
        if t.numel() * t.element_size() <= GATHERED_SUM_BYTES:
            pieces = [torch.empty_like(t) for _ in range(dist.get_world_size())]
            dist.all_gather(pieces, t)
            torch.sum(torch.stack(pieces), dim=0, out=t)
        else:
            dist.all_reduce(t)
        self._count(start, t)

    def all_gather(self, pieces: list[torch.Tensor], t: torch.Tensor) -> None:
        start = time.perf_counter()
        dist.all_gather(pieces, t)
        self._count(start, t)

    def _count(self, start: float, t: torch.Tensor) -> None:
        self.calls += 1
        self.seconds += time.perf_counter() - start
        self.bytes += t.numel() * t.element_size()


class AllReduced(nn.Module):
    """A row-parallel projection (wo, w2): this rank's columns times this rank's part of the input
    give a partial sum, which the ranks add up. [B, T, in/N] -> [B, T, D]."""

    def __init__(self, inner: nn.Module, collectives: Collectives):
        super().__init__()
        self.inner, self.collectives = inner, collectives

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = self.inner(x)
        total = partial.float()  # a copy for 16-bit models; float32 is summed in place
        self.collectives.all_reduce(total)
        return total.type_as(partial)


class VocabularyParallelEmbedding(nn.Module):
    """This rank's rows [start, start + rows) of the embedding table; tokens [B, T] -> [B, T, D]."""

    def __init__(self, inner: nn.Module, start: int, rows: int, collectives: Collectives):
        super().__init__()
        self.inner, self.start, self.rows, self.collectives = inner, start, rows, collectives

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        mine = (local >= 0) & (local < self.rows)  # [B, T]
        h = self.inner(local.clamp(0, self.rows - 1))
        total = torch.where(mine[..., None], h.float(), 0.0)  # [B, T, D]
        self.collectives.all_reduce(total)  # exactly one rank gives each token a nonzero row: the sum is exact
        return total.type_as(h)


class VocabularyParallelOutput(nn.Module):
    """Logits for this rank's vocabulary rows, gathered from every rank: [B, T, D] -> [B, T, V]."""

    def __init__(self, inner: nn.Module, rows_per_rank: list[int], collectives: Collectives):
        super().__init__()
        self.inner, self.rows_per_rank, self.collectives = inner, rows_per_rank, collectives

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = self.inner(h)  # [B, T, V/N]
        widest = max(self.rows_per_rank)
        padded = F.pad(local.float(), (0, widest - local.shape[-1])).contiguous()  # gather needs equal sizes
        pieces = [torch.empty_like(padded) for _ in self.rows_per_rank]
        self.collectives.all_gather(pieces, padded)
        return torch.cat([p[..., :n] for p, n in zip(pieces, self.rows_per_rank, strict=True)], dim=-1).type_as(local)


def collectives_of(model: nn.Module) -> Collectives | None:
    """The collectives' account of a rank's model, or None for a single process's model."""
    return next((m.collectives for m in model.modules() if isinstance(m, AllReduced)), None)


def build_rank_model(
    sliced: Checkpoint, vocab_size: int, ranks: Ranks, dtype: torch.dtype, device: torch.device, weights: str
) -> Transformer:
    """Rank `ranks.rank`'s model from its slice of the checkpoint (slicing.rank_checkpoint). Its
    layers are plain TransformerBlocks on packed or float weights: the C layer step (decode_block.py)
    runs a whole layer in one call, with no place for the two sums."""
    builder = WeightBuilder(sliced, dtype, device, weights)
    with torch.device("meta"), skip_random_init():
        model = Transformer(sliced.args)
    collectives = Collectives()
    shared: dict = {}
    builder.fill(model, {t: n for t, n in builder.groups.items() if not t.startswith("layers.")}, sliced, shared=shared)
    for i in range(sliced.args.n_layers):
        block = builder.new_block()
        builder.fill(block, builder.layer_groups(i), sliced, prefix=f"layers.{i}.")
        block.set_submodule("attention.wo", AllReduced(block.attention.wo, collectives))
        block.set_submodule("feed_forward.w2", AllReduced(block.feed_forward.w2, collectives))
        model.layers[i] = block
    rows = vocabulary_rows(vocab_size, ranks.world)
    start, mine = rows[ranks.rank]
    model.set_submodule("tok_embeddings", VocabularyParallelEmbedding(model.tok_embeddings, start, mine, collectives))
    model.set_submodule("output", VocabularyParallelOutput(model.output, [n for _, n in rows], collectives))
    empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise PlainLlamaError(f"{sliced.path}: no weights for {', '.join(empty[:4])}")
    # The generation loops size KV caches from model.args: this rank's heads; the vocabulary is the whole one.
    model.args = replace(sliced.args, vocab_size=vocab_size)
    return model.eval()


def load_rank(
    checkpoint: Checkpoint,
    ranks: Ranks,
    dtype: torch.dtype,
    device: torch.device,
    weights: str,
    max_memory: int | None,
    max_gpu_memory: int | None,
    context: int | None,
    prefix_cache: int | str,
    report=None,
) -> tuple[Transformer, MemoryPlan]:
    """This rank's model and memory plan. Every rank first checks that all loaded the same model."""
    agree_on_model(ranks, model_fingerprint(checkpoint), checkpoint.path)
    sliced = rank_checkpoint(checkpoint, ranks.rank, ranks.world)
    plan = plan_memory(WeightBuilder(sliced, dtype, device, weights), max_memory, max_gpu_memory, context, prefix_cache)
    if report is not None and plan.explicit and ranks.leader:  # a cap was given: rank 0 shows its share's plan
        report(plan.summary())
    if plan.streamed:
        raise PlainLlamaError(
            f"rank {ranks.rank}'s 1/{ranks.world} of the model does not fit in its memory ({plan.summary()}); "
            "streaming layers from disk does not run under tensor parallelism yet: use more ranks or a smaller file"
        )
    model = build_rank_model(sliced, checkpoint.args.vocab_size, ranks, dtype, device, weights)
    checkpoint.release_tensors()
    return model, plan
