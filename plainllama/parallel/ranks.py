"""Joining the other ranks: PyTorch's own process group (torch.distributed), set up from the
environment that `torchrun` (or `plainllama ... --tp N`, launch.py) gives each process:
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK, LOCAL_WORLD_SIZE.

Backend: gloo between CPUs (TCP), NCCL between CUDA GPUs. Every collective has a deadline
(PLAINLLAMA_TP_TIMEOUT seconds, default 60): a rank that dies closes its connections and the others
fail at once; one that hangs is given up on when the deadline passes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import PlainLlamaError
from ..sampling import Sampler

DEFAULT_TIMEOUT_SECONDS = 60


@dataclass(frozen=True)
class Ranks:
    rank: int  # this process's place, 0 .. world - 1; rank 0 talks to the user
    world: int  # how many processes share each layer
    local_rank: int  # its place among the ranks on this machine (which GPU it takes)
    local_world: int  # ranks on this machine (they share its cores)
    address: str  # where rank 0 meets the others, host:port

    @property
    def leader(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise PlainLlamaError(f"WORLD_SIZE is set, but {name} is not: start the ranks with torchrun or --tp N")
        return default
    try:
        return int(value)
    except ValueError:
        raise PlainLlamaError(f"{name}={value!r} in the environment is not a number") from None


def timeout() -> timedelta:
    seconds = os.environ.get("PLAINLLAMA_TP_TIMEOUT", str(DEFAULT_TIMEOUT_SECONDS))
    try:
        return timedelta(seconds=float(seconds))
    except ValueError:
        raise PlainLlamaError(f"PLAINLLAMA_TP_TIMEOUT={seconds!r} is not a number of seconds") from None


def from_environment() -> Ranks | None:
    """This process's place among the ranks, joining their process group on first use; None when
    it runs alone (no WORLD_SIZE, or 1)."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return None
    rank = _env_int("RANK")
    if not 0 <= rank < world:
        raise PlainLlamaError(f"RANK={rank} is not between 0 and WORLD_SIZE - 1 = {world - 1}")
    address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    ranks = Ranks(rank, world, _env_int("LOCAL_RANK", rank), _env_int("LOCAL_WORLD_SIZE", world), address)
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        try:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout())
        except (RuntimeError, ValueError) as e:  # torch's DistStoreError / DistNetworkError are RuntimeErrors
            raise PlainLlamaError(
                f"rank {rank} of {world} could not meet the others at {address} "
                f"within {timeout().total_seconds():.0f} s "
                f"({str(e).strip().splitlines()[0]})"
            ) from None
    return ranks


def leave() -> None:
    """End this process's part in the group, once its command is done. Without it, gloo's threads are
    still running when the interpreter exits, and a rank now and then died with `terminate called
    without an active exception` (SIGABRT) after a clean run (seen once in CI, a served rank)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def agree_on_model(ranks: Ranks, fingerprint: str, path: str) -> None:
    """Every rank must have loaded the same model: a rank whose config or tensor table differs from
    rank 0's would compute nonsense in step with the others."""
    everyone: list[str | None] = [None] * ranks.world
    dist.all_gather_object(everyone, (fingerprint, path))
    leader = everyone[0]
    for rank, theirs in enumerate(everyone):
        if theirs is not None and leader is not None and theirs[0] != leader[0]:
            raise PlainLlamaError(
                f"rank {rank} loaded a different model ({theirs[1]}) from rank 0's ({leader[1]}): their configs or "
                "tensor tables differ; give every machine the same files"
            )


def model_fingerprint(checkpoint) -> str:
    """A hash of the config and the tensor table (names and stored types): what must match across ranks."""
    table = sorted((name, record.type) for name, record in checkpoint.tensors.items())
    return hashlib.sha256(repr((checkpoint.args, table)).encode()).hexdigest()


def share_object(ranks: Ranks, value):
    """Rank 0's `value` on every rank (a prompt read from stdin, which only rank 0 can read)."""
    box = [value if ranks.leader else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class LeaderSampler(Sampler):
    """A sampler whose choice is rank 0's: rank 0 draws the token and broadcasts it, so every rank
    feeds the same token to the next step whatever its own random state. (The gathered logits are
    the same on every rank; this makes the same token a guarantee, not a coincidence.)"""

    def __init__(self, sampler: Sampler, ranks: Ranks):
        vars(self).update(vars(sampler))  # its settings and its random generator
        self.ranks = ranks

    def _leaders(self, token: int | None) -> int:
        chosen = torch.tensor([token if token is not None else 0])
        dist.broadcast(chosen, src=0)
        return int(chosen)

    def __call__(self, logits: torch.Tensor, history=(), generated=()) -> int:
        return self._leaders(super().__call__(logits, history, generated) if self.ranks.leader else None)

    def draw(self, probs: torch.Tensor) -> int:  # speculative decoding's draws
        return self._leaders(super().draw(probs) if self.ranks.leader else None)
