"""`plainllama generate ... --tp N` on one machine: start N copies of the same command as ranks
0..N-1, in the environment torchrun would give them, and wait for them.

Rank 0 keeps the terminal (stdin, stdout); the others' stdout goes nowhere, their errors still
reach stderr. Ctrl+C reaches every rank (they share the terminal's process group); SIGTERM sent to
the launcher is passed to rank 0. If a rank fails, the others are given a few seconds to notice (their next collective
fails at once when a peer's connection closes) and are then stopped; the launcher says which rank
ended first and how. (For several machines use torchrun, which does the same across hosts.)
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

GRACE_SECONDS = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_with_the_launcher() -> None:
    """In each rank, before it starts: the kernel sends it SIGTERM when the launcher dies, however it
    dies (a SIGKILL included), so that no rank is left serving or waiting on its own (Linux)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def how_it_ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def rank_environment(rank: int, world: int, port: int, **extra: str) -> dict[str, str]:
    """This process's environment plus what torchrun gives rank `rank` of `world` on one machine,
    meeting at 127.0.0.1:`port` (the tests and benchmarks start ranks with it too)."""
    return dict(
        os.environ,
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        **extra,
    )


def the_cause(ranks: list[subprocess.Popen]) -> tuple[int, int]:
    """(rank, exit code) of the rank whose failure ended the run. A rank killed by a signal is the
    cause of the others' `lost contact` errors, and they can exit within the same poll, so wait a
    moment for the dead to be reaped and name a rank killed by a signal before one that exited."""
    time.sleep(0.25)
    failed = [(rank, code) for rank, p in enumerate(ranks) if (code := p.poll()) not in (None, 0)]
    return min(failed, key=lambda failure: (failure[1] > 0, failure[0]))


def run_ranks(world: int, argv: list[str]) -> int:
    """Run `python -m plainllama *argv` as `world` ranks; the exit status is rank 0's, or the
    first failed rank's if rank 0 succeeded."""
    port = free_port()
    ranks = []
    for rank in range(world):
        env = rank_environment(rank, world, port)
        follower = rank > 0
        ranks.append(
            subprocess.Popen(
                [sys.executable, "-m", "plainllama", *argv],
                env=env,
                stdin=subprocess.DEVNULL if follower else None,
                stdout=subprocess.DEVNULL if follower else None,
                preexec_fn=end_with_the_launcher if sys.platform.startswith("linux") else None,
            )
        )
    # SIGTERM (a service manager stopping us) goes to rank 0, which ends the run for every rank:
    # a server drains its clients first, a generation stops and the others notice
    signal.signal(signal.SIGTERM, lambda signum, frame: ranks[0].send_signal(signal.SIGTERM))
    first_failure: tuple[int, int] | None = None
    deadline = None
    try:
        while any(p.poll() is None for p in ranks):
            if first_failure is None and any(p.poll() not in (None, 0) for p in ranks):
                first_failure = the_cause(ranks)
                deadline = time.monotonic() + GRACE_SECONDS
            if deadline is not None and time.monotonic() > deadline:
                for p in ranks:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
    except KeyboardInterrupt:  # Ctrl+C reached every rank too (one process group): let them finish quietly
        for p in ranks:
            try:
                p.wait(timeout=GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                p.kill()
        return 130
    if first_failure is None and any(p.returncode != 0 for p in ranks):
        # every rank ended within one poll (a killed rank's peers notice at once): name the cause too
        first_failure = the_cause(ranks)
    if first_failure is not None:
        rank, code = first_failure
        if code != 130:  # Ctrl+C needs no explanation
            print(
                f"plainllama: rank {rank} of {world} {how_it_ended(code)}; the other ranks were stopped",
                file=sys.stderr,
            )
    leader = ranks[0].returncode
    if leader != 0:
        return leader if leader > 0 else 128 - leader
    return 0 if first_failure is None else (first_failure[1] if first_failure[1] > 0 else 128 - first_failure[1])
