"""Aggregate throughput of `plainllama serve` under concurrent clients, next to llama-cpp-python's
own OpenAI server (`python -m llama_cpp.server`, the peer a Python user would pick instead) on the
same GGUF file with 2 threads, in one run (the machines are shared and noisy: ratios measured side
by side are what count).

    .venv/bin/pip install -c requirements-test.txt fastapi==0.163.2 sse-starlette==3.7.0 \\
        starlette-context==0.5.1 pydantic-settings==2.16.3 python-dotenv==1.2.4   # llama_cpp.server's own
    .venv/bin/python benchmarks/serve_load.py [-m MODEL] [--clients 1,4,16,32] [--tokens 64] [--max-memory 600M]

For each engine and each number of clients, that many clients at once each stream one completion of
--tokens tokens (the end token banned with logit_bias, so every answer has the same length; greedy)
from its own prompt. Printed per level: aggregate generated tokens/s (all tokens / wall time), the
median time to the first token, and plainllama's ratio to the peer.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

PROMPTS = [
    "The history of the llama begins",
    "Write a story about a robot who",
    "The three most important rules of cooking are",
    "In the year 2150, cities",
    "A good teacher always",
    "The river flowed past the old mill and",
    "Here is a list of things to pack for a trip:",
    "Once upon a time, in a land far away,",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(engine: str, model: str, port: int, max_batch: int, max_memory: str | None) -> subprocess.Popen:
    if engine == "plainllama":
        command = [sys.executable, "-m", "plainllama", "serve", "-m", model, "--port", str(port),
                   "--max-batch", str(max_batch), "--prefix-cache", "0"]  # fmt: skip
        if max_memory:
            command += ["--max-memory", max_memory]
    else:
        command = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--port", str(port),
                   "--n_threads", "2", "--n_ctx", "4096", "--interrupt_requests", "False"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                model_id = json.loads(r.read())["data"][0]["id"]
            if engine == "plainllama":  # the port opens before the model is loaded
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            process.model_id = model_id  # type: ignore[attr-defined]
            return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"{engine} did not start")


def one_client(port: int, model_id: str, prompt: str, tokens: int, eos: int, out: list) -> None:
    body = {"model": model_id, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "logit_bias": {str(eos): -100}}  # fmt: skip
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    start = time.perf_counter()
    first, pieces = None, 0
    with urllib.request.urlopen(request, timeout=1800) as r:
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"]
            if choice and choice[0].get("text"):
                pieces += 1
                if first is None:
                    first = time.perf_counter() - start
    out.append((first, pieces, time.perf_counter() - start))


def level(port: int, model_id: str, clients: int, tokens: int, eos: int) -> tuple[float, float]:
    results: list = []
    threads = [threading.Thread(target=one_client, args=(port, model_id, PROMPTS[i % len(PROMPTS)] + f" ({i})",
                                                         tokens, eos, results)) for i in range(clients)]  # fmt: skip
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    generated = sum(r[1] for r in results)  # streamed pieces: one per token for both servers
    if generated < clients * tokens * 0.9:
        print(f"  note: {clients} clients got {generated} tokens, not {clients * tokens}", file=sys.stderr)
    return generated / wall, statistics.median(r[0] for r in results if r[0] is not None)


def main() -> None:
    from plainllama.default_model import default_model_path
    from plainllama.formats import open_checkpoint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default=default_model_path())
    parser.add_argument("--clients", default="1,4,16,32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--engines", default="plainllama,llama.cpp")
    parser.add_argument("--max-memory", help="plainllama's --max-memory (layers beyond it stream from disk)")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    eos = open_checkpoint(args.model).tokenizer.eos_id
    table: dict[str, dict[int, tuple[float, float]]] = {}
    for engine in args.engines.split(","):
        port = free_port()
        process = start(engine, args.model, port, max(levels), args.max_memory)
        try:
            level(port, process.model_id, 1, 4, eos)  # type: ignore[attr-defined]  # warm-up
            table[engine] = {c: level(port, process.model_id, c, args.tokens, eos) for c in levels}  # type: ignore[attr-defined]
        finally:
            process.terminate()
            process.wait(60)
    print(f"{os.path.basename(args.model)}: {args.tokens} tokens per client, greedy, streamed")
    print(f"{'clients':>8} " + " ".join(f"{e + ' tok/s':>18} {'TTFT s':>8}" for e in table) + "   ratio")
    for c in levels:
        cells = " ".join(f"{table[e][c][0]:>18.1f} {table[e][c][1]:>8.2f}" for e in table)
        ratio = table["plainllama"][c][0] / table["llama.cpp"][c][0] if len(table) == 2 else float("nan")
        print(f"{c:>8} {cells}   {ratio:.2f}")


if __name__ == "__main__":
    main()
