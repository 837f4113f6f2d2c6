"""A model's decode products grouped by how their weights are held, each group against the memory's
read speed, in one process taking turns: which layout of a file keeps a decode step from the bound.

    .venv/bin/python benchmarks/layouts.py -m FILE [--rounds 15]

For each layout ("q4", "q4 K-quant scales", "q6", "q8", "f16", ...) the layers' matrices are
multiplied by one row (as a decode step does, PackedWeight.matmul_each_row) one after another, and a
1 GiB read of the same machine is timed between groups; medians over the rounds. The output
projection is its own group ("... output"); the embedding table is left out (decode reads one row).
(Figures and what they decided: docs/performance.md.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import plainllama
from plainllama.cli.bench import _read_seconds, read_buffer
from plainllama.engine.cpu import kernels
from plainllama.engine.cpu.packed import PackedLinear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("the C kernels do not run on this CPU")
    model = plainllama.load(args.model, device="cpu").model
    groups: dict[str, list] = {}
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            w = module.packed
            kind = w.layout + (" K-quant scales" if w.k_scales else "") + (" output" if name == "output" else "")
            groups.setdefault(kind, []).append(w)
    xs = {k: torch.randn(1, k) for k in {w.shape[1] for ws in groups.values() for w in ws}}
    buffer = read_buffer(1 << 30)
    times: dict[str, list[float]] = {kind: [] for kind in groups}
    reads: list[float] = []
    for _ in range(args.rounds):
        for kind, weights in groups.items():
            start = time.perf_counter()
            for w in weights:
                w.matmul_each_row(xs[w.shape[1]])
            times[kind].append(time.perf_counter() - start)
            reads.append(_read_seconds(buffer))
    read_rate = buffer.numel() * buffer.element_size() / statistics.median(reads)
    print(f"{args.model}: {torch.get_num_threads()} threads, read {read_rate / 1e9:.1f} GB/s (median of {len(reads)})")
    total = 0.0
    for kind, weights in groups.items():
        nbytes, seconds = sum(w.nbytes for w in weights), statistics.median(times[kind])
        total += seconds
        print(
            f"{kind:22s} {len(weights):3d} matrices {nbytes / 2**20:8.1f} MiB {seconds * 1e3:7.2f} ms "
            f"{nbytes / seconds / 1e9:5.1f} GB/s ({nbytes / seconds / read_rate:.0%} of the read)"
        )
    print(f"all products of a decode step: {total * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
