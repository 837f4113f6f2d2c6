"""Write a model as a Meta folder: params.json, consolidated.00.pth, tokenizer.model.

Meta's tokenizer.model holds either Llama 3's tiktoken ranks or a SentencePiece model. Other
vocabularies (a GGUF's GPT-2-style BPE, for example) have no tokenizer.model form; for those the
tokenizer is written as tokenizer.json + tokenizer_config.json beside the weights, which
plainllama reads in a Meta folder that has no tokenizer.model.
"""

from __future__ import annotations

import base64
import json
import os

import torch

from ..errors import PlainLlamaError
from ..formats import Checkpoint
from ..formats.checkpoint import expected_shapes
from ..formats.meta import feed_forward_width
from ..tokenizer import BytePairEncoding
from ..tokenizer.bpe import CHAR_TO_BYTE
from ..tokenizer.pretokenize import LLAMA3
from ..tokenizer.sentencepiece import SentencePieceBPE, SentencePieceModelFile
from ..tokenizer.tiktoken_bpe import LLAMA3_SPECIAL_TOKENS, TiktokenBPE
from .pth_file import write_pth
from .reading import tensors_in_order
from .rope import describe_rope
from .sentencepiece_proto import model_proto
from .tokenizer_json import write_tokenizer


def ffn_params(dim: int, hidden_dim: int) -> dict:
    """multiple_of / ffn_dim_multiplier that make Meta's rule give exactly `hidden_dim`."""
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if feed_forward_width(dim, multiple_of, None) == hidden_dim:
            return {"multiple_of": multiple_of}
    multiplier = hidden_dim / int(2 * (4 * dim) / 3)
    if feed_forward_width(dim, hidden_dim, multiplier) == hidden_dim:  # round up to one multiple of hidden_dim
        return {"multiple_of": hidden_dim, "ffn_dim_multiplier": multiplier}
    raise PlainLlamaError(f"feed-forward width {hidden_dim} cannot be expressed in params.json for dim {dim}")


def write_meta(checkpoint: Checkpoint, folder: str, dtype: torch.dtype, written=None) -> None:
    args = checkpoint.args
    rope = describe_rope(args)
    params = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_seq_len": args.context_length,
        **ffn_params(args.dim, args.hidden_dim),
    }
    if args.head_dim != args.dim // args.n_heads:
        raise PlainLlamaError(f"head width {args.head_dim} is not dim/n_heads; Meta's params.json cannot say so")
    if rope is not None:
        if rope["rope_type"] != "llama3" or (rope["factor"], rope["original_max_position_embeddings"]) != (8.0, 8192):
            raise PlainLlamaError(
                f"rotary scaling {rope} has no params.json form (Meta's use_scaled_rope is factor 8 over 8192)"
            )
        params["use_scaled_rope"] = True
    os.makedirs(folder, exist_ok=True)
    # Meta's reference model always has output.weight, tied or not: write it, so that it loads there too
    # (sharing the embedding's storage, which torch.save stores once).
    shapes = expected_shapes(args)
    owners: dict[int, str] = {}  # record -> the first name it is saved under
    layout = {}
    for name, record in checkpoint.tensors.items():
        owner = owners.setdefault(id(record), name)
        layout[name] = (shapes[name], dtype, owner)
    names = [name for name, (_, _, owner) in layout.items() if owner == name]
    write_pth(os.path.join(folder, "consolidated.00.pth"), layout, tensors_in_order(checkpoint, names, dtype, written))
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump(params, f, indent=2)
    write_tokenizer_model(folder, checkpoint)


def write_tokenizer_model(folder: str, checkpoint: Checkpoint) -> None:
    """tokenizer.model in the form Meta's code reads: Llama 3's tiktoken ranks, or a SentencePiece
    model (Llama 2). Other vocabularies have no tokenizer.model form (see the module's docstring)."""
    tok = checkpoint.tokenizer
    ranks = llama3_ranks(tok)
    path = os.path.join(folder, "tokenizer.model")
    if ranks is not None:
        with open(path, "wb") as f:
            for rank, token in enumerate(ranks):
                f.write(base64.b64encode(token) + b" %d\n" % rank)
    elif isinstance(tok.model, SentencePieceModelFile):
        with open(path, "wb") as f:
            f.write(tok.model.sp.serialized_model_proto())
    elif isinstance(tok.model, SentencePieceBPE):
        model = tok.model
        unk = tok.tokens[model.unk_id] if model.unk_id is not None else None
        bos = tok.tokens[tok.bos_id] if tok.bos_id is not None else None
        eos = tok.tokens[tok.eos_id] if tok.eos_id is not None else None
        with open(path, "wb") as f:
            f.write(model_proto(tok.tokens, model.scores, tok.token_types, unk, bos, eos, model.add_space_prefix))
    else:
        write_tokenizer(folder, tok, checkpoint.chat_template)


def llama3_ranks(tok) -> list[bytes] | None:
    """The token bytes in rank order if this vocabulary is Llama 3's (so that tokenizer.model can
    hold it), else None. A byte-level BPE read from tokenizer.json qualifies when it uses Meta's
    pattern and whole-piece lookup, its merges make tokens in id order, and Meta's 256 special
    tokens follow the base vocabulary."""
    model = tok.model
    if isinstance(model, TiktokenBPE):
        return [model.token_bytes(i) for i in range(model.n_base)]
    if not isinstance(model, BytePairEncoding) or model.pattern_strings != (LLAMA3,) or not model.whole_piece_first:
        return None
    n_base = tok.vocab_size - len(LLAMA3_SPECIAL_TOKENS)
    if n_base <= 0 or tok.tokens[n_base:] != LLAMA3_SPECIAL_TOKENS:
        return None
    made = [model.ids[left + right] for (left, right), _ in sorted(model.ranks.items(), key=lambda item: item[1])]
    if made != sorted(made):  # tiktoken merges lowest id first; a merge list in another order is another tokenizer
        return None
    try:
        return [bytes(CHAR_TO_BYTE[c] for c in tok.tokens[i]) for i in range(n_base)]
    except KeyError:
        return None
