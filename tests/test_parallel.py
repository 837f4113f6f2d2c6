"""Tensor parallelism (plainllama/parallel/): N gloo ranks on the loopback interface, one thread
each, against the single process. The oracle is the single-process model on the same files: a
rank holds a slice of each matrix and the slices' products are added up, so the N-rank logits must
be the single process's up to float32 summation order.

Tolerance: on float32 weights the only difference is the order in which the partial products of
wo and w2 (and nothing else) are added: each sum of K float32 products carries a relative error of
about sqrt(K) * 6e-8, a few 1e-6 after the layers here (measured: 2.6e-6 of the largest logit at 2
ranks). 2e-5 of the largest logit leaves 8x room; a slice taken from the wrong rows or heads changes
logits by O(1).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from gguf_files import default_vocabulary, write_llama_gguf
from helpers import run_cli
from plainllama.parallel import launch
from plainllama.parallel.launch import free_port

WORKER = os.path.join(os.path.dirname(__file__), "parallel_worker.py")
FLOAT32_TOLERANCE = 2e-5  # of the largest logit; see the module's docstring


def rank_environment(rank: int, world: int, port: int) -> dict:
    """What torchrun gives each of its processes, one thread each."""
    return launch.rank_environment(rank, world, port, OMP_NUM_THREADS="1")


def start_ranks(world: int, command: list[str], **popen) -> list[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen(command, env=rank_environment(rank, world, port), **popen) for rank in range(world)]


def run_worker(model, out, world: int, options: dict | None = None) -> dict:
    command = [sys.executable, WORKER, str(model), str(out), json.dumps(options or {})]
    if world == 1:
        subprocess.run(command, check=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    else:
        ranks = start_ranks(world, command, stderr=subprocess.PIPE, text=True)
        for p in ranks:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err
    return torch.load(out, weights_only=True)


def assert_same_model(single: dict, parallel: dict, tolerance: float = FLOAT32_TOLERANCE):
    scale = single["logits"].abs().max().item()
    difference = (single["logits"] - parallel["logits"]).abs().max().item()
    assert difference <= tolerance * scale, (difference, scale)
    assert parallel["greedy"] == single["greedy"]
    assert parallel["seeded"] == single["seeded"]


SHAPE = dict(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, hidden_dim=512)  # 4 key/value heads: 1, 2 or 4 ranks


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tp-gguf")
    vocab = default_vocabulary()
    paths = {}
    for kind, types in {
        "F32": dict(matrix_type="F32", embedding_type="F32"),
        "Q8_0": dict(matrix_type="Q8_0", embedding_type="Q8_0", tied=True),
        "Q4_K": dict(matrix_type="Q4_K", embedding_type="Q8_0"),
    }.items():
        paths[kind] = folder / f"{kind}.gguf"
        write_llama_gguf(paths[kind], vocab, **SHAPE, **types)
    paths["long"] = folder / "long.gguf"  # for a generation that is still running when a rank is killed
    write_llama_gguf(paths["long"], vocab, **SHAPE, context_length=16384)
    return paths


# Long runs: no end-of-text or chat-control token (SmolLM2's ids 0-2) may end the generation early.
ENDLESS = ["-n", "16000", "--logit-bias", "0:-100,1:-100,2:-100", "--dtype", "float32"]


@pytest.mark.parametrize("world", [2, 4])
def test_float_gguf_ranks_give_the_single_process_logits(gguf_models, tmp_path, world):
    single = run_worker(gguf_models["F32"], tmp_path / "one.pt", 1, {"dtype": "float32"})
    parallel = run_worker(gguf_models["F32"], tmp_path / "n.pt", world, {"dtype": "float32"})
    assert parallel["world"] == world
    assert_same_model(single, parallel)


@pytest.mark.parametrize("world", [2, 4])
def test_quantized_gguf_is_cut_on_block_boundaries(gguf_models, tmp_path, world):
    """Q8_0 blocks cut per rank (rows for wq..w3 and the tied embedding, whole blocks of columns for
    wo and w2), dequantized on each rank: the single process's dequantized logits."""
    options = {"dtype": "float32"}  # every weight dequantized from its (cut) blocks
    single = run_worker(gguf_models["Q8_0"], tmp_path / "one.pt", 1, options)
    parallel = run_worker(gguf_models["Q8_0"], tmp_path / "n.pt", world, options)
    assert_same_model(single, parallel)


