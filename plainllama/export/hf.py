"""Write a model as a Hugging Face folder: config.json, model.safetensors (or shards and their
index), tokenizer.json, tokenizer_config.json, generation_config.json. transformers loads the
result as LlamaForCausalLM."""

from __future__ import annotations

import json
import os

import torch

from ..formats import Checkpoint
from ..formats.checkpoint import expected_shapes
from .reading import tensors_in_order
from .rope import describe_rope
from .safetensors_file import write_safetensors
from .tokenizer_json import write_tokenizer

LAYER_PARTS = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
GLOBAL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def apply_rotary_permutation(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved pair order -> HF's half-split order (the inverse of formats/hf.py)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_name(name: str) -> str:
    if name in GLOBAL:
        return GLOBAL[name]
    _, layer, rest = name.split(".", 2)
    part = rest.removesuffix(".weight")
    return f"model.layers.{layer}.{LAYER_PARTS[part]}.weight"


def shard_plan(entries: list[tuple[str, tuple[int, ...]]], itemsize: int, shard_bytes: int) -> list[list[int]]:
    """The entries' indices cut into consecutive shards of at most shard_bytes each (a tensor larger
    than that takes a shard of its own), as transformers' save_pretrained cuts them."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape) in enumerate(entries):
        nbytes = torch.Size(shape).numel() * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def permuted_for_hf(tensors, args):
    for name, t in tensors:
        if name.endswith("attention.wq.weight"):
            t = apply_rotary_permutation(t, args.n_heads).contiguous()
        elif name.endswith("attention.wk.weight"):
            t = apply_rotary_permutation(t, args.n_kv_heads).contiguous()
        yield hf_name(name), t


def write_hf(
    checkpoint: Checkpoint, folder: str, dtype: torch.dtype, shard_bytes: int = 5 * 10**9, written=None
) -> None:
    """Tensors go to model.safetensors, or above shard_bytes to model-0000i-of-0000N.safetensors with
    model.safetensors.index.json saying which tensor is in which file (transformers' layout)."""
    args = checkpoint.args
    os.makedirs(folder, exist_ok=True)
    shapes = expected_shapes(args)
    # tied: HF stores the embedding once
    names = [n for n in checkpoint.tensors if not (n == "output.weight" and args.tie_embeddings)]
    entries = [(hf_name(n), shapes[n]) for n in names]
    shards = shard_plan(entries, dtype.itemsize, shard_bytes)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    tensors = permuted_for_hf(tensors_in_order(checkpoint, names, dtype, written), args)
    weight_map = {}
    for file, shard in zip(files, shards, strict=True):
        write_safetensors(os.path.join(folder, file), [entries[i] for i in shard], dtype, tensors)
        weight_map.update({entries[i][0]: file for i in shard})
    if len(files) > 1:
        total = sum(torch.Size(shape).numel() for _, shape in entries) * dtype.itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)

    tok = checkpoint.tokenizer
    rope = describe_rope(args)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope,
        "max_position_embeddings": args.context_length,
        "tie_word_embeddings": args.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tok.bos_id, "eos_token_id": sorted(tok.end_ids)}, f, indent=2)
    write_tokenizer(folder, tok, checkpoint.chat_template)
