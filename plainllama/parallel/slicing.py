"""One rank's slice of a checkpoint: the same Checkpoint shape (config + records in Meta's naming),
with every record cut down to what this rank holds and a config of the rank's width, so that the
ordinary loader (engine/loading.py) builds the rank's layers without knowing about ranks.

What each rank keeps, for N ranks (tensor_parallel.py says where the sums and gathers go):
  wq, wk, wv          rows of its heads: query heads r*H/N.., and their key/value heads r*K/N..
  wo                  the columns that read those heads (its input width), so the products add up
  w1, w3              rows r*F/N.. of the feed-forward width
  w2                  the columns that read those rows
  tok_embeddings      vocabulary rows r*ceil(V/N)..; output: the same rows (so a tied pair stays one)
  norms               all of it (they are D numbers)

Nothing is read here: each record's load()/raw() cuts its slice when the loader calls it. A row slice
of a memory-mapped file is a view and touches only its own pages; a column slice is copied out and
the file's pages are dropped again (engine/memory.release), so a rank's memory is its slice.
Quantized rows are cut between blocks, so a column slice must start and end on a block boundary
(32 weights, 256 for K-quants).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..engine.memory import release
from ..errors import PlainLlamaError
from ..formats.checkpoint import Checkpoint, CheckpointTensor, expected_shapes
from ..formats.gguf_quants import block_size, byte_size, dequantize
from ..model import ModelArgs


@dataclass(frozen=True)
class Cut:
    """Which part of a [rows, columns] matrix a rank keeps: `length` rows (axis 0) or columns (axis 1) from `start`."""

    axis: int
    start: int
    length: int


def vocabulary_rows(vocab_size: int, world: int) -> list[tuple[int, int]]:
    """(first row, row count) of the vocabulary each rank holds: ceil(V/N) each, the last fewer."""
    chunk = -(-vocab_size // world)
    return [(min(r * chunk, vocab_size), max(0, min(chunk, vocab_size - r * chunk))) for r in range(world)]


def rank_args(args: ModelArgs, rank: int, world: int) -> ModelArgs:
    """The config of one rank's layers: its heads and feed-forward width, its vocabulary rows."""
    problems = []
    if args.n_kv_heads % world:
        problems.append(
            f"the model's {args.n_kv_heads} key/value heads (and {args.n_heads} query heads) cannot be shared "
            f"evenly by {world} ranks"
        )
    if args.hidden_dim % world:
        problems.append(f"its feed-forward width {args.hidden_dim} is not a multiple of {world}")
    if vocabulary_rows(args.vocab_size, world)[-1][1] == 0:
        problems.append(f"its vocabulary of {args.vocab_size} tokens leaves the last of {world} ranks none")
    if problems:
        divisors = [n for n in range(1, args.n_kv_heads + 1) if args.n_kv_heads % n == 0 and args.hidden_dim % n == 0]
        raise PlainLlamaError(
            f"{world} ranks: " + "; ".join(problems) + f" (rank counts that work: {', '.join(map(str, divisors))})"
        )
    _, rows = vocabulary_rows(args.vocab_size, world)[rank]
    return replace(
        args,
        n_heads=args.n_heads // world,
        n_kv_heads=args.n_kv_heads // world,
        hidden_dim=args.hidden_dim // world,
        head_dim=args.head_dim,  # no longer dim / n_heads on a rank
        vocab_size=rows,
    )


def cuts(args: ModelArgs, rank: int, world: int) -> dict[str, Cut]:
    """The cut of every matrix a rank holds a part of, by the matrix's name within a layer (or the whole model)."""
    Hd, H, K, F = args.head_dim, args.n_heads // world, args.n_kv_heads // world, args.hidden_dim // world
    start, rows = vocabulary_rows(args.vocab_size, world)[rank]
    return {
        "attention.wq.weight": Cut(0, rank * H * Hd, H * Hd),
        "attention.wk.weight": Cut(0, rank * K * Hd, K * Hd),
        "attention.wv.weight": Cut(0, rank * K * Hd, K * Hd),
        "attention.wo.weight": Cut(1, rank * H * Hd, H * Hd),
        "feed_forward.w1.weight": Cut(0, rank * F, F),
        "feed_forward.w3.weight": Cut(0, rank * F, F),
        "feed_forward.w2.weight": Cut(1, rank * F, F),
        "tok_embeddings.weight": Cut(0, start, rows),
        "output.weight": Cut(0, start, rows),
    }


