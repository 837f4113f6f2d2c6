"""`plainllama info MODEL`: what a model file is, without loading its weights."""

from __future__ import annotations

import json
from collections import Counter

from ..default_model import default_model_path
from ..errors import PlainLlamaError
from ..formats import Checkpoint, open_checkpoint
from ..formats.checkpoint import expected_shapes
from ..tokenizer import BytePairEncoding, SentencePieceBPE
from ..tokenizer.sentencepiece import SentencePieceModelFile
from ..tokenizer.tiktoken_bpe import TiktokenBPE

GIB = 1024**3


def tokenizer_kind(tok) -> str:
    model = tok.model
    if isinstance(model, BytePairEncoding):
        return f"byte-level BPE, {len(model.ranks)} merges"
    if isinstance(model, TiktokenBPE):
        return "byte-level BPE from tiktoken ranks (Llama 3)"
    if isinstance(model, (SentencePieceBPE, SentencePieceModelFile)):
        return "SentencePiece BPE with byte fallback (Llama 1/2)"
    return type(model).__name__


def describe(checkpoint: Checkpoint) -> dict:
    args = checkpoint.args
    shapes = expected_shapes(args)
    if args.tie_embeddings:
        shapes.pop("output.weight")
    params = sum(_count(s) for s in shapes.values())
    kv_bytes_per_token = 2 * args.n_layers * args.n_kv_heads * args.head_dim * 2  # keys and values, 16-bit
    tok = checkpoint.tokenizer
    chat = "jinja template" if checkpoint.chat_template else checkpoint.chat_format or "none"
    types = Counter(
        t.type for name, t in checkpoint.tensors.items() if not (args.tie_embeddings and name == "output.weight")
    )
    return {
        "path": checkpoint.path,
        "format": checkpoint.format,
        "name": checkpoint.name,
        "architecture": {
            "layers": args.n_layers,
            "dim": args.dim,
            "heads": args.n_heads,
            "kv_heads": args.n_kv_heads,
            "head_dim": args.head_dim,
            "ffn_dim": args.hidden_dim,
            "vocab_size": args.vocab_size,
            "context_length": args.context_length,
            "rope_theta": args.rope_theta,
            "rope_scaled": args.rope_freq_factors is not None,
            "tied_embeddings": args.tie_embeddings,
            "norm_eps": args.norm_eps,
        },
        "parameters": params,
        "tensor_types": dict(types.most_common()),
        "memory_gib": {
            "float32": round(params * 4 / GIB, 3),
            "bfloat16": round(params * 2 / GIB, 3),
            "float16": round(params * 2 / GIB, 3),
        },
        "kv_cache_mib_per_1k_tokens": round(kv_bytes_per_token * 1024 / 1024**2, 2),
        "tokenizer": {
            "kind": tokenizer_kind(tok),
            "vocab_size": tok.vocab_size,
            "bos": _piece(tok, tok.bos_id),
            "eos": _piece(tok, tok.eos_id),
            "end_tokens": [tok.tokens[i] for i in sorted(tok.end_ids)],
            "adds_bos": tok.add_bos,
        },
        "chat_format": chat,
        "notes": checkpoint.notes,
    }


def _count(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _piece(tok, token_id):
    return tok.tokens[token_id] if token_id is not None else None


def format_text(info: dict) -> str:
    a = info["architecture"]
    lines = [
        f"{info['path']}",
        f"  format        {info['format']}" + (f"  ({info['name']})" if info["name"] else ""),
        f"  architecture  llama: {a['layers']} layers, dim {a['dim']}, {a['heads']} heads ({a['kv_heads']} "
        f"key/value), head dim {a['head_dim']},"
        f" ffn {a['ffn_dim']}, vocab {a['vocab_size']}",
        f"  context       {a['context_length']} tokens, rope theta "
        f"{a['rope_theta']:g}{', scaled' if a['rope_scaled'] else ''}"
        f"{', tied embeddings' if a['tied_embeddings'] else ''}",
        f"  parameters    {info['parameters'] / 1e6:.1f} M",
        "  tensor types  " + ", ".join(f"{k} x{v}" for k, v in info["tensor_types"].items()),
        f"  memory        float32 {info['memory_gib']['float32']:.2f} GiB, bfloat16/float16 "
        f"{info['memory_gib']['bfloat16']:.2f} GiB"
        f" (+ KV cache {info['kv_cache_mib_per_1k_tokens']:.1f} MiB per 1k tokens in 16-bit)",
        f"  tokenizer     {info['tokenizer']['kind']}; {info['tokenizer']['vocab_size']} tokens, bos "
        f"{info['tokenizer']['bos']!r},"
        f" ends on {', '.join(info['tokenizer']['end_tokens'])}",
        f"  chat format   {info['chat_format']}",
    ]
    lines += [f"  note          {n}" for n in info["notes"]]
    return "\n".join(lines)


def run_command(args) -> int:
    if args.model and args.model_option and args.model != args.model_option:
        raise PlainLlamaError(f"two models given: {args.model} and -m {args.model_option}; give one")
    info = describe(open_checkpoint(args.model or args.model_option or default_model_path()))
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0
