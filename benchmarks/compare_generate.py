"""Prefill and decode speed of plainllama next to llama.cpp and Hugging Face transformers, on the
same GGUF file, and next to Meta's reference code on the same model written as a Meta checkpoint, in
one run (the machines are shared and noisy: only ratios measured side by side mean anything).

    benchmarks/run.sh                       # sets up .venv with the peers, then runs this
    .venv/bin/python benchmarks/compare_generate.py [-m MODEL] [--prompt-tokens 512] [--decode-tokens 128]

All engines are loaded, then measured in turns (a warm-up round, then --repeats rounds); each
engine's best run counts:
  prefill: one forward pass over a prompt of --prompt-tokens tokens (tokens/s = prompt / time),
  decode:  --decode-tokens greedy steps with a KV cache after a prompt of --decode-after tokens (default
           8; a long one makes every step attend over that many cached positions) (tokens/s = steps / time).
llama.cpp runs with 2 threads (this machine has 2 cores); torch uses its default (2 here).

Meta's format: `--engines ...,meta-reference,plainllama-meta` writes the model as a Meta checkpoint
(consolidated.00.pth + params.json, bfloat16) in a temporary folder; `meta-reference` is Meta's
llama_models/llama3/model.py (llama-models 0.3.0, fairscale layers on a one-process gloo group, as
the tests run it) in float32, the dtype it runs in on a CPU; `plainllama-meta` is plainllama on the
same folder, loaded as it loads by default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

import plainllama
from plainllama.default_model import default_model_path
from plainllama.model import KVCache


def meta_folder(path):
    """The model of `path` written as a Meta checkpoint (once per run)."""
    import tempfile

    from plainllama.export.meta import write_meta
    from plainllama.formats import open_checkpoint

    if not hasattr(meta_folder, "folder"):
        meta_folder.folder = tempfile.mkdtemp(prefix="plainllama-meta-")
        write_meta(open_checkpoint(path), meta_folder.folder, torch.bfloat16)
    return meta_folder.folder


def bench_plainllama_meta(path, prompt_ids, decode_prompt, decode_tokens, repeats):
    return bench_plainllama(meta_folder(path), prompt_ids, decode_prompt, decode_tokens, repeats)


def bench_meta_reference(path, prompt_ids, decode_prompt, decode_tokens, repeats):
    import tempfile

    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs_init
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    folder = meta_folder(path)
    if not dist.is_initialized():  # the reference's layers are fairscale's model-parallel ones
        store = tempfile.NamedTemporaryFile(prefix="plainllama-gloo-", delete=False).name
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        fs_init.initialize_model_parallel(1)
    params = json.load(open(os.path.join(folder, "params.json")))
    params.update(max_seq_len=max(len(prompt_ids), len(decode_prompt)) + decode_tokens + 16, max_batch_size=1)
    model = Transformer(ModelArgs(**params))
    state = torch.load(os.path.join(folder, "consolidated.00.pth"), weights_only=True, mmap=True)
    state.setdefault("output.weight", state["tok_embeddings.weight"])  # tied embeddings saved once
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.eval()

    def prefill():
        start = time.perf_counter()
        model(torch.tensor([prompt_ids]), 0)  # the reference's forward runs under inference_mode
        return time.perf_counter() - start

    def decode():
        logits = model(torch.tensor([decode_prompt]), 0)
        token, pos = logits[0, -1].argmax(), 8
        start = time.perf_counter()
        for _ in range(decode_tokens):
            logits = model(token.view(1, 1), pos)
            token, pos = logits[0, -1].argmax(), pos + 1
        return (time.perf_counter() - start) / decode_tokens

    return prefill, decode


def bench_plainllama(path, prompt_ids, decode_prompt, decode_tokens, repeats):
    llm = plainllama.load(path, device="cpu")
    model = llm.model

    def prefill():
        cache = KVCache(model.args, 1, len(prompt_ids), llm.dtype, llm.device)
        start = time.perf_counter()
        with torch.inference_mode():
            model(torch.tensor([prompt_ids]), 0, cache, last_only=True)
        return time.perf_counter() - start

    def decode():
        out = llm.generate(decode_prompt, max_new_tokens=decode_tokens + 1)
        # Force the full budget: the comparison needs the same number of steps from every engine.
        assert len(out.tokens) == decode_tokens + 1 or out.finish_reason == "stop"
        return out.timings.decode_seconds / max(out.timings.decode_steps, 1)

    return prefill, decode


def bench_llama_cpp(path, prompt_ids, decode_prompt, decode_tokens, repeats):
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=max(len(prompt_ids), len(decode_prompt)) + decode_tokens + 16,
        n_threads=2,
        n_threads_batch=2,
        n_batch=512,
        verbose=False,
    )

    def prefill():
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt_ids)
        return time.perf_counter() - start

    def last_logits():
        # Llama.eval keeps no logits unless logits_all (llama-cpp-python 0.3): read the context's own
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))

    def decode():
        llm.reset()
        llm.eval(decode_prompt)
        token = int(np.argmax(last_logits()))
        start = time.perf_counter()
        for _ in range(decode_tokens):
            llm.eval([token])
            token = int(np.argmax(last_logits()))
        return (time.perf_counter() - start) / decode_tokens

    return prefill, decode


def bench_transformers(path, prompt_ids, decode_prompt, decode_tokens, repeats):
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()

    def prefill():
        start = time.perf_counter()
        with torch.inference_mode():
            model(torch.tensor([prompt_ids]), logits_to_keep=1)
        return time.perf_counter() - start

    def decode():
        with torch.inference_mode():
            out = model(torch.tensor([decode_prompt]), use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax()
            start = time.perf_counter()
            for _ in range(decode_tokens):
                out = model(token.view(1, 1), past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[0, -1].argmax()
        return (time.perf_counter() - start) / decode_tokens

    return prefill, decode


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--decode-after", type=int, default=8, help="prompt tokens before decoding")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", default="plainllama,llama.cpp,transformers")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    path = args.model or default_model_path()

    tokenizer = plainllama.load(path, device="cpu").tokenizer
    text = open(__file__, encoding="utf-8").read() * 4  # any real text long enough
    ids = tokenizer.encode(text * (1 + max(args.prompt_tokens, args.decode_after) // 2000))
    prompt_ids, decode_prompt = ids[: args.prompt_tokens], ids[: args.decode_after]

    engines = {
        "plainllama": bench_plainllama,
        "llama.cpp": bench_llama_cpp,
        "transformers": bench_transformers,
        "meta-reference": bench_meta_reference,
        "plainllama-meta": bench_plainllama_meta,
    }
    # Every engine is loaded first, then the measurements take turns (engine A, B, C, A, B, C, ...):
    # the machine's speed drifts over minutes, and taking turns exposes every engine to the same drift.
    names = args.engines.split(",")
    runners = {name: engines[name](path, prompt_ids, decode_prompt, args.decode_tokens, args.repeats) for name in names}
    best = {name: [float("inf"), float("inf")] for name in names}
    for round_ in range(args.repeats + 1):  # round 0 is a warm-up
        for name in names:
            prefill, decode = runners[name]
            p, d = prefill(), decode()
            if round_:
                best[name] = [min(best[name][0], p), min(best[name][1], d)]
        print(f"  round {round_} done", file=sys.stderr)
    results = {name: {"prefill_tok_s": len(prompt_ids) / p, "decode_tok_s": 1 / d} for name, (p, d) in best.items()}

    base = results.get("llama.cpp") or results.get("meta-reference")
    base_name = "llama.cpp" if "llama.cpp" in results else "meta-reference"
    if args.json:
        print(
            json.dumps(
                {
                    "model": path,
                    "prompt_tokens": len(prompt_ids),
                    "decode_tokens": args.decode_tokens,
                    "decode_after": len(decode_prompt),
                    "results": results,
                }
            )
        )
        return
    print(
        f"model: {os.path.basename(path)}   prompt: {len(prompt_ids)} tokens   decode: {args.decode_tokens} tokens "
        f"after {len(decode_prompt)}   "
        f"torch threads: {torch.get_num_threads()}"
    )
    print(f"{'engine':<16}{'prefill tok/s':>15}{'vs ' + base_name:>18}{'decode tok/s':>15}{'vs ' + base_name:>18}")
    for name, r in results.items():
        ratio_p = f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x" if base else "-"
        ratio_d = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else "-"
        print(f"{name:<16}{r['prefill_tok_s']:>15.1f}{ratio_p:>18}{r['decode_tok_s']:>15.1f}{ratio_d:>18}")
    if base_name != "meta-reference" and {"meta-reference", "plainllama-meta"} <= results.keys():
        ours, theirs = results["plainllama-meta"], results["meta-reference"]
        print(
            f"plainllama-meta vs meta-reference: prefill {ours['prefill_tok_s'] / theirs['prefill_tok_s']:.2f}x, "
            f"decode {ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x"
        )


if __name__ == "__main__":
    main()
