"""Write a model as one GGUF file, the file llama.cpp and Ollama run, with the gguf package's writer.

Matrices are written as F16, BF16 or Q8_0 (the gguf package's own quantizer: blocks of 32 values
with one float16 scale, what llama.cpp's Q8_0 is); norm gains and rotary divisors stay float32, as
llama.cpp's converter writes them. A matrix whose rows are not whole Q8_0 blocks is written F16
(llama.cpp's converter does the same). The q and k projections are written in Meta's rotary order,
which is both our naming's order and GGUF's (see formats/gguf.py).

The header (metadata and the table of tensors) needs only the shapes, which the config gives, so
it is written first and the tensors follow one at a time (see reading.py)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import PlainLlamaError
from ..formats.checkpoint import Checkpoint, expected_shapes
from ..formats.gguf import GLOBAL_TENSORS, LAYER_TENSORS
from ..tokenizer import BytePairEncoding, SentencePieceBPE, Tokenizer
from ..tokenizer.pretokenize import PRE_TOKENIZERS
from ..tokenizer.sentencepiece import UNUSED_TOKEN, SentencePieceModelFile
from ..tokenizer.tiktoken_bpe import TiktokenBPE
from .reading import read_tensor
from .tokenizer_json import tiktoken_merges

TYPES = ("F16", "BF16", "Q8_0")
Q8_BLOCK, Q8_BYTES = 32, 34  # values per block; bytes per block (a float16 scale and 32 int8s)
ROWS_PER_STEP = 1024  # rows quantized at a time, so the float32 copies the quantizer makes stay small

OUR_GLOBAL = {ours: theirs for theirs, ours in GLOBAL_TENSORS.items()}
OUR_LAYER = {ours: theirs for theirs, ours in LAYER_TENSORS.items()}


def gguf_name(name: str) -> str:
    if name in OUR_GLOBAL:
        return OUR_GLOBAL[name]
    _, layer, rest = name.split(".", 2)
    return f"blk.{layer}.{OUR_LAYER[rest.removesuffix('.weight')]}.weight"


def tensor_type(shape: tuple[int, ...], type_name: str) -> str:
    if len(shape) == 1:
        return "F32"
    if type_name == "Q8_0" and shape[-1] % Q8_BLOCK:
        return "F16"
    return type_name


def type_nbytes(shape: tuple[int, ...], type_name: str) -> int:
    count = torch.Size(shape).numel()
    if type_name == "Q8_0":
        return count // Q8_BLOCK * Q8_BYTES
    return count * {"F32": 4, "F16": 2, "BF16": 2}[type_name]


def output_bytes(checkpoint: Checkpoint, type_name: str) -> int:
    shapes = expected_shapes(checkpoint.args)
    if checkpoint.args.tie_embeddings:
        del shapes["output.weight"]
    return sum(type_nbytes(shape, tensor_type(shape, type_name)) for shape in shapes.values())


def encoded(tensor: torch.Tensor, type_name: str) -> np.ndarray:
    """The tensor's bytes as GGUF stores them, as a numpy array the writer takes."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if type_name == "F32":
        return tensor.float().numpy()
    if type_name == "F16":
        return tensor.half().numpy()
    if type_name == "BF16":
        return tensor.bfloat16().view(torch.int16).numpy().view(np.uint16)
    rows = tensor.reshape(-1, tensor.shape[-1])
    out = np.empty((rows.shape[0], rows.shape[1] // Q8_BLOCK * Q8_BYTES), dtype=np.uint8)
    for first in range(0, rows.shape[0], ROWS_PER_STEP):
        chunk = rows[first : first + ROWS_PER_STEP].float().numpy()
        out[first : first + ROWS_PER_STEP] = quantize(chunk, GGMLQuantizationType.Q8_0)
    return out


def write_gguf(checkpoint: Checkpoint, path: str, type_name: str, written=None) -> None:
    from gguf import GGMLQuantizationType, GGUFWriter

    args = checkpoint.args
    shapes = expected_shapes(args)
    names = [n for n in checkpoint.tensors if not (n == "output.weight" and args.tie_embeddings)]
    writer = GGUFWriter(path, "llama")
    write_metadata(writer, checkpoint, type_name)
    if args.rope_freq_factors is not None:
        # Llama 3.1's frequency scaling: one divisor per rotary frequency, as llama.cpp's converter writes it
        rope_freqs = np.asarray(args.rope_freq_factors, dtype=np.float32)
        writer.add_tensor_info("rope_freqs.weight", rope_freqs.shape, rope_freqs.dtype, rope_freqs.nbytes)
    types = {}
    for name in names:
        shape = shapes[name]
        types[name] = kind = tensor_type(shape, type_name)
        raw = GGMLQuantizationType[kind]
        numpy_dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "Q8_0": np.uint8}[kind]
        byte_shape = (*shape[:-1], shape[-1] // Q8_BLOCK * Q8_BYTES) if kind == "Q8_0" else shape
        writer.add_tensor_info(gguf_name(name), byte_shape, np.dtype(numpy_dtype), type_nbytes(shape, kind), raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if args.rope_freq_factors is not None:
        writer.write_tensor_data(rope_freqs)
    for name in names:
        data = encoded(read_tensor(checkpoint.tensors[name]), types[name])
        writer.write_tensor_data(data)
        if written is not None:
            written(data.nbytes)
    writer.close()


def write_metadata(writer, checkpoint: Checkpoint, type_name: str) -> None:
    from gguf import LlamaFileType

    args = checkpoint.args
    writer.add_name(checkpoint.name or "model")
    writer.add_file_type({"F16": LlamaFileType.MOSTLY_F16, "BF16": LlamaFileType.MOSTLY_BF16,
                          "Q8_0": LlamaFileType.MOSTLY_Q8_0}[type_name])  # fmt: skip
    writer.add_block_count(args.n_layers)
    writer.add_context_length(args.context_length)
    writer.add_embedding_length(args.dim)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_vocab_size(args.vocab_size)
    write_vocabulary(writer, checkpoint.tokenizer, args.vocab_size)
    if checkpoint.chat_template:
        writer.add_chat_template(checkpoint.chat_template)


def pre_tokenizer_name(model: BytePairEncoding) -> str:
    for name, rule in PRE_TOKENIZERS.items():
        if rule == (model.pattern_strings, model.whole_piece_first):
            return name
    raise PlainLlamaError(
        "this vocabulary cuts text with a pre-tokenizer that has no name in GGUF (llama.cpp knows its rules by "
        "name), so it cannot be written as a GGUF file; convert it with --to hf instead"
    )


def write_vocabulary(writer, tok: Tokenizer, vocab_size: int) -> None:
    model = tok.model
    tokens, types = list(tok.tokens), list(tok.token_types)
    if isinstance(model, BytePairEncoding | TiktokenBPE):
        if isinstance(model, TiktokenBPE):
            vocab, merges = tiktoken_merges(model)
            for token, i in vocab.items():
                tokens[i] = token  # GPT-2's byte-to-character spelling, as llama.cpp reads "gpt2" vocabularies
            pre = "llama-bpe"
        else:
            merges = [f"{left} {right}" for (left, right), _ in sorted(model.ranks.items(), key=lambda item: item[1])]
            pre = pre_tokenizer_name(model)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges(merges)
    elif isinstance(model, SentencePieceBPE | SentencePieceModelFile):
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        if isinstance(model, SentencePieceBPE):
            scores, unk, add_prefix = model.scores, model.unk_id, model.add_space_prefix
        else:
            scores = [model.sp.get_score(i) for i in range(len(tokens))]
            unk, add_prefix = model.sp.unk_id(), True
        writer.add_token_scores(scores)
        if unk is not None:
            writer.add_unk_token_id(unk)
        writer.add_add_space_prefix(add_prefix)
    else:
        raise PlainLlamaError(f"no GGUF form for a {type(model).__name__} vocabulary")
    # An embedding padded past the vocabulary gets named unused tokens, as llama.cpp's converter adds them:
    # llama.cpp takes the vocabulary's size from the token list.
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(UNUSED_TOKEN)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if tok.bos_id is not None:
        writer.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        writer.add_eos_token_id(tok.eos_id)
    writer.add_add_bos_token(tok.add_bos)
