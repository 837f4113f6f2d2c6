"""Issue 18's table for this CPU in one command: plainllama against llama.cpp on the 1B-shaped files,
the fractions of this machine's own bounds, the AVX2 level against llama.cpp built for AVX2 only,
and the memory of PLAINLLAMA_ISA=none, with each target marked met or short.

    .venv/bin/python benchmarks/cpu_targets.py [--repeats 3] [--files Q4_0,Q8_0,...]

Needs the test set-up (scripts/setup.sh --test: llama-cpp-python, gguf) and, for the AVX2 rows,
benchmarks/avx2.sh's build in build/llama-cpp-avx2 (the rows are left out without it). Each file runs
in a process of its own, plainllama and llama.cpp loaded side by side and measured in turns (the
machines are shared and noisy: only ratios measured side by side mean anything):
  decode   32 greedy steps after a 64-token prompt (compare_generate.py's runners), best of --repeats;
  prefill  one pass over 512 tokens, best of --repeats;
  bound    `plainllama bench` in the same process: decode's bytes per token against the best read
           of this machine measured around it, and the prefill's arithmetic against a bfloat16
           matrix product measured right after it.
About 2 minutes per file on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"]
AVX2_FILES = ["Q8_0", "Q4_K_M", "Q4_0"]
AVX2_BUILD = ROOT / "build" / "llama-cpp-avx2"
# issue 18's targets: (what, threshold)
DECODE_RATIO, PREFILL_RATIO, PREFILL_PEAK, AVX2_RATIO, NONE_MEMORY = 1.2, 1.5, 0.80, 1.0, 1.3
READ_FRACTION = {"F16": 0.85, "BF16": 0.85, "Q8_0": 0.85, "Q4_0": 0.65, "Q4_K_M": 0.65}


def measure_file(path: str, repeats: int, decode_only: bool) -> dict:
    """plainllama and llama.cpp in turns on one file; then `plainllama bench`'s fractions."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import plainllama
    from compare_generate import bench_llama_cpp, bench_plainllama
    from plainllama.cli import bench

    ids = bench.prompt_ids(plainllama.load(path), 512)
    runners = {
        "plainllama": bench_plainllama(path, ids, ids[:64], 32, repeats),
        "llama.cpp": bench_llama_cpp(path, ids, ids[:64], 32, repeats),
    }
    best = {name: [float("inf"), float("inf")] for name in runners}
    for round_ in range(repeats + 1):  # round 0 warms up
        for name, (prefill, decode) in runners.items():
            p = float("inf") if decode_only else prefill()
            d = decode()
            if round_:
                best[name] = [min(best[name][0], p), min(best[name][1], d)]
    result = {
        "decode": {name: 1 / d for name, (_, d) in best.items()},
        "prefill": {name: 512 / p for name, (p, _) in best.items()},
    }
    if not decode_only:
        del runners
        r = bench.run(path, prompt_tokens=512, decode_tokens=32, repeats=2)
        result["read_fraction"] = r["fraction_of_bandwidth"]
        result["peak_fraction"] = r["fraction_of_matrix_peak"]
        result["compute"] = r["compute"]
    return result


def measure_memory(path: str) -> dict:
    """Peak RSS of loading `path` and decoding 8 tokens, and of the runtime alone (torch and plainllama
    imported, nothing loaded), in this process (PLAINLLAMA_ISA=none: PyTorch's weight-only operators)."""
    import plainllama
    from plainllama.cli import bench

    runtime = bench.peak_rss_bytes()
    llm = plainllama.load(path)
    llm.generate("The capital of France is", max_new_tokens=8)
    return {"peak": bench.peak_rss_bytes(), "runtime": runtime, "file": os.path.getsize(path), "compute": llm.compute}


def child(args: list[str], env: dict | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], env={**os.environ, **(env or {})}, capture_output=True, text=True
    )
    if out.returncode:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(f"{' '.join(args)} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mark(value: float, target: float) -> str:
    return f"{value:.2f}x {'met' if value >= target else 'SHORT'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--files", default=",".join(FILES))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one file, in a child process
    parser.add_argument("--decode-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_file(args.one, args.repeats, args.decode_only)))
        return
    if args.memory:
        print(json.dumps(measure_memory(args.memory)))
        return

    made = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "make_models.py"), "--k-quants"], capture_output=True, text=True
    )
    if made.returncode:
        raise SystemExit(made.stderr[-3000:])
    models = {Path(p).stem.split("shape-")[-1]: p for p in made.stdout.split()}
    subprocess.run(["lscpu"], check=False)  # which CPU these figures are for

    print(
        "\n| file | path | decode tok/s plainllama / llama.cpp | vs llama.cpp (>= 1.2x) | of the read bound "
        "| prefill 512 tok/s | vs llama.cpp (>= 1.5x) | of the bf16 peak (>= 80%) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.files.split(","):
        r = child(["--one", models[name], "--repeats", str(args.repeats)])
        d, p = r["decode"], r["prefill"]
        wanted = READ_FRACTION.get(name)
        read = f"{r['read_fraction']:.0%}" + (
            f" {'met' if r['read_fraction'] >= wanted else 'SHORT'} (>= {wanted:.0%})" if wanted else ""
        )
        peak = f"{r['peak_fraction']:.0%} {'met' if r['peak_fraction'] >= PREFILL_PEAK else 'SHORT'}"
        print(
            f"| {name} | {r['compute']} | {d['plainllama']:.1f} / {d['llama.cpp']:.1f} "
            f"| {mark(d['plainllama'] / d['llama.cpp'], DECODE_RATIO)} | {read} "
            f"| {p['plainllama']:.0f} / {p['llama.cpp']:.0f} "
            f"| {mark(p['plainllama'] / p['llama.cpp'], PREFILL_RATIO)} | {peak} |",
            flush=True,
        )

    if (AVX2_BUILD / "llama_cpp").is_dir():
        print("\n| file | PLAINLLAMA_ISA=avx2: decode tok/s plainllama / llama.cpp built for AVX2 | ratio (>= 1.0x) |")
        print("|---|---|---|")
        env = {"PLAINLLAMA_ISA": "avx2", "PYTHONPATH": str(AVX2_BUILD)}
        for name in AVX2_FILES:
            d = child(["--one", models[name], "--repeats", str(args.repeats), "--decode-only"], env)["decode"]
            print(
                f"| {name} | {d['plainllama']:.1f} / {d['llama.cpp']:.1f} "
                f"| {mark(d['plainllama'] / d['llama.cpp'], AVX2_RATIO)} |",
                flush=True,
            )
    else:
        print(f"\n(no AVX2 rows: {AVX2_BUILD} is built by benchmarks/avx2.sh)")

    m = child(["--memory", models["Q4_0"]], {"PLAINLLAMA_ISA": "none"})
    ratio = (m["peak"] - m["runtime"]) / m["file"]
    print(
        f"\nPLAINLLAMA_ISA=none ({m['compute']}), Q4_0 file {m['file'] / 2**20:.0f} MiB: "
        f"peak RSS {m['peak'] / 2**20:.0f} MiB, "
        f"runtime alone {m['runtime'] / 2**20:.0f} MiB: (peak - runtime) / file = {ratio:.2f}x "
        f"{'met' if ratio <= NONE_MEMORY else 'SHORT'} (<= {NONE_MEMORY}x)"
    )


if __name__ == "__main__":
    main()
