"""Meta-format checkpoints for tests, written by Meta's own reference model.

The reference Transformer (llama_models/llama3/model.py, from llama-models==0.3.0) is built with
fairscale's model-parallel layers on a single-process gloo group, its weights are filled with random
values, and its state_dict is saved the way Meta's checkpoints are: consolidated.00.pth next to
params.json. Splitting into N model-parallel shards cuts each tensor along Meta's axes.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

REFERENCE_TOKENIZER = None


def llama3_tokenizer_model() -> str:
    """Meta's real Llama 3 tokenizer.model, shipped in the llama-models package."""
    import llama_models.llama3 as llama3

    return os.path.join(os.path.dirname(llama3.__file__), "tokenizer.model")


def init_model_parallel():
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs_init

    if not dist.is_initialized():
        store = tempfile.NamedTemporaryFile(prefix="plainllama-gloo-", delete=False).name
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)


def reference_model(params: dict, vocab_size: int, rope_theta: float, seed: int = 0, max_seq_len: int = 256):
    """Meta's reference Transformer with random weights (float32 parameters)."""
    init_model_parallel()
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    args = {k: v for k, v in params.items() if k != "vocab_size"}
    args.update(vocab_size=vocab_size, rope_theta=rope_theta, max_seq_len=max_seq_len, max_batch_size=1)
    model = Transformer(ModelArgs(**args))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)
    return model.eval()


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids]), start_pos=0)[0].float()


def meta_folders_by_shards(tmp_path_factory, n_layers: int, shard_counts, prefix: str) -> dict[int, str]:
    """A Llama 3-shaped random checkpoint (width 256, 8 query and 4 key/value heads, Meta's tokenizer),
    from Meta's reference model, written as Meta writes it in each of `shard_counts` shards:
    shard count -> folder."""
    params = {
        "dim": 256,
        "n_layers": n_layers,
        "n_heads": 8,
        "n_kv_heads": 4,
        "vocab_size": 128256,
        "multiple_of": 256,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
    }
    state = reference_model(params, 128256, 500000.0).state_dict()
    folders = {}
    for shards in shard_counts:
        folder = tmp_path_factory.mktemp(f"{prefix}-{shards}")
        write_meta_checkpoint(folder, params, state, llama3_tokenizer_model(), n_shards=shards)
        folders[shards] = str(folder)
    return folders


def write_meta_checkpoint(
    folder,
    params: dict,
    state_dict: dict,
    tokenizer_model: str,
    n_shards: int = 1,
    embedding_axis: int = 0,
    dtype=torch.bfloat16,
    tied: bool = False,
):
    """Save `state_dict` as Meta does, split into `n_shards` model-parallel shards."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f)
    os.symlink(tokenizer_model, os.path.join(folder, "tokenizer.model"))
    state = {k: v.detach().to(dtype).contiguous() for k, v in state_dict.items()}
    if tied:
        state.pop("output.weight")
    for k in range(n_shards):
        shard = {}
        for name, t in state.items():
            if t.dim() == 1:
                shard[name] = t.clone()
                continue
            if name == "tok_embeddings.weight":
                axis = embedding_axis
            elif any(part in name for part in (".wo.", ".w2.")):
                axis = 1
            else:
                axis = 0
            shard[name] = t.chunk(n_shards, dim=axis)[k].clone()
        torch.save(shard, os.path.join(folder, f"consolidated.{k:02d}.pth"))
    return folder
