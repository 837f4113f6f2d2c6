"""Hugging Face model folders: config.json, model.safetensors (or shards + an index), tokenizer.json.

Two differences from Meta's layout live here and nowhere else:
- names: `model.layers.0.self_attn.q_proj.weight` is Meta's `layers.0.attention.wq.weight`;
- rotary order: HF's conversion script permutes the rows of wq and wk so that its rotary
  embedding can rotate the first half of each head against the second half; Meta (and model.py)
  rotate adjacent pairs. We undo that permutation on load.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct

import torch

from ..errors import PlainLlamaError
from ..model import ModelArgs, llama3_rope_factors
from .fields import integer, mapping, number, string
from .checkpoint import Checkpoint, CheckpointTensor, StoredTensor, expected_shapes
from .hf_tokenizer import load_tokenizer_json, read_json

log = logging.getLogger("plainllama")

GLOBAL_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")

READ_KEYS = {
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "max_position_embeddings",
    "tie_word_embeddings",
    "head_dim",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
}
# Settings of training or of transformers itself that do not change inference.
HARMLESS_KEYS = {
    "torch_dtype",
    "dtype",
    "transformers_version",
    "initializer_range",
    "use_cache",
    "pretraining_tp",
    "attention_dropout",
    "_name_or_path",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "torchscript",
    "tokenizer_class",
    "unsloth_version",
    "quantization_config_removed",
}


def looks_like(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "config.json"))


def undo_rotary_permutation(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF stores each head's rows as [first halves of the pairs..., second halves...]; Meta
    interleaves them [x0, y0, x1, y1, ...]. Rows [H*Hd, D] -> same shape, Meta's order."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def rope_settings(path: str, config: dict, head_dim: int) -> tuple[float, tuple[float, ...] | None]:
    """(rope theta, per-frequency divisors or None) from config.json's rope fields."""
    # transformers 4 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters.
    rope = dict(mapping(path, "'rope_parameters'", config.get("rope_parameters") or {}))
    rope.update(mapping(path, "'rope_scaling'", config.get("rope_scaling") or {}))
    theta = number(path, "the rope theta", rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))

    def field(name):
        if name not in rope:
            raise PlainLlamaError(f"{path}: rope scaling of type {kind!r} needs '{name}'")
        return number(path, f"rope scaling '{name}'", rope[name])

    if kind == "default":
        factors = None
    elif kind == "linear":
        factors = (field("factor"),) * (head_dim // 2)
    elif kind == "llama3":
        factors = llama3_rope_factors(
            head_dim,
            theta,
            field("factor"),
            field("low_freq_factor"),
            field("high_freq_factor"),
            int(field("original_max_position_embeddings")),
        )
    else:
        raise PlainLlamaError(
            f"{path}: rope type {kind!r} is not supported (plainllama supports default, linear and llama3)"
        )
    return theta, factors


def model_args(path: str, config: dict) -> tuple[ModelArgs, list[str]]:
    if config.get("model_type") not in ("llama", None) or "LlamaForCausalLM" not in (
        config.get("architectures") or ["LlamaForCausalLM"]
    ):
        raise PlainLlamaError(
            f"{path}: model type {config.get('model_type')!r} / {config.get('architectures')} is not supported "
            "(plainllama runs LlamaForCausalLM)"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise PlainLlamaError(f"{path}: hidden_act {config['hidden_act']!r} is not supported (Llama uses silu)")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise PlainLlamaError(f"{path}: biases in attention or MLP layers are not part of the Llama architecture")
    notes = [
        f"config.json key {k!r} is not known to plainllama and was ignored"
        for k in sorted(config)
        if k not in READ_KEYS | HARMLESS_KEYS
    ]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in config:
            raise PlainLlamaError(f"{path}: '{key}' is missing")
        integer(path, f"'{key}'", config[key])
    for key in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
        if config.get(key) is not None:
            integer(path, f"'{key}'", config[key])
    for key in ("rms_norm_eps", "rope_theta"):
        if config.get(key) is not None:
            number(path, f"'{key}'", config[key])

    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or dim // n_heads
    theta, factors = rope_settings(path, config, head_dim)
    try:
        args = ModelArgs(
            dim=dim,
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            vocab_size=config["vocab_size"],
            hidden_dim=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_freq_factors=factors,
            context_length=config.get("max_position_embeddings", 4096),
            head_dim=head_dim,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
    except ValueError as e:
        raise PlainLlamaError(f"{path}: {e}") from None
    return args, notes


def weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = mapping(index, "'weight_map'", read_json(index).get("weight_map") or {})
        files = sorted({string(index, "a file in 'weight_map'", f) for f in weight_map.values()})
        outside = [f for f in files if os.path.basename(f) != f]
        if outside:  # the index names files beside it, not elsewhere on the machine
            raise PlainLlamaError(f"{index}: {outside[0]!r} is not a file name in this folder")
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise PlainLlamaError(f"{folder}: {missing[0]} is listed in model.safetensors.index.json but missing")
        return [os.path.join(folder, f) for f in files]
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    if any(f.endswith((".bin", ".pt")) for f in os.listdir(folder)):
        raise PlainLlamaError(f"{folder}: only pickled PyTorch weights (.bin) found; plainllama reads safetensors")
    raise PlainLlamaError(f"{folder}: no model.safetensors (or model.safetensors.index.json) next to config.json")


def open_safetensors(path: str):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise PlainLlamaError(
            f"{path}: not a readable safetensors file ({e}); the file may be truncated or corrupt"
        ) from None


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def byte_ranges(path: str) -> dict[str, tuple[str, int, int]]:
    """name -> (dtype, first byte, end byte) of each tensor in a safetensors file, from its header:
    8 bytes of header length, a JSON header whose data_offsets count from the header's end. The
    safetensors library reads the tensors; this is only where they are, for streaming from disk."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    start = 8 + length
    return {
        name: (h["dtype"], start + h["data_offsets"][0], start + h["data_offsets"][1])
        for name, h in header.items()
        if name != "__metadata__"
    }


def stored_tensor(path: str, ranges: dict, hf_name: str, name: str, shape, args: ModelArgs) -> StoredTensor | None:
    dtype, first, end = ranges[hf_name]
    if dtype not in SAFETENSORS_DTYPES:
        return None

    def decode(raw: torch.Tensor) -> torch.Tensor:
        t = raw.view(SAFETENSORS_DTYPES[dtype]).view(shape)
        if name.endswith("attention.wq.weight"):
            return undo_rotary_permutation(t, args.n_heads)
        if name.endswith("attention.wk.weight"):
            return undo_rotary_permutation(t, args.n_kv_heads)
        return t

    return StoredTensor(path, first, end - first, decode)


def sampling_settings(folder: str) -> dict:
    """The sampling settings generation_config.json recommends, in SamplingSettings' names."""
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    config = read_json(path)
    if config.get("do_sample") is False:
        return {"temperature": 0.0}
    settings = {}
    for ours, theirs in (
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("repetition_penalty", "repetition_penalty"),
        ("min_p", "min_p"),
    ):
        value = config.get(theirs)
        if value is not None:
            settings[ours] = (
                integer(path, theirs, value) if ours == "top_k" else number(path, theirs, value, positive=False)
            )
    return settings


def read_tokenizer(folder: str, config: dict):
    """(tokenizer, Jinja chat template) from tokenizer.json and its companions; the end tokens
    are config.json's and generation_config.json's eos_token_id."""
    end_ids: set[int] = set()
    for source in (
        config,
        read_json(os.path.join(folder, "generation_config.json"))
        if os.path.isfile(os.path.join(folder, "generation_config.json"))
        else {},
    ):
        eos = source.get("eos_token_id")
        for token in eos if isinstance(eos, list) else [eos] if eos is not None else []:
            end_ids.add(integer(folder, "eos_token_id", token, minimum=0))
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise PlainLlamaError(f"{folder}: no tokenizer.json next to config.json")
    tokenizer = load_tokenizer_json(folder, end_ids)
    tokenizer_config_path = os.path.join(folder, "tokenizer_config.json")
    chat_template = (
        read_json(tokenizer_config_path).get("chat_template") if os.path.isfile(tokenizer_config_path) else None
    )
    jinja_path = os.path.join(folder, "chat_template.jinja")  # transformers 5 writes the template here
    if chat_template is None and os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            chat_template = f.read()
    return tokenizer, chat_template


def load_hf(folder: str) -> Checkpoint:
    config_path = os.path.join(folder, "config.json")
    config = read_json(config_path)
    args, notes = model_args(config_path, config)

    handles = {}  # our name -> (open file, HF name)
    for path in weight_files(folder):
        f = open_safetensors(path)
        names = f.keys()  # a safetensors handle lists its tensors but is not iterable
        for hf_name in names:
            ours = our_name(hf_name)
            if ours is None:
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue  # a cached rotary table some old exports carry; recomputed
                raise PlainLlamaError(f"{path}: unexpected tensor {hf_name!r} (not part of a Llama model)")
            handles[ours] = (f, hf_name, path)

    # Claims are compared with what the files hold before anything is sized by them (9 tensors a layer).
    if args.n_layers * 9 > len(handles):
        raise PlainLlamaError(
            f"{folder}/config.json: num_hidden_layers is {args.n_layers}, but the weights hold {len(handles)} tensors"
        )
    expected = expected_shapes(args)
    if "output.weight" not in handles and "tok_embeddings.weight" in handles:
        args.tie_embeddings = True
        handles["output.weight"] = handles["tok_embeddings.weight"]
    missing = [n for n in expected if n not in handles]
    if missing:
        raise PlainLlamaError(f"{folder}: missing tensor(s) {', '.join(missing[:4])}")
    extra = sorted(set(handles) - set(expected))
    if extra:
        raise PlainLlamaError(f"{folder}: tensor {extra[0]!r} does not belong to a {args.n_layers}-layer model")

    tensors, records, ranges = {}, {}, {}
    for name, (f, hf_name, path) in handles.items():
        view = f.get_slice(hf_name)
        shape = tuple(view.get_shape())
        if shape != expected[name]:
            raise PlainLlamaError(
                f"{path}: {hf_name} has shape {list(shape)}, but config.json implies {list(expected[name])}"
            )
        key = (path, hf_name)
        if key not in records:  # tied weights: one record for both names
            if path not in ranges:
                ranges[path] = byte_ranges(path)
            records[key] = CheckpointTensor(
                str(view.get_dtype()).upper(),
                tensor_source(f, hf_name, name, args),
                stored=stored_tensor(path, ranges[path], hf_name, name, shape, args),
            )
        tensors[name] = records[key]

    tokenizer, chat_template = read_tokenizer(folder, config)
    for note in notes:
        log.warning("%s: %s", folder, note)
    return Checkpoint(
        format="hf",
        path=folder,
        args=args,
        tensors=tensors,
        tokenizer=tokenizer,
        chat_template=chat_template,
        name=config.get("_name_or_path") or None,
        notes=notes,
        sampling=sampling_settings(folder),
    )


def our_name(hf_name: str) -> str | None:
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    m = LAYER_NAME.fullmatch(hf_name)
    if m and m.group(2) in LAYER_NAMES:
        return f"layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.weight"
    return None


def tensor_source(f, hf_name: str, name: str, args: ModelArgs):
    def load() -> torch.Tensor:
        t = f.get_tensor(hf_name)
        if name.endswith("attention.wq.weight"):
            return undo_rotary_permutation(t, args.n_heads)
        if name.endswith("attention.wk.weight"):
            return undo_rotary_permutation(t, args.n_kv_heads)
        return t

    return load