def _narrowed(full: torch.Tensor, cut: Cut) -> torch.Tensor:
    """The cut of a float matrix: a view for rows, a copy for columns (the source pages then dropped)."""
    piece = full.narrow(cut.axis, cut.start, cut.length)
    if cut.axis == 0:
        return piece
    copy = piece.contiguous()
    release(full, copy)
    return copy


def _from_shards(parts: list[torch.Tensor], axis: int | None, cut: Cut) -> torch.Tensor:
    """The cut taken from Meta's shard parts (joined along `axis`) without joining them first: with
    as many ranks as shards, rank i's cut is exactly shard i's part, and nothing else is read."""
    if axis is None:
        return _narrowed(parts[0], cut)
    if axis != cut.axis:  # e.g. an embedding cut by width in the files, by vocabulary here
        return torch.cat([_narrowed(part, cut) for part in parts], dim=axis)
    pieces, offset = [], 0
    for part in parts:
        size = part.shape[axis]
        lo, hi = max(cut.start, offset), min(cut.start + cut.length, offset + size)
        if lo == offset and hi == offset + size:
            pieces.append(part)  # the whole part: shard i of N for rank i of N
        elif lo < hi:
            pieces.append(_narrowed(part, Cut(axis, lo - offset, hi - lo)))
        offset += size
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=axis)


def _raw_cut(raw: torch.Tensor, type_name: str, shape: tuple[int, int], cut: Cut) -> torch.Tensor:
    """The cut of a stored matrix's bytes (uint8, 1-D; quantized rows are runs of blocks)."""
    rows = raw.view(shape[0], byte_size(type_name, shape[1]))  # [rows, bytes per row]
    if cut.axis == 0:
        return rows[cut.start : cut.start + cut.length].reshape(-1)
    first, count = byte_size(type_name, cut.start), byte_size(type_name, cut.length)
    copy = rows[:, first : first + count].contiguous().reshape(-1)
    release(raw, copy)
    return copy


def _cut_record(record: CheckpointTensor, shape: tuple[int, int], cut: Cut, name: str) -> CheckpointTensor:
    if cut.axis == 1 and (cut.start % block_size(record.type) or cut.length % block_size(record.type)):
        raise PlainLlamaError(
            f"{name} is stored as {record.type} in blocks of {block_size(record.type)} weights along its width, and "
            f"this many ranks would cut it at column {cut.start} (width {cut.length}), inside a block; use fewer ranks"
        )
    new_shape = (cut.length, shape[1]) if cut.axis == 0 else (shape[0], cut.length)
    if record.raw is not None:
        source_raw = record.raw

        def raw() -> torch.Tensor:
            return _raw_cut(source_raw(), record.type, shape, cut)

        def load_raw() -> torch.Tensor:
            return dequantize(raw(), record.type, new_shape)

        return CheckpointTensor(record.type, load_raw, raw)
    source = record.load
    parts = getattr(source, "parts", None)
    if parts is not None:  # Meta's shards (formats/meta.py ShardParts)

        def load() -> torch.Tensor:
            return _from_shards(parts, source.axis, cut)  # type: ignore[attr-defined]

    else:

        def load() -> torch.Tensor:
            return _narrowed(source(), cut)

    return CheckpointTensor(record.type, load)


def rank_checkpoint(checkpoint: Checkpoint, rank: int, world: int) -> Checkpoint:
    """`checkpoint` as rank `rank` of `world` holds it: its config and its cut of every matrix."""
    shapes = expected_shapes(checkpoint.args)
    layer_cuts = cuts(checkpoint.args, rank, world)
    local = rank_args(checkpoint.args, rank, world)
    tensors: dict[str, CheckpointTensor] = {}
    made: dict[int, CheckpointTensor] = {}  # a tied embedding and output are one record, cut once
    for name, record in checkpoint.tensors.items():
        short = name.split(".", 2)[2] if name.startswith("layers.") else name
        cut = layer_cuts.get(short)
        if cut is None:  # norms: every rank holds them whole
            tensors[name] = record
            continue
        if id(record) not in made:
            made[id(record)] = _cut_record(record, shapes[name], cut, name)  # type: ignore[arg-type]
        tensors[name] = made[id(record)]
    return replace(checkpoint, args=local, tensors=tensors)
