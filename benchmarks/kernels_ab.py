"""A kernel change measured against a git revision's kernels, in one process, alternating, with the
outputs compared bit for bit: the working tree's C kernels and those of REV (default HEAD) are both
built at the level PLAINLLAMA_ISA asks for, and the same products (the four 1B layer shapes, random
blocks of each GGUF type, as benchmarks/products.py) run on each in turn.

    .venv/bin/python benchmarks/kernels_ab.py [--against REV] [--rows 512] [--rounds 7] [Q6_K,Q4_0,...]

Prints GOP/s for both, the ratio (working tree / REV), and whether every output agrees bit for bit
(a change that only reorders the work must keep the bits; one that changes the arithmetic says so).
Rows go DIRECT_CALL_ROWS a call, as a prompt's do where prompts take the int8 kernels; --rows 1 times
decoding's products. Only in-process alternation is meaningful on a shared machine: two runs of
one build differ by up to 10%.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from products import SHAPES, gguf_weight  # noqa: E402

from plainllama.engine.cpu import kernels  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def library_from(revision: str, level: str, folder: Path):
    """The kernels as they were at `revision`, built at `level` (cached like the working tree's)."""
    for path in [*kernels.SOURCES, kernels.HEADER, *kernels.INTERNAL_HEADERS]:
        relative = path.relative_to(ROOT).as_posix()
        shown = subprocess.run(["git", "show", f"{revision}:{relative}"], cwd=ROOT, capture_output=True)
        if shown.returncode != 0:
            raise SystemExit(f"{relative} at {revision}: {shown.stderr.decode().strip()}")
        (folder / path.name).write_bytes(shown.stdout)
    kernels._library_at.cache_clear()
    kept = kernels.SOURCES, kernels.HEADER, kernels.INTERNAL_HEADERS
    try:
        kernels.SOURCES = [folder / p.name for p in kept[0]]
        kernels.HEADER = folder / kept[1].name
        kernels.INTERNAL_HEADERS = [folder / p.name for p in kept[2]]
        return kernels._library_at(level)
    finally:
        kernels.SOURCES, kernels.HEADER, kernels.INTERNAL_HEADERS = kept
        kernels._library_at.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("types", nargs="?", default="Q4_0,Q8_0,Q4_K,Q5_K,Q6_K,Q3_K,Q2_K,F16")
    parser.add_argument("--against", default="HEAD", help="the git revision whose kernels are the baseline")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    level = kernels.requested_level()
    working = kernels._library_at(level)
    with tempfile.TemporaryDirectory() as folder:
        baseline = library_from(args.against, level, Path(folder))
    if working is None or baseline is None:
        raise SystemExit(f"no kernels build at level {level} here")
    print(f"{torch.get_num_threads()} threads, {args.rows} rows, level {level}; working tree against {args.against}")
    flops = 2 * args.rows * sum(n * k for n, k in SHAPES)
    libraries = {args.against: baseline, "working tree": working}
    for type_name in args.types.split(","):
        weights = [gguf_weight(type_name, n, k) for n, k in SHAPES]
        xs = [torch.randn(args.rows, k) for _, k in SHAPES]
        name = weights[0].direct_call()[0].__name__
        best = dict.fromkeys(libraries, float("inf"))
        outputs: dict[str, list[torch.Tensor]] = {}
        for _ in range(args.rounds):
            for label, library in libraries.items():
                for w in weights:  # the same pointers, the other library's function
                    w._direct = (getattr(library, name), w.direct_call()[1])
                start = time.perf_counter()
                outputs[label] = [w.matmul_each_row(x) for w, x in zip(weights, xs, strict=True)]
                best[label] = min(best[label], time.perf_counter() - start)
        same = all(torch.equal(a, b) for a, b in zip(*outputs.values(), strict=True))
        rates = {label: flops / seconds / 1e9 for label, seconds in best.items()}
        print(
            f"{type_name:5s} ({name}): "
            + ", ".join(f"{label} {rate:6.1f}" for label, rate in rates.items())
            + f" GOP/s; ratio {rates['working tree'] / rates[args.against]:.3f}; "
            + ("the same bits" if same else "OTHER BITS")
        )


if __name__ == "__main__":
    main()
