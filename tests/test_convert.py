"""`plainllama convert` and `plainllama info`. Oracles: Hugging Face transformers loading what
--to hf writes, Meta's reference model and tokenizer, the sentencepiece library, and the
default model's own logits across the three formats."""

import json
import subprocess
import sys

import pytest
import torch

import plainllama
from gguf_files import write_llama_gguf
from helpers import CORPUS, oracle, run_cli

transformers = oracle("transformers")


def cli(*args):
    return run_cli(*args, timeout=600, check=True)


@pytest.fixture(scope="module")
def converted(model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    # 100 MB shards: the 538 MB float32 model becomes 6 files and an index, as transformers writes them
    cli("convert", model_path, str(out / "hf"), "--to", "hf", "--shard-size", "100M")
    cli("convert", str(out / "hf"), str(out / "meta"), "--to", "meta")
    return out


def test_default_model_gives_identical_logits_as_gguf_hf_and_meta(llm, converted):
    hf = plainllama.load(str(converted / "hf"), device="cpu", dtype="float32")
    meta = plainllama.load(str(converted / "meta"), device="cpu", dtype="float32")
    assert (hf.checkpoint.format, meta.checkpoint.format) == ("hf", "meta")
    text = "The capital of France is Paris. It has 2,165,423 people."
    ids = llm.tokenizer.encode(text)
    assert hf.tokenizer.encode(text) == ids == meta.tokenizer.encode(text)
    reference = llm.logits(ids)
    assert torch.equal(hf.logits(ids), reference)
    assert torch.equal(meta.logits(ids), reference)
    chat = [{"role": "user", "content": "Hi!"}]
    assert hf.encode_chat(chat) == llm.encode_chat(chat) == meta.encode_chat(chat)


def test_shards_and_index_as_transformers_writes_them(converted):
    """The index names every tensor once, each in the shard the safetensors library finds it in, and
    its total_size is the sum of the tensors' bytes; no shard passes the limit unless one tensor does."""
    from safetensors import safe_open

    folder = converted / "hf"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    assert files == [f"model-{i:05d}-of-00006.safetensors" for i in range(1, 7)]
    found, total = {}, 0
    for file in files:
        with safe_open(str(folder / file), "pt") as f:
            names = list(f.keys())  # noqa: SIM118
            for name in names:
                found[name] = file
                total += f.get_tensor(name).nbytes
        assert (folder / file).stat().st_size <= 100 << 20 or len(names) == 1
    assert index["weight_map"] == found and index["metadata"]["total_size"] == total
    assert "lm_head.weight" not in found  # tied: stored once, as the embedding


def test_meta_pth_is_an_intact_zip_that_torch_loads(llm, converted):
    """consolidated.00.pth is written tensor by tensor into the file torch.save lays out (skip_data):
    Python's zipfile finds every record's CRC-32 right, and torch.load(weights_only=True) gives the
    source's tensors, the tied output sharing the embedding's storage as torch.save would store it."""
    import zipfile

    path = converted / "meta" / "consolidated.00.pth"
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
    state = torch.load(path, weights_only=True, map_location="cpu")
    from plainllama.formats import open_checkpoint

    source = open_checkpoint(str(converted / "hf"))
    assert list(state) == list(source.tensors)
    for name, record in source.tensors.items():
        assert torch.equal(state[name], record.load()), name
    assert state["output.weight"].data_ptr() == state["tok_embeddings.weight"].data_ptr()


def test_transformers_loads_the_hf_folder(llm, converted):
    model = transformers.AutoModelForCausalLM.from_pretrained(converted / "hf", dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(converted / "hf")
    for text in CORPUS:
        # split_special_tokens: text that looks like a control token stays text, as in plainllama
        assert tokenizer(text, add_special_tokens=True, split_special_tokens=True).input_ids == llm.tokenizer.encode(
            text
        ), text
    ids = llm.tokenizer.encode("Llamas are members of the camelid family.")
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids])).logits[0], llm.logits(ids), atol=2e-4, rtol=1e-4)
    chat = [{"role": "user", "content": "What is 2+2?"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == llm.chat_format.render(
        chat
    )


def test_meta_llama3_checkpoint_to_hf_matches_meta_reference(tmp_path):
    """Meta folder (Llama 3.1 shapes, Meta's tokenizer.model) -> HF folder -> transformers, compared
    with Meta's reference model and tokenizer on the original."""
    oracle("llama_models")
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    from meta_files import llama3_tokenizer_model, reference_logits, reference_model, write_meta_checkpoint
    from helpers import CONFIGS, IDS

    params, theta = CONFIGS["llama3.1"]
    ref = reference_model(params, 128256, theta, seed=3)
    write_meta_checkpoint(tmp_path / "meta", params, ref.state_dict(), llama3_tokenizer_model(), n_shards=2)
    ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in ref.state_dict().items()})
    cli("convert", str(tmp_path / "meta"), str(tmp_path / "hf"), "--to", "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_scaling"]["rope_type"] == "llama3"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(torch.tensor([IDS])).logits[0], reference_logits(ref, IDS), atol=1e-4, rtol=1e-4
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    meta_tokenizer = MetaTokenizer.get_instance()
    for text in CORPUS:
        assert tokenizer(text, split_special_tokens=True).input_ids == meta_tokenizer.encode(
            text, bos=True, eos=False
        ), text
    # And back to Meta: the tokenizer.model is written again and equals the original.
    cli("convert", str(tmp_path / "hf"), str(tmp_path / "meta2"), "--to", "meta", "--dtype", "bfloat16")
    original = open(llama3_tokenizer_model(), "rb").read().split()
    assert open(tmp_path / "meta2" / "tokenizer.model", "rb").read().split() == original
    again = plainllama.load(str(tmp_path / "meta2"), device="cpu", dtype="float32")
    torch.testing.assert_close(again.logits(IDS), reference_logits(ref, IDS), atol=1e-4, rtol=1e-4)


