"""Tensor parallelism on one machine, and what it would do across several.

    .venv/bin/python benchmarks/parallel.py -m MODEL.gguf [--ranks 1,2,4] [--decode-tokens 32]

1. The collectives alone: N gloo ranks on the loopback interface all-reduce a vector of the model's
   width (what each layer does twice per token) and a 4 MiB one: the per-message latency and the
   bandwidth of this machine's gloo.
2. `plainllama bench --tp N --threads 1` for each N: decode tokens/s, the time rank 0 spent in
   collectives per token, and every rank's peak RSS.
3. A model of decode speed across machines, for Llama 3 8B and 70B shapes at 4.5 bits per weight
   (Q4_0) on 2-8 machines linked by 1 GbE or 10 GbE: per token, each machine reads its 1/N of the
   weights at MEMORY_GB_S, then 2 x layers + 2 collectives each cost 2 (N - 1) ring steps of
   (latency + message / N / bandwidth). Beside it, distributed-llama's published figures for Llama 3
   8B Q40 on Raspberry Pi 5 boards (its README, v0.3.1: Q80 buffers over a gigabit switch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from plainllama.parallel.launch import free_port, rank_environment

PROBE = r"""
import json, os, sys, time
import torch, torch.distributed as dist
torch.set_num_threads(1)
dist.init_process_group("gloo")
def seconds(numel, repeats):
    x = torch.zeros(numel)
    dist.all_reduce(x)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(x)
    return (time.perf_counter() - start) / repeats
def gathered_sum_seconds(numel, repeats):  # what tensor_parallel.Collectives does for small messages
    x = torch.zeros(numel)
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_gather(pieces, x)
        torch.sum(torch.stack(pieces), dim=0, out=x)
    return (time.perf_counter() - start) / repeats
width = int(sys.argv[1])
small = min(seconds(width, 200) for _ in range(3))
gathered = min(gathered_sum_seconds(width, 200) for _ in range(3))
large = min(seconds(1 << 20, 10) for _ in range(3))
if dist.get_rank() == 0:
    print(json.dumps({"latency_s": small, "gathered_s": gathered, "bandwidth_b_s": (1 << 22) / large}))
