"""A kernel change measured against a git revision's kernels, in one process, alternating, with the
outputs compared bit for bit: the working tree's C kernels and those of REV (default HEAD) are both
built at the level PLAINLLAMA_ISA asks for, and the same products (the four 1B layer shapes, random
blocks of each GGUF type, as benchmarks/products.py) run on each in turn.

    .venv/bin/python benchmarks/kernels_ab.py [--against REV] [--rows 512] [--rounds 7] [Q6_K,Q4_0,...]
    .venv/bin/python benchmarks/kernels_ab.py --rows 1 --layers 16 [--against REV] [Q8_0,...]
    .venv/bin/python benchmarks/kernels_ab.py --amx [--against REV] [F16,Q8_0,...]
    .venv/bin/python benchmarks/kernels_ab.py --prefill FILE.gguf [--rows 512] [--against REV]
    .venv/bin/python benchmarks/kernels_ab.py --decode FILE.gguf [--rows 32] [--against REV]

Prints GOP/s for both, the ratio (working tree / REV), and whether every output agrees bit for bit
(a change that only reorders the work must keep the bits; one that changes the arithmetic says so).
Rows go DIRECT_CALL_ROWS a call, as a prompt's do where prompts take the int8 kernels; --rows 1 times
decoding's products. --amx times amx_matmul.c instead (the four shapes in one call each, and
amx_swiglu on the stacked gate and up [16384, 2048]); --prefill a whole prompt of --rows tokens of
a model file, each build's kernels in turn (tok/s; the logits compared); --decode, --rows decode
steps of a model file after a 64-token prompt, each build in turn (tok/s). --layers N holds N copies of
the four matrices, as a model's layers are, and times a pass over all of them: with --rows 1, decoding
as it reads its weights from memory (one set of the four, ~60 MB in Q8_0, stays in a large L3 cache
and measures the arithmetic instead); GB/s read is printed beside. Only in-process alternation
is meaningful on a shared machine: two runs of one build differ by up to 10%.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from products import SHAPES, gguf_weight, placed  # noqa: E402

from plainllama.cli.bench import read_buffer  # noqa: E402
from plainllama.engine.cpu import kernels  # noqa: E402
from plainllama.engine.cpu.packed import PackedWeight  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def library_from(revision: str, level: str, folder: Path):
    """The kernels as they were at `revision`, built at `level` (cached like the working tree's). A
    file the working tree has and `revision` had not (a newer kernel) is left out of its build."""
    present = set()
    for path in [*kernels.SOURCES, kernels.HEADER, *kernels.INTERNAL_HEADERS]:
        relative = path.relative_to(ROOT).as_posix()
        shown = subprocess.run(["git", "show", f"{revision}:{relative}"], cwd=ROOT, capture_output=True)
        if shown.returncode != 0:
            if path != kernels.HEADER and b"exists on disk, but not in" in shown.stderr:
                continue
            raise SystemExit(f"{relative} at {revision}: {shown.stderr.decode().strip()}")
        (folder / path.name).write_bytes(shown.stdout)
        present.add(path)
    kernels._library_at.cache_clear()
    kept = kernels.SOURCES, kernels.HEADER, kernels.INTERNAL_HEADERS, kernels.PROTOTYPES
    try:
        kernels.SOURCES = [folder / p.name for p in kept[0] if p in present]
        kernels.HEADER = folder / kept[1].name
        kernels.INTERNAL_HEADERS = [folder / p.name for p in kept[2] if p in present]
        kernels.PROTOTYPES = kernels._prototypes()  # the functions `revision`'s header declares
        return kernels._library_at(level)
    finally:
        kernels.SOURCES, kernels.HEADER, kernels.INTERNAL_HEADERS, kernels.PROTOTYPES = kept
        kernels._library_at.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("types", nargs="?", default="Q4_0,Q8_0,Q4_K,Q5_K,Q6_K,Q3_K,Q2_K,F16")
    parser.add_argument("--against", default="HEAD", help="the git revision whose kernels are the baseline")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--layers", type=int, default=1, help="copies of the four matrices, as a model's layers")
    parser.add_argument("--amx", action="store_true", help="time amx_matmul and amx_swiglu (a CPU with AMX)")
    parser.add_argument("--prefill", metavar="FILE", help="time a whole prompt of --rows tokens of this model file")
    parser.add_argument("--decode", metavar="FILE", help="time --rows decode steps of this model file")
    args = parser.parse_args()

    level = kernels.requested_level()
    working = kernels._library_at(level)
    with tempfile.TemporaryDirectory() as folder:
        baseline = library_from(args.against, level, Path(folder))
    if working is None or baseline is None:
        raise SystemExit(f"no kernels build at level {level} here")
    capped = f" (PLAINLLAMA_ISA={level})" if level != "amx" else ""  # amx: the default, no cap
    built = f"kernels {kernels.isa()}{capped}"
    print(f"{torch.get_num_threads()} threads, {args.rows} rows, {built}; working tree against {args.against}")
    flops = 2 * args.rows * sum(n * k for n, k in SHAPES)
    libraries = {args.against: baseline, "working tree": working}
    if args.prefill:
        return prefill_ab(args.prefill, args.rows, args.rounds, libraries, args.against)
    if args.decode:
        return decode_ab(args.decode, args.rows, args.rounds, libraries, args.against)
    if args.amx:
        return amx_ab(args.types, args.rows, args.rounds, libraries, args.against)
    for type_name in args.types.split(","):
        layer = [gguf_weight(type_name, n, k) for n, k in SHAPES]
        weights = layer + [
            PackedWeight(w.layout, w.shape, {n: placed(getattr(w, n)) for n in w.part_names})
            for _ in range(args.layers - 1)
            for w in layer
        ]
        xs = [torch.randn(args.rows, k) for _, k in SHAPES] * args.layers
        name = weights[0].direct_call()[0].__name__
        best = dict.fromkeys(libraries, float("inf"))
        outputs: dict[str, list[torch.Tensor]] = {}
        # decoding's bound: the read loop over as many bytes, in the same rounds (from memory only
        # where the weights are: --layers > 1)
        buffer = read_buffer(sum(w.nbytes for w in weights)) if args.rows == 1 and args.layers > 1 else None
        best_read = float("inf")
        for round_ in range(args.rounds):
            if buffer is not None:
                start = time.perf_counter()
                kernels.read_bytes(buffer)
                best_read = min(best_read, time.perf_counter() - start)
            for label, library in in_turn(libraries, round_):
                for w in weights:  # the same pointers, the other library's function
                    w._direct = (getattr(library, name), w.direct_call()[1])
                start = time.perf_counter()
                outputs[label] = [w.matmul_each_row(x) for w, x in zip(weights, xs, strict=True)]
                best[label] = min(best[label], time.perf_counter() - start)
        same = all(torch.equal(a, b) for a, b in zip(*outputs.values(), strict=True))
        rates = {label: args.layers * flops / seconds / 1e9 for label, seconds in best.items()}
        read = sum(w.nbytes for w in weights) / 1e9
        print(
            f"{type_name:5s} ({name}): "
            + ", ".join(f"{label} {rate:6.1f}" for label, rate in rates.items())
            + " GOP/s ("
            + ", ".join(f"{read / best[label]:.1f}" for label in rates)
            + f" GB/s read); ratio {rates['working tree'] / rates[args.against]:.3f}; "
            + ("the same bits" if same else "OTHER BITS")
            + (f"; the read loop {read / best_read:.1f} GB/s" if buffer is not None else "")
        )
        del buffer


def in_turn(libraries: dict, round_: int) -> list:
    """The builds in the order of this round: reversed every other round, so that neither build is
    always the one that runs first (identical builds measured 0.97-1.07 in one order)."""
    items = list(libraries.items())
    return items if round_ % 2 == 0 else items[::-1]


def report(what: str, rates: dict[str, float], unit: str, same: bool, against: str) -> None:
    print(
        f"{what}: "
        + ", ".join(
            f"{label} {rate:.2f}" if unit == "TFLOP/s" else f"{label} {rate:.1f}" for label, rate in rates.items()
        )
        + f" {unit}; ratio {rates['working tree'] / rates[against]:.3f}; "
        + ("the same bits" if same else "OTHER BITS")
    )


def amx_ab(types: str, rows: int, rounds: int, libraries: dict, against: str) -> None:
    """amx_matmul on the four shapes (one call each) and amx_swiglu on [16384, 2048], per build."""
    F, K = 8192, 2048
    for type_name in types.split(","):
        weights = [gguf_weight(type_name, n, k) for n, k in SHAPES]
        stacked = gguf_weight(type_name, 2 * F, K)
        parts = [w.c_part() for w in [*weights, stacked]]
        xs = [torch.randn(rows, k) for _, k in SHAPES]
        scratch = torch.empty(rows * max(k for _, k in SHAPES) + 64, dtype=torch.bfloat16)
        outputs: dict[str, list[torch.Tensor]] = {}
        best = {(label, kind): float("inf") for label in libraries for kind in ("matmul", "swiglu")}
        for round_ in range(rounds):
            for label, library in in_turn(libraries, round_):
                outs = [torch.empty(rows, n) for n, _ in SHAPES] + [torch.empty(rows, F)]
                start = time.perf_counter()
                for x, part, out, (n, k) in zip(xs, parts, outs, SHAPES, strict=False):
                    kernels.check(
                        library.amx_matmul(
                            x.data_ptr(), rows, k, ctypes.byref(part), n, out.data_ptr(), scratch.data_ptr()
                        ),
                        "amx_matmul",
                    )
                middle = time.perf_counter()
                kernels.check(
                    library.amx_swiglu(
                        xs[0].data_ptr(), rows, K, ctypes.byref(parts[-1]), F, outs[-1].data_ptr(), scratch.data_ptr()
                    ),
                    "amx_swiglu",
                )
                end = time.perf_counter()
                best[label, "matmul"] = min(best[label, "matmul"], middle - start)
                best[label, "swiglu"] = min(best[label, "swiglu"], end - middle)
                outputs[label] = outs
        same = [torch.equal(a, b) for a, b in zip(*outputs.values(), strict=True)]
        flops = {"matmul": 2 * rows * sum(n * k for n, k in SHAPES), "swiglu": 2 * rows * 2 * F * K}
        for kind in ("matmul", "swiglu"):
            rates = {label: flops[kind] / best[label, kind] / 1e12 for label in libraries}
            report(
                f"{type_name:5s} amx_{kind}",
                rates,
                "TFLOP/s",
                all(same[:-1]) if kind == "matmul" else same[-1],
                against,
            )


def each_build(llm, libraries: dict, rounds: int):
    """Yields each build's label, `rounds` times, in turns (in_turn), with that build's kernels in use
    by `llm`: kernels looked up per call come from it, and the direct ones each matrix keeps
    (PackedWeight.direct_call) are dropped to be looked up again. The kernels are restored after."""
    kept = kernels._library
    try:
        for round_ in range(rounds):
            for label, library in in_turn(libraries, round_):
                kernels._library = lambda library=library: library  # type: ignore[assignment]
                for module in llm.model.modules():
                    packed = getattr(module, "packed", None)
                    if packed is not None and hasattr(packed, "_direct"):
                        del packed._direct
                yield label
    finally:
        kernels._library = kept  # type: ignore[assignment]


def decode_ab(path: str, steps: int, rounds: int, libraries: dict, against: str) -> None:
    """`steps` decode steps after a 64-token prompt (bench's text), greedy, each build's kernels in turn;
    the best round's tok/s; the last step's logits compared."""
    import plainllama
    from plainllama.cli.bench import prompt_ids
    from plainllama.model import KVCache

    llm = plainllama.load(path, device="cpu")
    prompt = torch.tensor([prompt_ids(llm, 64)])
    best = dict.fromkeys(libraries, float("inf"))
    logits: dict[str, torch.Tensor] = {}
    for label in each_build(llm, libraries, rounds):
        cache = KVCache(llm.model.args, 1, 64 + steps, llm.dtype, llm.device)
        with torch.inference_mode():
            out = llm.model(prompt, 0, cache, last_only=True)
            start = time.perf_counter()
            for step in range(steps):
                out = llm.model(out[:, -1:].argmax(-1), 64 + step, cache, last_only=True)
            best[label] = min(best[label], time.perf_counter() - start)
        logits[label] = out
    rates = {label: steps / seconds for label, seconds in best.items()}
    report(f"{Path(path).name} decode of {steps}", rates, "tok/s", torch.equal(*logits.values()), against)


def prefill_ab(path: str, tokens: int, rounds: int, libraries: dict, against: str) -> None:
    """A whole prompt of `tokens` tokens (bench's text), each build's kernels in turn (each_build),
    best of `rounds`; the logits compared."""
    import plainllama
    from plainllama.cli.bench import prompt_ids
    from plainllama.model import KVCache

    llm = plainllama.load(path, device="cpu")
    ids = torch.tensor([prompt_ids(llm, tokens)])
    best = dict.fromkeys(libraries, float("inf"))
    logits: dict[str, torch.Tensor] = {}
    for label in each_build(llm, libraries, rounds):
        cache = KVCache(llm.model.args, 1, tokens, llm.dtype, llm.device)
        start = time.perf_counter()
        with torch.inference_mode():
            logits[label] = llm.model(ids, 0, cache, last_only=True)
        best[label] = min(best[label], time.perf_counter() - start)
    rates = {label: tokens / seconds for label, seconds in best.items()}
    report(f"{Path(path).name} prefill of {tokens}", rates, "tok/s", torch.equal(*logits.values()), against)


if __name__ == "__main__":
    main()
