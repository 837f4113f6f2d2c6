"""Write a model as a Hugging Face folder: config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json. transformers loads the result as LlamaForCausalLM."""

from __future__ import annotations

import json
import os

import torch

from ..formats import Checkpoint
from .rope import describe_rope
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


def write_hf(checkpoint: Checkpoint, folder: str, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    args = checkpoint.args
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for name, record in checkpoint.tensors.items():
        if name == "output.weight" and args.tie_embeddings:
            continue  # tied: HF stores the embedding once
        t = record.load().to(dtype)
        if name.endswith("attention.wq.weight"):
            t = apply_rotary_permutation(t, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = apply_rotary_permutation(t, args.n_kv_heads)
        tensors[hf_name(name)] = t.contiguous()
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})

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
