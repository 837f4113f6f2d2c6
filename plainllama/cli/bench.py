"""`plainllama bench`: how fast a model runs here, and how close decoding comes to the memory's limit.

Decoding one token reads every weight matrix once (and the KV cache so far), so the fastest a step
can be is `bytes read per token / memory read bandwidth`. This measures the bandwidth with a plain
read of a buffer larger than the caches, then reports what the decode loop achieved against it.
Prefill is a forward pass over the whole prompt; time to first token is that plus sampling. A
prompt is bound by arithmetic instead: its floating-point operations are reported against the
matrix-multiply peak of the same machine, measured in the same run (a plain bfloat16 product on
CPUs that multiply bfloat16 natively, float32 elsewhere).
"""

from __future__ import annotations

import json
import time

import torch
from torch import nn

from ..engine.cpu import kernels
from ..engine.memory import empty_for_weights, weights_on_huge_pages
from ..api import LLM, load
from ..errors import PlainLlamaError
from ..model import KVCache
from ..generation.generate import device_and_dtype
from ..engine.cpu.packed import PackedEmbedding, PackedLinear, _bf16_products_fast, prompt_products
from ..model import ModelArgs
from ..parallel.tensor_parallel import collectives_of

# Any real text: the prompt is this, repeated and cut to the requested length.
PROMPT_TEXT = (
    "The llama is a domesticated South American camelid, widely used as a meat and pack animal by Andean "
    "cultures since the pre-Columbian era. Llamas are social animals and live with others as a herd. Their "
    "wool is soft and contains only a small amount of lanolin. Llamas can learn simple tasks after a few "
    "repetitions. When using a pack, they can carry about 25 to 30% of their body weight for 8 to 13 km. "
)


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM; ru_maxrss would include a parent's peak)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def read_buffer(size_bytes: int) -> torch.Tensor:
    """A buffer to measure reads on, placed as the resident weights are (on huge pages where the
    system gives them: they read ~15% faster here, and the bound must be the best the memory gives),
    written once so that its pages exist."""
    with weights_on_huge_pages():
        return empty_for_weights((size_bytes // 8,), torch.float64).fill_(1.0)


def memory_read_bandwidth(size_bytes: int = 1 << 30, repeats: int = 3) -> float:
    """Bytes per second that all threads read from a 1 GiB buffer (the best of `repeats` reads of
    ~30 ms each). The buffer is freed afterwards. (A model smaller than the CPU's last-level cache
    can read faster than this.)"""
    buffer = read_buffer(size_bytes)
    best = min(_read_seconds(buffer) for _ in range(repeats))
    del buffer
    return size_bytes / best


def sustained_read_bandwidth(seconds: float, size_bytes: int = 1 << 30) -> float:
    """Bytes per second that all threads read from a 1 GiB buffer read again and again for at least
    `seconds`: the rate memory keeps up over as long as a decode run lasts, which on a shared machine
    is usually below the best single read (measured here: the best of two 30 ms reads from 3% below
    to 12% above the mean over the seconds before them)."""
    buffer = read_buffer(size_bytes)
    reads, start = 0, time.perf_counter()
    while reads == 0 or time.perf_counter() - start < seconds:
        _read_seconds(buffer)
        reads += 1
    elapsed = time.perf_counter() - start
    del buffer
    return reads * size_bytes / elapsed


def _read_seconds(buffer: torch.Tensor) -> float:
    start = time.perf_counter()
    if kernels.available():
        kernels.read_bytes(buffer)
    else:
        buffer.sum()
    return time.perf_counter() - start


def prefill_flops(args: ModelArgs, tokens: int) -> int:
    """Floating-point operations of a prefill of `tokens` (2 per multiply-add): each layer's matrices
    for every token (queries, keys, values, output, gate, up, down), causal attention's two products
    (scores and the weighted sum of values, each over the positions up to a token's own), and the
    output projection for the last token only (last_only). Norms, rotary embeddings and softmax are
    left out: a few operations per activation, not per weight."""
    D, Hd, F = args.dim, args.head_dim, args.hidden_dim
    per_token = D * args.n_heads * Hd + 2 * D * args.n_kv_heads * Hd + args.n_heads * Hd * D + 3 * D * F
    pairs = tokens * (tokens + 1) // 2  # (query, key) positions a causal prompt attends over
    attention = 2 * pairs * args.n_heads * Hd  # q . k, then p * v
    return 2 * (args.n_layers * (tokens * per_token + attention) + D * args.vocab_size)


def matrix_peak_flops(device: torch.device, repeats: int = 3) -> tuple[float, str]:
    """(FLOP/s, dtype) of a plain [512 x 2048] x [2048 x 8192] product in the dtype prompts multiply
    in here: the best of `repeats`."""
    dtype = torch.bfloat16 if device.type != "cpu" or _bf16_products_fast() else torch.float32
    a = torch.randn(512, 2048, device=device).to(dtype)
    b = torch.randn(8192, 2048, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        begin = time.perf_counter()
        torch.nn.functional.linear(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - begin)
    return 2 * 512 * 2048 * 8192 / best, str(dtype).removeprefix("torch.")


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every matrix that multiplies (the embedding table
    contributes one row, which is negligible, unless the output projection shares it)."""
    total = 0
    for module in model.modules():
        if isinstance(module, PackedLinear):
            total += module.packed.nbytes
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif isinstance(module, (nn.Embedding, PackedEmbedding)):
            continue
        elif isinstance(weight := getattr(module, "weight", None), torch.Tensor) and weight.dim() == 1:
            total += weight.numel() * weight.element_size()  # norms
    return total


def prompt_ids(llm: LLM, n: int) -> list[int]:
    ids = llm.tokenizer.encode(PROMPT_TEXT * (1 + n // 40))
    while len(ids) < n:
        ids += ids
    return ids[:n]


def run(
    path: str | None = None, prompt_tokens: int = 512, decode_tokens: int = 128, repeats: int = 3, **load_options
) -> dict:
    start = time.perf_counter()
    llm = load(path, **load_options)
    load_seconds = time.perf_counter() - start
    args = llm.model.args
    if prompt_tokens + decode_tokens > args.context_length:
        raise PlainLlamaError(
            f"--prompt-tokens {prompt_tokens} + --decode-tokens {decode_tokens} exceed the model's context of "
            f"{args.context_length}"
        )
    ids = prompt_ids(llm, prompt_tokens)
    cache_dtype = device_and_dtype(llm.model)[1]

    def prefill() -> float:
        cache = KVCache(args, 1, prompt_tokens, cache_dtype, llm.device)
        begin = time.perf_counter()
        with torch.inference_mode():
            llm.model(torch.tensor([ids], device=llm.device), 0, cache, last_only=True)
        if llm.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - begin

    collectives = collectives_of(llm.model)  # under tensor parallelism (parallel/tensor_parallel.py)
    communication: list[float] = []  # seconds per decode step in collectives, per run

    def generation() -> tuple[float, float, float]:
        """(time to first token, seconds per decode step, seconds of decoding) of a greedy generation
        after the prompt. Generation is forced to the full length: the end token is masked out by a
        logit bias."""
        begin = time.perf_counter()
        stamps = []
        waited = 0.0
        ban = {i: -1e9 for i in llm.tokenizer.end_ids}
        for _ in llm.stream(ids, max_new_tokens=decode_tokens, temperature=0, logit_bias=ban):
            stamps.append(time.perf_counter())
            if len(stamps) == 1 and collectives is not None:
                waited = collectives.seconds  # from the first token on: the decode steps' collectives
        steps = max(len(stamps) - 1, 1)
        if collectives is not None:
            communication.append((collectives.seconds - waited) / steps)
        return stamps[0] - begin, (stamps[-1] - stamps[0]) / steps, stamps[-1] - stamps[0]

    prefill()  # warm-up: first-use costs (thread pools, kernel library) are not the model's speed
    prefill_seconds = min(prefill() for _ in range(repeats))
    peak, peak_dtype = matrix_peak_flops(llm.device)  # right after, as the machine is now
    prefill_rate = prefill_flops(args, prompt_tokens) / prefill_seconds
    # The bound is sampled after each generation, not once at the end: on a shared machine the
    # memory's speed moves by 20-30% within a minute, and the best of each, measured side by side,
    # is the fair ratio. Two reads after each generation: 1 GiB reads of ~30 ms (the best of two)
    # and the rate of reading again and again for as long as the generation decoded. The bound is
    # the best rate any of them reached; the rate over as long a time is reported beside it, as the
    # like-for-like figure for a decode rate that is a mean over seconds (on a noisy machine it can
    # come out below the decode's own rate). Peak RSS is read before the first sample's 1 GiB test
    # buffer exists (the later generations allocate what the first did).
    runs: list = []
    sustained: list = []
    burst: list = []
    peak_rss = 0
    for _ in range(repeats):
        runs.append(generation())
        peak_rss = peak_rss or peak_rss_bytes()
        if llm.device.type == "cpu":
            sustained.append(sustained_read_bandwidth(runs[-1][2]))
            burst.append(memory_read_bandwidth(repeats=2))
    ttft = min(r[0] for r in runs)
    step = min(r[1] for r in runs)

    weights = weight_bytes_per_token(llm.model)
    kv_per_position = 2 * args.n_layers * args.n_kv_heads * args.head_dim * cache_dtype.itemsize
    positions = prompt_tokens + decode_tokens // 2  # the cache read by an average step
    bytes_per_token = weights + kv_per_position * positions
    bound = max(sustained + burst) if burst else None
    sustained_bound = max(sustained) if sustained else None
    achieved = bytes_per_token / step
    return {
        "model": llm.checkpoint.path,
        "device": str(llm.device),
        "weights": weight_description(llm.model),
        "threads": torch.get_num_threads(),
        "compute": llm.compute,
        "prompt_products": prompt_products() if llm.compute.startswith("kernels") else None,
        "load_seconds": load_seconds,
        "prompt_tokens": prompt_tokens,
        "prefill_tokens_per_second": prompt_tokens / prefill_seconds,
        "prefill_tflop_s": prefill_rate / 1e12,
        "matrix_peak_tflop_s": peak / 1e12,
        "matrix_peak_dtype": peak_dtype,
        "fraction_of_matrix_peak": prefill_rate / peak,
        "time_to_first_token_seconds": ttft,
        "decode_tokens": decode_tokens,
        "decode_tokens_per_second": 1 / step,
        "bytes_per_decoded_token": bytes_per_token,
        "achieved_bandwidth_gb_s": achieved / 1e9,
        "memory_bandwidth_gb_s": bound / 1e9 if bound else None,
        "fraction_of_bandwidth": achieved / bound if bound else None,
        "sustained_read_bandwidth_gb_s": sustained_bound / 1e9 if sustained_bound else None,
        "fraction_of_sustained_read_bandwidth": achieved / sustained_bound if sustained_bound else None,
        "peak_rss_mib": peak_rss / 2**20,
        **parallel_figures(llm, peak_rss, min(communication) if communication else None),
    }


def parallel_figures(llm: LLM, peak_rss: int, collective_seconds: float | None) -> dict:
    """Under tensor parallelism: the rank count, each rank's peak RSS, and the time rank 0 spent per
    decoded token in collectives (two all-reduces per layer, the embedding's and the logits' gather)."""
    if llm.ranks is None:
        return {"world_size": 1}
    import torch.distributed as dist

    everyone: list = [None] * llm.ranks.world
    dist.all_gather_object(everyone, peak_rss / 2**20)
    return {
        "world_size": llm.ranks.world,
        "peak_rss_mib_per_rank": everyone,
        "collective_seconds_per_token": collective_seconds,
        "collectives_per_token": 2 * llm.args.n_layers + 2,
    }


def weight_description(model: nn.Module) -> str:
    """ "q4 x120, q8 x1" or "float32": how the matrices are held."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, PackedLinear):
            counts[module.packed.layout] = counts.get(module.packed.layout, 0) + 1
        elif isinstance(module, nn.Linear):
            name = str(module.weight.dtype).removeprefix("torch.")
            counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def format_table(r: dict) -> str:
    rows = [
        ("model", r["model"]),
        ("device, threads", f"{r['device']}, {r['threads']}, {r['compute']}"),
        ("matrices held as", r["weights"]),
        ("load", f"{r['load_seconds']:.2f} s"),
        (
            f"prefill ({r['prompt_tokens']} tokens)",
            f"{r['prefill_tokens_per_second']:.1f} tok/s"
            + (f", products: {r['prompt_products']}" if r.get("prompt_products") else ""),
        ),
        (
            "prefill arithmetic",
            f"{r['prefill_tflop_s']:.3f} TFLOP/s of {r['matrix_peak_tflop_s']:.3f} TFLOP/s, a {r['matrix_peak_dtype']} "
            f"matrix product measured here ({r['fraction_of_matrix_peak']:.0%})",
        ),
        ("time to first token", f"{r['time_to_first_token_seconds'] * 1000:.0f} ms"),
        (f"decode ({r['decode_tokens']} tokens)", f"{r['decode_tokens_per_second']:.1f} tok/s"),
        ("read per decoded token", f"{r['bytes_per_decoded_token'] / 2**20:.1f} MiB"),
    ]
    if r["memory_bandwidth_gb_s"]:
        rows.append(
            (
                "bandwidth achieved",
                f"{r['achieved_bandwidth_gb_s']:.1f} GB/s of {r['memory_bandwidth_gb_s']:.1f} GB/s, the best "
                f"read measured ({r['fraction_of_bandwidth']:.0%}); {r['fraction_of_sustained_read_bandwidth']:.0%} "
                f"of the rate of reading for as long ({r['sustained_read_bandwidth_gb_s']:.1f} GB/s)",
            )
        )
    rows.append(("peak RSS", f"{r['peak_rss_mib']:.0f} MiB"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run_command(args) -> int:
    from .options import load_options

    if args.prompt_tokens < 1 or args.decode_tokens < 2 or args.repeats < 1:
        raise PlainLlamaError("bench needs --prompt-tokens >= 1, --decode-tokens >= 2 and --repeats >= 1")
    result = run(args.model, args.prompt_tokens, args.decode_tokens, args.repeats, **load_options(args))
    print(json.dumps(result) if args.json else format_table(result))
    return 0