def test_quantized_gguf_runs_packed_on_each_rank(gguf_models, tmp_path):
    """Q8_0 kept as blocks on 2 ranks, products in the C kernels, against the dequantized single
    process: no further from it than the packed single process is. A cut falls between blocks, so
    each rank's blocks see the x blocks one process's do; what the ranks change is the order in
    which wo's and w2's partial sums are added, and through that, now and then, the rounding of an
    activation to int8 (where prompts take the int8 kernels), which moves a block's product by up to
    a step of its x scale (max|x| / 127): the same size of error as the int8 path's own, not a new
    one. Measured on the Zen 4 (int8 prompts), of the largest logit: packed single process 0.023,
    2 ranks 0.022 (and 0.021 from each other); a slice from the wrong rows changes logits by O(1)."""
    dequantized = run_worker(gguf_models["Q8_0"], tmp_path / "float.pt", 1, {"dtype": "float32"})
    single = run_worker(gguf_models["Q8_0"], tmp_path / "one.pt", 1, {})
    parallel = run_worker(gguf_models["Q8_0"], tmp_path / "n.pt", 2, {})
    scale = dequantized["logits"].abs().max().item()

    def distance(run):
        return (run["logits"] - dequantized["logits"]).abs().max().item() / scale

    assert distance(single) < 0.05  # the packed path's own error on these random weights
    assert distance(parallel) <= 1.5 * distance(single)


def test_a_cut_inside_a_k_quant_super_block_is_refused(gguf_models):
    """Q4_K stores 256 weights per block; 2 ranks would cut wo (256 wide) at column 128."""
    result = run_cli("generate", "Hi", "-m", str(gguf_models["Q4_K"]), "-n", "2", "--tp", "2", timeout=300)
    assert result.returncode == 1
    assert "inside a block; use fewer ranks" in result.stderr and "Traceback" not in result.stderr


def test_a_rank_count_that_does_not_divide_the_heads_is_refused(gguf_models):
    result = run_cli("generate", "Hi", "-m", str(gguf_models["F32"]), "-n", "2", "--tp", "3", timeout=300)
    assert result.returncode == 1
    assert "4 key/value heads" in result.stderr and "rank counts that work: 1, 2, 4" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def meta_folders(tmp_path_factory):
    """A Llama 3-shaped random Meta checkpoint written as Meta writes it, in 1, 2 and 4 shards."""
    from meta_files import meta_folders_by_shards

    return meta_folders_by_shards(tmp_path_factory, 2, (1, 2, 4), "tp-meta")


@pytest.mark.parametrize("shards,world", [(1, 2), (2, 2), (4, 2), (1, 4), (2, 4), (4, 4)])
def test_meta_shards_at_any_rank_count(meta_folders, tmp_path, shards, world):
    """Each rank cuts its slice from the shards' parts without joining them (with as many ranks as
    shards, rank i's slice is shard i's part): the single process's logits and tokens."""
    single = run_worker(meta_folders[1], tmp_path / "one.pt", 1, {"dtype": "float32"})
    parallel = run_worker(meta_folders[shards], tmp_path / "n.pt", world, {"dtype": "float32"})
    assert_same_model(single, parallel)


@pytest.mark.parametrize("world", [2, 4])
def test_hf_folder(gguf_models, tmp_path, world):
    """safetensors cut per rank (q and k rows un-permuted from HF's rotary order first)."""
    folder = tmp_path / "hf"
    run_cli("convert", str(gguf_models["F32"]), str(folder), "--to", "hf", check=True)
    single = run_worker(folder, tmp_path / "one.pt", 1, {"dtype": "float32"})
    parallel = run_worker(folder, tmp_path / "n.pt", world, {"dtype": "float32"})
    assert_same_model(single, parallel)


def test_the_default_model_on_three_ranks_from_the_command_line():
    """SmolLM2 (9 query, 3 key/value heads) on `--tp 3`: the same greedy and seeded text as one
    process, in float32 (its Q4_1/Q8_0 blocks dequantized on each rank)."""
    for sampling in ([], ["--temperature", "0.8", "--seed", "5"]):
        common = ["generate", "The capital of France is", "-n", "12", "--json", "--dtype", "float32", *sampling]
        single = json.loads(run_cli(*common, check=True).stdout)
        parallel = run_cli(*common, "--tp", "3", check=True)
        record = json.loads(parallel.stdout)  # only rank 0 writes to stdout
        assert record["world_size"] == 3 and single["world_size"] == 1
        assert record["tokens"] == single["tokens"], (record["text"], single["text"])