def test_sentencepiece_vocabulary_to_hf(sentencepiece_model, sentencepiece_gguf, tmp_path):
    """A Llama 2-style vocabulary written as tokenizer.json: transformers' tokenizer equals sentencepiece."""
    cli("convert", str(sentencepiece_gguf), str(tmp_path / "hf"), "--to", "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in CORPUS:
        if text.strip() != text or "  " in text or not text:
            continue  # HF's Llama-2 normalizer and sentencepiece differ on edge whitespace; not ours to judge
        assert tokenizer(
            text, add_special_tokens=False, split_special_tokens=True
        ).input_ids == sentencepiece_model.encode(text), text


def test_convert_refuses_a_non_empty_destination(model_path, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = subprocess.run(
        [sys.executable, "-m", "plainllama", "convert", model_path, str(tmp_path), "--to", "hf"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "not an empty folder" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_info_for_each_format(converted, model_path):
    for path, fmt in ((model_path, "gguf"), (converted / "hf", "hf"), (converted / "meta", "meta")):
        info = json.loads(cli("info", str(path), "--json").stdout)
        assert info["format"] == fmt
        assert info["parameters"] == 134_515_008  # SmolLM2-135M, tied embeddings counted once
        arch = info["architecture"]
        assert (arch["layers"], arch["dim"], arch["heads"], arch["kv_heads"], arch["ffn_dim"], arch["vocab_size"]) == (
            30,
            576,
            9,
            3,
            1536,
            49152,
        )
        assert arch["tied_embeddings"] is True
        assert info["memory_gib"]["bfloat16"] == pytest.approx(134_515_008 * 2 / 1024**3, abs=1e-3)
        assert info["chat_format"] == "jinja template"
        assert "<|im_end|>" in info["tokenizer"]["end_tokens"]
    assert json.loads(cli("info", str(model_path), "--json").stdout)["tensor_types"] == {
        "Q4_1": 210,
        "F32": 61,
        "Q8_0": 1,
    }
    text = cli("info", str(model_path)).stdout
    assert "30 layers" in text and "134.5 M" in text


def run_convert(*args, preexec_fn=None):
    return subprocess.run(
        [sys.executable, "-m", "plainllama", "convert", *args],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=preexec_fn,
    )


@pytest.mark.parametrize("to", ["hf", "meta", "gguf"])
def test_a_write_that_fails_part_way_leaves_nothing(model_path, tmp_path, to):
    """A file-size limit (RLIMIT_FSIZE, which Python turns into EFBIG errors, as a full disk would
    give ENOSPC) stops the ~270 MB weights file after 20 MB: one clean error line, and neither the
    destination nor a temporary folder is left in the parent."""
    import resource

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 20, 20 << 20))

    result = run_convert(model_path, str(tmp_path / "out"), "--to", to, preexec_fn=limit_file_size)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(
        f"plainllama: error: {tmp_path / 'out'}: writing failed, nothing was left behind"
    ), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_destinations_that_cannot_be_written(model_path, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for destination, needle in ((a_file, "not an empty folder"), (a_file / "out", "cannot write there")):
        result = run_convert(model_path, str(destination), "--to", "hf")
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith(f"plainllama: error: {destination}: ") and needle in result.stderr, (
            result.stderr
        )
    assert a_file.read_text() == "mine"


def test_an_empty_destination_folder_is_used(model_path, tmp_path):
    """An existing empty folder is where the model goes (replaced atomically), with ordinary permissions;
    the size the free-space check expects is the weights file's size less its JSON header."""
    import os

    from plainllama.export import output_bytes
    from plainllama.formats import open_checkpoint

    (tmp_path / "out").mkdir()
    run_convert(model_path, str(tmp_path / "out"), "--to", "hf").check_returncode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    written = (tmp_path / "out" / "model.safetensors").stat().st_size
    assert (
        0 < written - output_bytes(open_checkpoint(model_path), "hf", torch.float32) < 64 << 10
    )  # auto: float32 for Q4_1/Q8_0


def test_convert_keeps_16_bit_precision_and_takes_m(tmp_path, vocab):
    """A BF16 GGUF (float32 norms, as llama.cpp writes them) converts to bfloat16 by default, not
    float32 (the oracle: safetensors' own header of the written file); -m names the source."""
    source = write_llama_gguf(
        tmp_path / "bf16.gguf",
        vocab,
        dim=64,
        n_heads=2,
        n_kv_heads=1,
        hidden_dim=128,
        matrix_type="BF16",
        embedding_type="BF16",
    )
    cli("convert", "-m", str(source), str(tmp_path / "hf"), "--to", "hf")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}
    refused = run_cli("convert", "-m", str(source), str(tmp_path / "a"), str(tmp_path / "b"), "--to", "hf")
    assert refused.returncode == 1 and "give only the destination" in refused.stderr


def test_sentencepiece_vocabulary_to_meta_writes_a_real_tokenizer_model(
    sentencepiece_model, sentencepiece_gguf, tmp_path
):
    """A Llama 2-style GGUF vocabulary becomes a tokenizer.model that the sentencepiece library loads
    and that encodes as the model it was made from; plainllama reads the folder with it."""
    spm = oracle("sentencepiece")
    cli("convert", "-m", str(sentencepiece_gguf), str(tmp_path / "meta"), "--to", "meta")
    assert not (tmp_path / "meta" / "tokenizer.json").exists()
    written = spm.SentencePieceProcessor(model_file=str(tmp_path / "meta" / "tokenizer.model"))
    assert written.get_piece_size() == sentencepiece_model.get_piece_size()
    assert (written.bos_id(), written.eos_id(), written.unk_id()) == (
        sentencepiece_model.bos_id(),
        sentencepiece_model.eos_id(),
        sentencepiece_model.unk_id(),
    )
    for text in CORPUS:
        assert written.encode(text) == sentencepiece_model.encode(text), text
    model = plainllama.load(str(tmp_path / "meta"), device="cpu", dtype="float32")
    assert model.tokenizer.encode("Hello world", bos=False) == sentencepiece_model.encode("Hello world")


LLAMA_3_2_1B = dict(
    dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, vocab=128256, context_length=8192,
    rope_theta=500000.0, tied=True,
)  # fmt: skip


def peak_rss_kib(code: str) -> int:
    """The peak resident memory of a fresh Python process running `code` (its ru_maxrss, in KiB)."""
    probe = f"{code}\nimport resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


def test_convert_memory_stays_near_the_largest_tensor(tmp_path):
    """A Llama 3.2 1B-shaped BF16 GGUF (2.5 GB; the largest tensor is the 525 MB embedding) converts
    to each format with a peak RSS below 1.2 x that tensor + the runtime: the RSS of a fresh process
    that imports the converter and opens the checkpoint without writing. Building the whole model
    first, as convert did, peaks at the model's size. Each output is deleted once checked (the files
    would take 10 GB of the test machine's disk)."""
    import shutil

    from gguf_files import write_big_gguf

    source = tmp_path / "1b-BF16.gguf"
    write_big_gguf(source, "BF16", **LLAMA_3_2_1B)
    runtime = peak_rss_kib(
        "import plainllama.cli.convert, plainllama.export.hf, plainllama.export.meta, plainllama.export.gguf, "
        f"safetensors, gguf\nfrom plainllama.formats import open_checkpoint\nopen_checkpoint({str(source)!r})"
    )
    largest = LLAMA_3_2_1B["vocab"] * LLAMA_3_2_1B["dim"] * 2 / 1024
    try:
        for to in ("hf", "meta", "gguf"):
            destination = tmp_path / ("out.gguf" if to == "gguf" else f"out-{to}")
            peak = peak_rss_kib(
                f"from plainllama.cli.main import main\nmain(['convert', '-m', {str(source)!r}, "
                f"{str(destination)!r}, '--to', {to!r}])"
            )
            assert destination.exists(), to
            assert peak < runtime + 1.2 * largest, f"{to}: peak {peak / 1024:.0f} MiB, runtime {runtime / 1024:.0f} MiB"
            if destination.is_dir():
                shutil.rmtree(destination)
            else:
                destination.unlink()
    finally:
        source.unlink()


def test_progress_on_a_terminal(model_path, tmp_path):
    """On a terminal, convert shows how much is written, over one line, and clears it at the end."""
    from test_cli import run_on_pty

    returncode, output = run_on_pty(
        [sys.executable, "-m", "plainllama", "convert", "-m", model_path, str(tmp_path / "out"), "--to", "hf"]
    )
    assert returncode == 0, output
    assert "[converting: " in output and "/0.54 GB written]" in output
    assert output.rstrip().endswith("wrote " + str(tmp_path / "out") + " (hf, float32)")