dist.destroy_process_group()
"""

# Llama 3 shapes: layers, width, vocabulary, parameters (billions)
SHAPES = {"Llama 3 8B": (32, 4096, 128256, 8.03), "Llama 3 70B": (80, 8192, 128256, 70.6)}
LINKS = {"1 GbE": (117e6, 150e-6), "10 GbE": (1.17e9, 50e-6)}  # payload bytes/s, one-way latency + switch
BITS_PER_WEIGHT = 4.5  # Q4_0: 18 bytes per 32 weights
# distributed-llama README (v0.3.1), Llama 3 8B Q40 on Raspberry Pi 5 8 GB boards: ms per token
DISTRIBUTED_LLAMA_PI5 = {1: 564.31, 2: 444.27, 4: 331.47}


def rank_env(rank: int, world: int, port: int) -> dict:
    return rank_environment(rank, world, port, OMP_NUM_THREADS="1")


def probe(world: int, width: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(PROBE)
    port = free_port()
    ranks = [
        subprocess.Popen(
            [sys.executable, f.name, str(width)], env=rank_env(r, world, port), stdout=subprocess.PIPE, text=True
        )
        for r in range(world)
    ]
    out = [p.communicate(timeout=600)[0] for p in ranks]
    os.unlink(f.name)
    return json.loads(out[0])


def bench(model: str, world: int, decode_tokens: int) -> dict:
    command = [sys.executable, "-m", "plainllama", "bench", "-m", model, "--threads", "1", "--json"]
    command += ["--prompt-tokens", "32", "--decode-tokens", str(decode_tokens), "--repeats", "2", "--tp", str(world)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def ring_seconds(message_bytes: float, world: int, bandwidth: float, latency: float) -> float:
    """A ring all-reduce: N - 1 steps of reduce-scatter and N - 1 of all-gather, each moving 1/N of the message."""
    return 2 * (world - 1) * (latency + message_bytes / world / bandwidth)


def modelled_tokens_per_second(shape, world: int, memory_b_s: float, link, software_latency: float) -> float:
    layers, width, vocab, billions = shape
    compute = billions * 1e9 * BITS_PER_WEIGHT / 8 / world / memory_b_s
    bandwidth, latency = link
    per_reduce = ring_seconds(width * 4, world, bandwidth, latency + software_latency)  # float32 sums
    gather = (world - 1) * (latency + software_latency + vocab / world * 4 / bandwidth)  # the logits
    return 1 / (compute + (2 * layers + 1) * per_reduce + gather)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--decode-tokens", type=int, default=32)
    args = parser.parse_args()
    worlds = [int(n) for n in args.ranks.split(",")]

    runs = {world: bench(args.model, world, args.decode_tokens) for world in worlds}
    width = 2048  # the 1B shape's; the probe's message is one layer's all-reduce
    probes = {world: probe(world, width) for world in worlds if world > 1}

    print(f"model: {args.model}")
    print("\n| ranks | decode tok/s | vs 1 rank | collectives ms/token | share of the step | peak RSS per rank (MiB) |")
    print("|---|---|---|---|---|---|")
    single = runs[worlds[0]]["decode_tokens_per_second"]
    for world, r in runs.items():
        tps = r["decode_tokens_per_second"]
        coll = r.get("collective_seconds_per_token")
        rss = r.get("peak_rss_mib_per_rank", [r["peak_rss_mib"]])
        share = f"{coll * tps:.0%}" if coll else "-"
        coll_ms = f"{coll * 1000:.1f}" if coll else "-"
        per_rank = ", ".join(f"{m:.0f}" for m in rss)
        print(f"| {world} | {tps:.2f} | {tps / single:.2f}x | {coll_ms} | {share} | {per_rank} |")
    print(
        "\n| ranks | gloo all-reduce of 2048 floats (us) | all-gather + sum, as plainllama does (us) "
        "| gloo all-reduce bandwidth, 4 MiB (GB/s) |"
    )
    print("|---|---|---|---|")
    for world, p in probes.items():
        print(
            f"| {world} | {p['latency_s'] * 1e6:.0f} | {p['gathered_s'] * 1e6:.0f} | {p['bandwidth_b_s'] / 1e9:.2f} |"
        )

    memory = runs[worlds[0]]["sustained_read_bandwidth_gb_s"] * 1e9
    # per ring step: a ring all-reduce at N = 2 is 2 steps
    software = min(p["latency_s"] for p in probes.values()) / 2 if probes else 0.0
    print(
        f"\nModel: each machine reads weights at {memory / 1e9:.1f} GB/s (this machine's sustained read), "
        f"{BITS_PER_WEIGHT} bits per weight, float32 sums; per ring step the link's latency plus the software's: "
        f"{software * 1e6:.0f} us (this machine's gloo, measured above, ranks sharing its cores) or none (the wire "
        "alone: the bound for a leaner transport)."
    )
    print("\n| model | link | software per step | " + " | ".join(f"{n} machines tok/s" for n in (1, 2, 4, 8)) + " |")
    print("|---|---|---|" + "---|" * 4)
    for name, shape in SHAPES.items():
        for link_name, link in LINKS.items():
            for overhead in (software, 0.0):
                cells = [f"{modelled_tokens_per_second(shape, n, memory, link, overhead):.2f}" for n in (1, 2, 4, 8)]
                print(f"| {name} | {link_name} | {overhead * 1e6:.0f} us | " + " | ".join(cells) + " |")
    published = " | ".join(
        f"{1000 / DISTRIBUTED_LLAMA_PI5[n]:.2f}" if n in DISTRIBUTED_LLAMA_PI5 else "-" for n in (1, 2, 4, 8)
    )
    print(f"| Llama 3 8B Q40, distributed-llama on Raspberry Pi 5 (published) | 1 GbE switch | its own | {published} |")


if __name__ == "__main__":
    main()
