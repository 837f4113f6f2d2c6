"""`plainllama convert --to gguf`: the written file checked by llama.cpp (llama-cpp-python) loading it,
by the gguf package's reader and dequantizers, and by the tokenizers the source came with (Meta's
tiktoken-based tokenizer, the sentencepiece library)."""

import numpy as np
import pytest
import torch

import plainllama
from helpers import CORPUS, llama_cpp_logits, oracle, run_cli

llama_cpp = oracle("llama_cpp", "llama-cpp-python is installed by `scripts/setup.sh --test`")
gguf = oracle("gguf")

PROMPT = "The capital of France is"


def convert(*args):
    return run_cli("convert", *args, timeout=600, check=True)


def llama_cpp_greedy(path, ids, n):
    model = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    tokens = []
    for token in model.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        if len(tokens) == n or token == model.token_eos():
            break
        tokens.append(token)
    return tokens


def llama_cpp_tokens(path, text):
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)


@pytest.fixture(scope="module")
def written(model_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    convert("-m", model_path, str(folder / "f16.gguf"), "--to", "gguf")
    convert("-m", model_path, str(folder / "q8.gguf"), "--to", "gguf", "--dtype", "q8_0")
    return folder


def test_tensors_are_the_gguf_packages_own_encoding(model_path, written):
    """F16: the source's values rounded to float16; Q8_0: exactly what the gguf package's quantizer
    makes of the whole tensor (the converter quantizes in row chunks); norms stay float32."""
    from plainllama.export.gguf import gguf_name
    from plainllama.formats import open_checkpoint

    checkpoint = open_checkpoint(model_path)
    f16 = {t.name: t for t in gguf.GGUFReader(str(written / "f16.gguf")).tensors}
    q8 = {t.name: t for t in gguf.GGUFReader(str(written / "q8.gguf")).tensors}
    assert "output.weight" not in f16  # tied, as in the source
    for name in ("tok_embeddings.weight", "layers.3.attention.wq.weight", "layers.29.feed_forward.w2.weight"):
        values = checkpoint.tensors[name].load().numpy()
        ours = f16[gguf_name(name)]
        assert ours.tensor_type == gguf.GGMLQuantizationType.F16
        assert np.array_equal(np.asarray(ours.data).reshape(values.shape), values.astype(np.float16))
        packed = q8[gguf_name(name)]
        assert packed.tensor_type == gguf.GGMLQuantizationType.Q8_0
        assert np.array_equal(
            np.asarray(packed.data).reshape(-1), gguf.quants.quantize(values, packed.tensor_type).reshape(-1)
        )
    norm = f16["blk.0.attn_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize("kind", ["f16", "q8"])
def test_llama_cpp_runs_the_written_file(llm, written, kind):
    """llama.cpp loads the file, tokenizes like plainllama, and its greedy tokens are plainllama's on
    the same file; the F16 file's are also the source model's (computed in float32)."""
    path = written / f"{kind}.gguf"
    for text in CORPUS:
        assert llama_cpp_tokens(path, text) == llm.tokenizer.encode(text), text
    ids = llm.tokenizer.encode(PROMPT)
    theirs = llama_cpp_greedy(path, ids, 16)
    ours = plainllama.load(str(path), device="cpu", dtype="float32")
    assert ours.chat_format.render([{"role": "user", "content": "Hi"}]) == llm.chat_format.render(
        [{"role": "user", "content": "Hi"}]
    )
    assert ours.generate(PROMPT, max_new_tokens=16, temperature=0).tokens == theirs
    if kind == "f16":
        source = plainllama.load(llm.checkpoint.path, device="cpu", dtype="float32")
        assert source.generate(PROMPT, max_new_tokens=16, temperature=0).tokens == theirs


def test_meta_llama3_checkpoint_to_gguf(tmp_path):
    """A Meta folder (Llama 3.1 shapes and rotary scaling, Meta's real tokenizer.model) -> GGUF. BF16:
    the gguf package reads back Meta's bfloat16 tensors bit for bit (GGUF keeps Meta's rotary row
    order). F16: llama.cpp tokenizes like Meta's own tokenizer, and its logits agree with Meta's
    reference model. llama.cpp rounds the activations to float16 for F16 weights (2^-11 relative per
    product input), so the tolerance is that of a float16 computation: measured max 0.0042 on logits of
    standard deviation 1.0, mean 5e-4. (With BF16 weights it rounds activations to bfloat16: 8x more.)"""
    oracle("llama_models")
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    from helpers import CONFIGS, IDS
    from meta_files import llama3_tokenizer_model, reference_logits, reference_model, write_meta_checkpoint
    from plainllama.export.gguf import gguf_name

    params, theta = CONFIGS["llama3.1"]
    ref = reference_model(params, 128256, theta, seed=3)
    ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in ref.state_dict().items()})
    state = {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
    write_meta_checkpoint(tmp_path / "meta", params, state, llama3_tokenizer_model(), n_shards=2)
    convert("-m", str(tmp_path / "meta"), str(tmp_path / "bf16.gguf"), "--to", "gguf", "--dtype", "bf16")
    convert("-m", str(tmp_path / "meta"), str(tmp_path / "f16.gguf"), "--to", "gguf", "--dtype", "f16")
    written = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "bf16.gguf")).tensors}
    for name, tensor in state.items():
        if name.endswith("norm.weight"):
            assert np.array_equal(np.asarray(written[gguf_name(name)].data), tensor.float().numpy()), name
        else:
            bits = np.asarray(written[gguf_name(name)].data).view(np.int16).reshape(tensor.shape)
            assert np.array_equal(bits, tensor.view(torch.int16).numpy()), name
    meta_tokenizer = MetaTokenizer.get_instance()
    for text in CORPUS:
        assert llama_cpp_tokens(tmp_path / "f16.gguf", text) == meta_tokenizer.encode(text, bos=False, eos=False)
    theirs, reference = llama_cpp_logits(tmp_path / "f16.gguf", IDS), reference_logits(ref, IDS)
    torch.testing.assert_close(theirs, reference, atol=1e-2, rtol=1e-2)
    assert (theirs - reference).abs().mean() < 2e-3
    assert torch.equal(theirs.argmax(-1), reference.argmax(-1))


