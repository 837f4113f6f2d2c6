"""One process of a tensor-parallel test (tests/test_parallel.py), or the single process it is
compared with: loads MODEL through plainllama.load (which joins the other ranks when WORLD_SIZE > 1,
as under torchrun), and rank 0 writes what the test compares to OUT (torch.save):
logits for a fixed prompt, greedy and seeded tokens, and every rank's memory (peak RSS before and
after loading). usage: parallel_worker.py MODEL OUT [LOAD_OPTIONS_JSON]"""

import json
import os
import sys

import torch

import plainllama
from plainllama.engine.cpu import kernels
from plainllama.formats import open_checkpoint
from plainllama.parallel.ranks import from_environment


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak RSS. (Not getrusage's ru_maxrss: Linux carries it over an exec from the
    forked parent, here pytest, whose memory is larger than the worker's.)"""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def main():
    path, out = sys.argv[1], sys.argv[2]
    options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    torch.set_num_threads(1)  # as --tp on one machine would with one core per rank
    # Runtime that every process holds whatever its share of the weights: the process group (load()
    # would join it) and the C kernels' library before `before`; the checkpoint's metadata (its
    # tokenizer's tables: tens of MB of Python objects for a 49k vocabulary) measured here
    from_environment()
    kernels.available()
    before = rss_bytes()
    metadata = open_checkpoint(path)
    metadata_bytes = rss_bytes() - before
    del metadata
    llm = plainllama.load(path, threads=1, **options)
    loaded = rss_bytes()
    ids = list(range(100, 124))
    result = {
        "logits": llm.logits(ids),
        "greedy": llm.generate(ids, max_new_tokens=12, temperature=0).tokens,
        "seeded": llm.generate(ids, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7).tokens,
        "world": llm.ranks.world if llm.ranks is not None else 1,
    }
    memory = {
        "before": before,
        "metadata": metadata_bytes,
        "loaded": loaded,
        "peak": peak_rss_bytes(),
    }
    if llm.ranks is not None:
        import torch.distributed as dist

        everyone = [None] * llm.ranks.world
        dist.all_gather_object(everyone, memory)
        result["memory"] = everyone
        dist.destroy_process_group()
    else:
        result["memory"] = [memory]
    if os.environ.get("RANK", "0") == "0":
        torch.save(result, out)


if __name__ == "__main__":
    main()