def test_torchrun_starts_the_ranks(gguf_models):
    """PyTorch's own launcher, as on several machines: `torchrun --nproc-per-node 2 -m plainllama
    generate ...` gives the single process's tokens; only rank 0 prints the answer."""
    args = ["generate", "Hello there", "-m", str(gguf_models["F32"]), "-n", "8", "--json", "--dtype", "float32"]
    single = json.loads(run_cli(*args, check=True).stdout)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "plainllama", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 1 and records[0]["world_size"] == 2
    assert records[0]["tokens"] == single["tokens"]


def test_stdin_prompt_reaches_every_rank(gguf_models):
    """Only rank 0 can read stdin; the others take the prompt from it."""
    model = str(gguf_models["F32"])
    args = ["generate", "-m", model, "-n", "4", "--json", "--dtype", "float32"]
    single = json.loads(run_cli(*args, input="Hello there", check=True).stdout)
    parallel = json.loads(run_cli(*args, "--tp", "2", input="Hello there", check=True).stdout)
    assert parallel["prompt_ids"] == single["prompt_ids"] and parallel["tokens"] == single["tokens"]


def test_each_rank_holds_its_share_of_the_weights(tmp_path):
    """Memory of each rank, in fresh processes (one per rank, 1 thread): what loading added to the
    process is at most the rank's share of the weights x 1.15 plus the runtime the load adds whatever
    the share (the checkpoint's metadata, opened once before to measure it and once by load, so twice
    at most; PyTorch, the process group and the kernels' library are there before). A rank that kept
    the whole model would exceed it at 2 and at 4 ranks. Each rank's peak, generation included, is
    below the single process's."""
    path = tmp_path / "big.gguf"
    shape = dict(dim=1024, n_layers=12, n_heads=16, n_kv_heads=8, hidden_dim=4096)  # 250 MB
    write_llama_gguf(path, default_vocabulary(), **shape, matrix_type="Q8_0", embedding_type="Q8_0", tied=True)
    weights = os.path.getsize(path)
    single = run_worker(path, tmp_path / "1.pt", 1)["memory"][0]
    for world in (2, 4):
        memory = run_worker(path, tmp_path / f"{world}.pt", world)["memory"]
        for rank, m in enumerate(memory):
            added = m["loaded"] - m["before"]
            runtime = 2 * m["metadata"]
            assert added <= weights / world * 1.15 + runtime, (world, rank, added / 1e6, runtime / 1e6, weights / 1e6)
            assert weights / world * 1.15 + runtime < weights  # the bound does tell a slice from the whole
            assert m["peak"] < single["peak"], (world, rank, m["peak"] / 1e6, single["peak"] / 1e6)