def test_sentencepiece_vocabulary_to_gguf(sentencepiece_model, sentencepiece_gguf, tmp_path):
    """A Llama 2-style vocabulary: llama.cpp reading the written file tokenizes as sentencepiece does."""
    convert("-m", str(sentencepiece_gguf), str(tmp_path / "out.gguf"), "--to", "gguf")
    for text in CORPUS:
        if text.strip() != text or "  " in text or not text:
            continue  # llama.cpp and sentencepiece differ on edge whitespace; not ours to judge
        assert llama_cpp_tokens(tmp_path / "out.gguf", text) == sentencepiece_model.encode(text), text


def test_gguf_destination_must_be_new(model_path, tmp_path):
    (tmp_path / "taken.gguf").write_text("mine")
    result = run_cli("convert", "-m", model_path, str(tmp_path / "taken.gguf"), "--to", "gguf")
    assert result.returncode == 1 and "exists; choose a new file name" in result.stderr
    assert (tmp_path / "taken.gguf").read_text() == "mine"
    bad = run_cli("convert", "-m", model_path, str(tmp_path / "x.gguf"), "--to", "gguf", "--dtype", "q4_0")
    assert bad.returncode == 1 and "--dtype q4_0: for gguf expected" in bad.stderr
    sharded = run_cli("convert", "-m", model_path, str(tmp_path / "x.gguf"), "--to", "gguf", "--shard-size", "1G")
    assert sharded.returncode == 1 and "--shard-size applies to --to hf only" in sharded.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]