def test_a_killed_rank_stops_the_others_with_a_message(gguf_models):
    """Rank 1 killed mid-generation: rank 0 exits within the deadline with one line that names
    itself and the group's address (not a traceback, not a hang)."""
    command = [sys.executable, "-m", "plainllama", "generate", "Hello", "-m", str(gguf_models["long"]), *ENDLESS]
    ranks = start_ranks(2, command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        deadline = time.monotonic() + 120
        while ranks[0].poll() is None and time.monotonic() < deadline:  # wait for the first token
            line = ranks[0].stdout.read(1)
            if line:
                break
        ranks[1].send_signal(signal.SIGKILL)
        _, err = ranks[0].communicate(timeout=90)
    finally:
        for p in ranks:
            p.kill()
    assert ranks[0].returncode == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert "rank 0 of 2 lost contact with the other ranks (group at 127.0.0.1:" in lines[-1], err


def test_the_launcher_names_a_rank_that_died(gguf_models):
    """`--tp 2` with rank 1 killed: the launcher says which rank ended and how, and exits non-zero."""
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "plainllama",
            "generate",
            "Hello",
            "-m",
            str(gguf_models["long"]),
            *ENDLESS,
            "--tp",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert launcher.stdout.read(1)  # rank 0 is generating
        children = subprocess.run(
            ["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True, check=True
        ).stdout.split()
        followers = [pid for pid in children if "\0RANK=1\0" in "\0" + open(f"/proc/{pid}/environ").read()]
        assert len(followers) == 1
        os.kill(int(followers[0]), signal.SIGKILL)
        _, err = launcher.communicate(timeout=90)
    finally:
        launcher.kill()
    assert launcher.returncode != 0
    assert "rank 1 of 2 was killed by SIGKILL" in err and "Traceback" not in err, err


def test_a_rank_that_cannot_reach_rank_0_says_where_it_looked(gguf_models):
    """Rank 1 of 2 with nobody at MASTER_ADDR:MASTER_PORT: one line naming the address and the
    deadline (PLAINLLAMA_TP_TIMEOUT), after the deadline, not a hang or c10d's C++ stack."""
    env = dict(rank_environment(1, 2, free_port()), PLAINLLAMA_TP_TIMEOUT="3")
    command = [sys.executable, "-m", "plainllama", "generate", "Hi", "-m", str(gguf_models["F32"]), "-n", "2"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "rank 1 of 2 could not meet the others at 127.0.0.1:" in result.stderr and "within 3 s" in result.stderr
    assert "frame #" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_ranks_end_when_the_launcher_is_killed(gguf_models):
    """`serve --tp 2` whose launcher is killed outright (SIGKILL, nothing forwarded): its ranks are
    told by the kernel (PR_SET_PDEATHSIG) and end; rank 0 stops the other, none keeps serving."""
    from test_server import Served

    server = Served("-m", str(gguf_models["F32"]), "--tp", "2")
    children = subprocess.run(
        ["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(children) == 2
    server.process.kill()
    server.process.wait(30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(running(pid) for pid in children):
        time.sleep(0.2)
    assert not [pid for pid in children if running(pid)]


def running(pid: str) -> bool:
    """Whether a process exists and has not ended (an ended one whose parent has not reaped it is a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_ranks_with_different_models_refuse_to_start(gguf_models, tmp_path):
    """A rank whose files differ from rank 0's (another model, another config) is named at start-up."""
    port = free_port()
    ranks = []
    for rank, model in enumerate((gguf_models["F32"], gguf_models["Q8_0"])):
        command = [sys.executable, "-m", "plainllama", "generate", "Hi", "-m", str(model), "-n", "2"]
        ranks.append(subprocess.Popen(command, env=rank_environment(rank, 2, port), stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=120)[1] for p in ranks]
    assert all(p.returncode == 1 for p in ranks), errors
    assert "rank 1 loaded a different model" in errors[0] and "Traceback" not in errors[0]


def test_chat_on_three_ranks():
    """`plainllama chat --tp 3`: rank 0 reads the messages and every rank steps the engine with it; a
    two-turn conversation answers as one process does (float32, greedy)."""
    conversation = "What is the capital of France?\nAnd of Italy?\n"
    args = ["chat", "--temperature", "0", "-n", "24", "--dtype", "float32"]
    single = run_cli(*args, input=conversation, check=True)
    parallel = run_cli(*args, "--tp", "3", input=conversation, check=True)
    assert parallel.stdout == single.stdout and "Paris" in single.stdout


def test_serve_on_three_ranks_answers_as_one_process():
    """`plainllama serve --tp 3`, driven by the official openai client: chat and completions, streamed
    and not, and two seeded requests at once, give the single process's tokens (LLM.chat /
    LLM.generate in float32); SIGTERM stops every rank and the launcher exits 0."""
    import plainllama
    from test_server import CHAT, Served

    single = plainllama.load(dtype="float32")
    server = Served("--tp", "3", "--dtype", "float32", "--max-batch", "4")
    try:
        expected = single.chat(CHAT, max_new_tokens=20, temperature=0)
        for _ in expected:
            pass
        answer = server.client.chat.completions.create(model=server.model, messages=CHAT, temperature=0, max_tokens=20)
        assert answer.choices[0].message.content == expected.result.text
        streamed = server.client.chat.completions.create(
            model=server.model, messages=CHAT, temperature=0, max_tokens=20, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected.result.text

        prompts = ["The capital of France is", "Llamas live in"]
        wanted = [single.generate(p, max_new_tokens=16, temperature=0.8, seed=3).text for p in prompts]
        got: list = [None, None]

        def ask(i):
            got[i] = (
                server.client.completions.create(
                    model=server.model, prompt=prompts[i], temperature=0.8, seed=3, max_tokens=16
                )
                .choices[0]
                .text
            )

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert got == wanted
    finally:
        code, log = server.stop()
    assert code == 0, log
    assert "Traceback" not in log


def test_commands_without_a_model_to_share_say_so():
    result = run_cli("inspect", "Hello", "--tp", "2", timeout=120)
    assert result.returncode == 1
    assert "does not run under tensor parallelism" in result.stderr
