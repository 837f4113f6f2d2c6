"""Bad input gets one clear error naming the file and the problem: never a traceback, a silent wrong
answer, or memory sized by a corrupt claim. A corpus of defects, one per case, made from a valid
random-weight model: GGUF metadata of the wrong type or range, a tensor table that breaks ggml's
layout rules, params.json and config.json fields of the wrong type, and a fuzz test that edits a
valid GGUF header at many offsets.

The oracle for "corrupt" is the format's own rule, as llama.cpp applies it: ggml places each tensor's
data right after the previous one's, aligned (gguf.c: gguf_init_from_file checks the same), a row
holds whole blocks, counts are positive."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from gguf_files import write_llama_gguf
from helpers import run_cli
import plainllama
from plainllama import PlainLlamaError, chat_format
from plainllama.export.hf import write_hf
from plainllama.export.meta import write_meta
from plainllama.formats import open_checkpoint
from plainllama.formats.meta import load_shard


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory, vocab):
    path = tmp_path_factory.mktemp("bad") / "good.gguf"
    return write_llama_gguf(
        path, vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, matrix_type="Q8_0"
    )


def rewritten(src, dst, changes: dict):
    """A copy of the GGUF file `src` with metadata `changes`: key -> (value, GGUFValueType), or None to drop."""
    reader = GGUFReader(str(src))
    w = GGUFWriter(str(dst), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in changes:
            continue
        w.add_key_value(field.name, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    for key, change in changes.items():
        if change is not None:
            value, kind = change
            sub = None
            if kind == GGUFValueType.ARRAY:
                sub = GGUFValueType.UINT32
            w.add_key_value(key, value, kind, sub)
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def patched(src, dst, edits: dict[int, bytes]):
    """A copy of `src` with bytes replaced at the given positions."""
    data = bytearray(open(src, "rb").read())
    for at, new in edits.items():
        data[at : at + len(new)] = new
    open(dst, "wb").write(data)
    return dst


def tensor_field_positions(path, index: int) -> dict[str, int]:
    """Byte positions of the dims, type and offset of tensor `index` in the tensor table."""
    reader = GGUFReader(str(path))
    base = reader.data.ctypes.data
    parts = reader.tensors[index].field.parts  # name length, name, n_dims, dims, type, offset
    return {
        "dims": parts[3].ctypes.data - base,
        "type": parts[4].ctypes.data - base,
        "offset": parts[5].ctypes.data - base,
    }


def error_of(path) -> str:
    with pytest.raises(PlainLlamaError) as e:
        open_checkpoint(str(path))
    return str(e.value)


U32, STR, F32, ARR = GGUFValueType.UINT32, GGUFValueType.STRING, GGUFValueType.FLOAT32, GGUFValueType.ARRAY

METADATA_CASES = {
    "alignment as a string": ({"general.alignment": ("32", STR)}, "general.alignment must be a power of two"),
    "alignment not a power of two": ({"general.alignment": (48, U32)}, "general.alignment must be a power of two"),
    "embedding_length as a string": ({"llama.embedding_length": ("64", STR)}, "embedding_length must be an integer"),
    "head_count as an array": ({"llama.attention.head_count": ([4, 4], ARR)}, "head_count must be an integer"),
    "head_count zero": ({"llama.attention.head_count": (0, U32)}, "head_count must be >= 1, got 0"),
    "head_count_kv zero": ({"llama.attention.head_count_kv": (0, U32)}, "head_count_kv must be >= 1, got 0"),
    "freq_base NaN": ({"llama.rope.freq_base": (math.nan, F32)}, "freq_base must be a finite number above 0"),
    "freq_base zero": ({"llama.rope.freq_base": (0.0, F32)}, "freq_base must be a finite number above 0"),
    "rms epsilon negative": ({"llama.attention.layer_norm_rms_epsilon": (-1e-5, F32)}, "epsilon must be a finite"),
    "rope factor a string": (
        {"llama.rope.scaling.type": ("linear", STR), "llama.rope.scaling.factor": ("x", STR)},
        "rope.scaling.factor must be a number",
    ),
    "block_count beyond the tensors": ({"llama.block_count": (0xFFFFFFFF, U32)}, "claims 4294967295 layers"),
    "vocabulary larger than the embedding": (
        {"llama.vocab_size": (1000, U32)},
        "but the model's embedding has 1000 rows",
    ),
    "context length zero": ({"llama.context_length": (0, U32)}, "context_length must be >= 1"),
}


@pytest.mark.parametrize("case", list(METADATA_CASES))
def test_gguf_metadata_of_the_wrong_type_or_range(good_gguf, tmp_path, case):
    changes, message = METADATA_CASES[case]
    assert message in error_of(rewritten(good_gguf, tmp_path / "bad.gguf", changes))


def test_gguf_tensor_table_follows_ggml_layout(good_gguf, tmp_path):
    """An offset moved by 1 or 32 bytes, two tensors sharing data, a type changed in the table: each
    would load and compute garbage; ggml's layout rule catches them."""
    reader = GGUFReader(str(good_gguf))
    middle = len(reader.tensors) // 2
    where = tensor_field_positions(good_gguf, middle)
    offset = int(reader.tensors[middle].field.parts[5][0])
    previous = int(reader.tensors[middle - 1].field.parts[5][0])
    for new_offset in (offset + 1, offset + 32, previous):
        bad = patched(good_gguf, tmp_path / "moved.gguf", {where["offset"]: struct.pack("<Q", new_offset)})
        assert "the tensor table is corrupt" in error_of(bad)
    # a norm (F32) relabelled F16: the next tensor no longer starts where the table says
    norm = next(
        i for i, t in enumerate(reader.tensors) if t.name.endswith("attn_norm.weight") and i + 1 < len(reader.tensors)
    )
    bad = patched(
        good_gguf, tmp_path / "retyped.gguf", {tensor_field_positions(good_gguf, norm)["type"]: struct.pack("<I", 1)}
    )
    assert "the tensor table is corrupt" in error_of(bad)


def test_gguf_rows_of_whole_blocks(good_gguf, tmp_path):
    """A Q8_0 matrix [64, 64] relabelled [256, 16]: the same bytes, rows of 16 values, half a block."""
    reader = GGUFReader(str(good_gguf))
    index = next(i for i, t in enumerate(reader.tensors) if t.name == "blk.0.attn_q.weight")
    dims = struct.pack("<QQ", 16, 256)  # ggml order: innermost first
    bad = patched(good_gguf, tmp_path / "rows.gguf", {tensor_field_positions(good_gguf, index)["dims"]: dims})
    assert "rows of 16 values, which are not whole Q8_0 blocks of 32" in error_of(bad)


def test_gguf_arrays_nested_too_deep(tmp_path):
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"x"
    # the value's type (array), then level after level of (element type: array, count: 1)
    nested = struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 10_000
    path = tmp_path / "deep.gguf"
    path.write_bytes(header + nested)
    assert "nested more than 4 deep" in error_of(path)


def test_fuzzed_gguf_headers_give_clear_errors(good_gguf, tmp_path):
    """Single bytes of the header and tensor table replaced at random (fixed seed): each file either
    loads or is refused with a PlainLlamaError; no other exception, and nothing sized by a corrupt count."""
    data = open(good_gguf, "rb").read()
    reader = GGUFReader(str(good_gguf))
    header_end = max(int(t.field.parts[5].ctypes.data - reader.data.ctypes.data) + 8 for t in reader.tensors)
    rng = random.Random(17)
    refused = 0
    for trial in range(150):
        edited = bytearray(data)
        for _ in range(rng.choice((1, 2, 4))):
            edited[rng.randrange(header_end)] = rng.randrange(256)
        path = tmp_path / f"fuzz{trial}.gguf"
        path.write_bytes(edited)
        try:
            open_checkpoint(str(path))
        except PlainLlamaError as e:
            refused += 1
            assert str(e).startswith(str(path)), e  # names the file
        path.unlink()
    assert refused > 50  # most edits of a header break something the rules see


@pytest.fixture(scope="module")
def folders(good_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    checkpoint = open_checkpoint(str(good_gguf))
    write_hf(checkpoint, str(root / "hf"), torch.float32)
    write_meta(open_checkpoint(str(good_gguf)), str(root / "meta"), torch.float32)
    return root


def edited_json(folder, name, tmp_path, edit):
    """A copy of `folder` with the JSON file `name` edited by `edit(value) -> value`."""
    copy = tmp_path / os.path.basename(folder)
    os.makedirs(copy)
    for entry in os.listdir(folder):
        os.symlink(os.path.join(folder, entry), copy / entry)
    value = json.load(open(os.path.join(folder, name)))
    os.unlink(copy / name)
    (copy / name).write_text(json.dumps(edit(value)))
    return copy


PARAMS_CASES = {
    "dim as a string": (lambda p: {**p, "dim": "64"}, "'dim' must be an integer"),
    "n_heads zero": (lambda p: {**p, "n_heads": 0}, "'n_heads' must be >= 1, got 0"),
    "multiple_of zero": (lambda p: {**p, "multiple_of": 0}, "'multiple_of' must be >= 1, got 0"),
    "norm_eps as a string": (lambda p: {**p, "norm_eps": "1e-5"}, "'norm_eps' must be a number"),
    "rope_theta infinite": (lambda p: {**p, "rope_theta": math.inf}, "'rope_theta' must be a finite number"),
    "n_layers of a billion": (lambda p: {**p, "n_layers": 10**9}, "n_layers is 1000000000, but the shards hold 2"),
    "a list": (lambda p: [p], "expected a JSON object"),
    "use_scaled_rope a string": (lambda p: {**p, "use_scaled_rope": "yes"}, "'use_scaled_rope' must be true or false"),
}


@pytest.mark.parametrize("case", list(PARAMS_CASES))
def test_params_json_of_the_wrong_type_or_range(folders, tmp_path, case):
    edit, message = PARAMS_CASES[case]
    assert message in error_of(edited_json(folders / "meta", "params.json", tmp_path, edit))


CONFIG_CASES = {
    "a list": (lambda c: [c], "expected a JSON object, found a list"),
    "hidden_size as a string": (lambda c: {**c, "hidden_size": "64"}, "'hidden_size' must be an integer"),
    "heads zero": (lambda c: {**c, "num_attention_heads": 0}, "'num_attention_heads' must be >= 1"),
    "rope_scaling a string": (lambda c: {**c, "rope_scaling": "llama3"}, "'rope_scaling' must be an object"),
    "rope_scaling without its keys": (
        lambda c: {**c, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
        "rope scaling of type 'llama3' needs 'low_freq_factor'",
    ),
    "layers of a billion": (lambda c: {**c, "num_hidden_layers": 10**9}, "num_hidden_layers is 1000000000"),
    "eos id a string": (lambda c: {**c, "eos_token_id": "2"}, "eos_token_id must be an integer"),
    "rms eps NaN": (lambda c: {**c, "rms_norm_eps": math.nan}, "'rms_norm_eps' must be a finite number"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_json_of_the_wrong_type_or_range(folders, tmp_path, case):
    edit, message = CONFIG_CASES[case]
    assert message in error_of(edited_json(folders / "hf", "config.json", tmp_path, edit))


def test_command_line_says_one_line(good_gguf, tmp_path):
    bad = rewritten(good_gguf, tmp_path / "bad.gguf", {"llama.attention.head_count": (0, U32)})
    result = run_cli("generate", "Hi", "-m", str(bad), "-n", "2")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"plainllama: error: {bad}: metadata llama.attention.head_count must be >= 1, got 0"
    ]


OPTION_CASES = {
    "temperature NaN": (("--temperature", "nan"), "--temperature must be a finite number, got nan"),
    "temperature denormal": (("--temperature", "1e-310"), "--temperature must be 0 (greedy) or at least"),
    "presence penalty infinite": (("--presence-penalty", "inf"), "--presence-penalty must be a finite number"),
    "repetition penalty NaN": (("--repetition-penalty", "nan"), "--repetition-penalty must be a finite number"),
    "logit bias NaN": (("--logit-bias", "5:nan"), "the bias of token 5 must be a finite number"),
    "seed beyond 64 bits": (("--seed", str(2**70)), "--seed must be between 0 and 2**64 - 1"),
    "device index not a number": (("--device", "cpu:abc"), "--device cpu:abc: expected"),
    "memory size without a unit": (("--max-memory", "4"), "memory size '4': give a unit"),
    "logprobs beyond the vocabulary": (("--logprobs", "100000", "--json"), "--logprobs must be between 0 and"),
    "beams beyond memory": (("--beams", "100000"), "needs"),
    "prompt of invalid UTF-8": (("\udcff",), "the prompt is not valid Unicode"),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_options_out_of_range_are_one_clear_line(case):
    options, message = OPTION_CASES[case]
    prompt = () if options[0] == "\udcff" else ("Hi",)
    result = run_cli("generate", *prompt, "-n", "2", *options)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr


def test_prompts_file_of_other_types(tmp_path):
    for line, message in (
        ('{"prompt": 5}', "'prompt' must be text or a list of token ids, got 5"),
        ('{"prompt": [1, -5]}', "token id -5, outside the vocabulary"),
        ('{"prompt": [1, 10000000]}', "token id 10000000, outside the vocabulary"),
    ):
        path = tmp_path / "prompts.jsonl"
        path.write_text(line + "\n")
        result = run_cli("generate", "--prompts-file", str(path), "-n", "2")
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_inspect_html_into_a_missing_folder(tmp_path):
    result = run_cli("inspect", "Hi", "--html", str(tmp_path / "missing" / "report.html"))
    assert result.returncode == 1 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_ctrl_c_during_start_up_exits_quietly():
    """SIGINT at moments from importing PyTorch to generating: exit status 130 and no traceback."""
    for delay in (0.1, 0.3, 0.4, 0.5, 1.5):  # 0.3-0.5 s: inside the import of PyTorch on these machines
        process = subprocess.Popen(
            [sys.executable, "-m", "plainllama", "generate", "Hello there", "-n", "300"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # CI may start us with it ignored
        )
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        # 130 from plainllama's handler; or, if the signal came before Python had installed its own
        # handler (a loaded machine), killed by SIGINT, which a shell reports as 130 too; or, just after,
        # while Python's runpy was still finding plainllama/__main__.py: a traceback of Python's own
        # frozen start-up frames only, before any line of plainllama ran (no Python program can stop that)
        frames = [line for line in err.splitlines() if line.strip().startswith("File ")]
        before_us = bool(frames) and all("<frozen " in line for line in frames)
        assert process.returncode in (130, -signal.SIGINT), (delay, process.returncode, err)
        assert "Traceback" not in err or before_us, (delay, process.returncode, err)


def shortened_record(src, dst, record: str, length: int):
    """A copy of the torch zip file `src` whose `record` claims `length` bytes (local header and
    central directory), everything else where it was: what a cut or edited download looks like."""
    data = bytearray(open(src, "rb").read())
    info = zipfile.ZipFile(src).getinfo(record)
    struct.pack_into("<II", data, info.header_offset + 18, length, length)
    at = data.find(b"PK\x01\x02")
    while at != -1:
        name_length = struct.unpack_from("<H", data, at + 28)[0]
        if bytes(data[at + 46 : at + 46 + name_length]) == record.encode():
            struct.pack_into("<II", data, at + 20, length, length)
        at = data.find(b"PK\x01\x02", at + 4)
    open(dst, "wb").write(data)
    return dst


def test_meta_shard_of_the_wrong_shape(tmp_path):
    """torch.load with mmap=True reads a tensor longer than its record from the bytes after it (the
    oracle: torch.load with mmap=False refuses the same file); and a shard must hold named tensors."""
    torch.save({"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(256)}, tmp_path / "x.pth")
    short = shortened_record(tmp_path / "x.pth", tmp_path / "short.pth", "x/data/0", 400)
    with pytest.raises(RuntimeError, match="record size"):
        torch.load(short, mmap=False, weights_only=True)
    with pytest.raises(PlainLlamaError, match="a tensor claims 4000 bytes, but its record in the file holds 400"):
        load_shard(str(short))
    torch.save([torch.ones(3)], tmp_path / "list.pth")
    torch.save({"a": 5}, tmp_path / "numbers.pth")
    for name in ("list.pth", "numbers.pth"):
        with pytest.raises(PlainLlamaError, match="expected a dictionary of named tensors"):
            load_shard(str(tmp_path / name))


TOKENIZER_CASES = {
    "added token without an id": (lambda t: t["added_tokens"].append({"content": "<x>"}), "must be an integer"),
    "added token id of 10**8": (
        lambda t: t["added_tokens"].append({"content": "<x>", "id": 10**8}),
        "token ids go up to 100000000, but the file holds only",
    ),
    "added token without content": (lambda t: t["added_tokens"].append({"id": 5}), "with a 'content' string"),
}


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_tokenizer_json_of_the_wrong_shape(folders, tmp_path, case):
    edit, message = TOKENIZER_CASES[case]

    def edited(spec):
        edit(spec)
        return spec

    assert message in error_of(edited_json(folders / "hf", "tokenizer.json", tmp_path, edited))


@pytest.mark.parametrize(
    "template, message",
    [
        ("{{ 1/0 }}", "failed: ZeroDivisionError"),
        ("{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}", "recursed too deeply"),
        ("{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}", "ran for more than"),
        ("{% for a in range(99999) %}{% for b in range(99999) %}xxxxxxxx{% endfor %}{% endfor %}", "wrote more than"),
    ],
)
def test_chat_templates_that_fail_or_never_end(template, message, monkeypatch):
    monkeypatch.setattr(chat_format, "RENDER_SECONDS", 0.5)
    monkeypatch.setattr(chat_format, "RENDER_CHARS", 100_000)
    llm = plainllama.load(device="cpu")
    with pytest.raises(PlainLlamaError, match=message):
        chat_format.JinjaChat(llm.tokenizer, template).encode([{"role": "user", "content": "hi"}])


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux's /sys, a file system that takes no files")
def test_convert_into_a_place_that_takes_no_files(good_gguf):
    result = run_cli("convert", str(good_gguf), "/sys/plainllama-out", "--to", "hf")
    assert result.returncode == 1 and "cannot write there" in result.stderr and "free" not in result.stderr


GGUF_TOKENIZER_CASES = {
    "merges stored as integers": (
        {"tokenizer.ggml.merges": ([1, 2, 3], ARR)},
        "tokenizer.ggml.merges must be a list of strings",
    ),
    "eos id as a string": ({"tokenizer.ggml.eos_token_id": ("2", STR)}, "eos_token_id must be an integer"),
    "eos id beyond the vocabulary": (
        {"tokenizer.ggml.eos_token_id": (10**6, U32)},
        "eos_token_id must be between 0 and",
    ),
}


@pytest.mark.parametrize("case", list(GGUF_TOKENIZER_CASES))
def test_gguf_tokenizer_metadata_of_the_wrong_type(good_gguf, tmp_path, case):
    changes, message = GGUF_TOKENIZER_CASES[case]
    assert message in error_of(rewritten(good_gguf, tmp_path / "bad.gguf", changes))


def test_safetensors_index_of_the_wrong_shape(folders, tmp_path):
    for index, message in (
        ([], "expected a JSON object"),
        ({"weight_map": {"x": "/etc/passwd"}}, "is not a file name in this folder"),
    ):
        folder = tmp_path / f"case{len(message)}"
        os.makedirs(folder)
        for entry in os.listdir(folders / "hf"):
            os.symlink(folders / "hf" / entry, folder / entry)
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        assert message in error_of(folder)


def test_memory_size_of_400_digits():
    result = run_cli("generate", "Hi", "-n", "2", "--max-memory", "9" * 400 + "G")
    assert result.returncode == 1 and "a number of 400 digits is not a memory size" in result.stderr


def test_tokenizer_json_vocabulary_of_invalid_unicode(folders, tmp_path):
    def edited(spec):
        spec["model"]["vocab"]["\ud800"] = len(spec["model"]["vocab"]) + len(spec["added_tokens"])
        return spec

    assert "which is not valid Unicode" in error_of(edited_json(folders / "hf", "tokenizer.json", tmp_path, edited))


def test_chat_message_of_invalid_unicode():
    """What the chat REPL hands on for a line typed with bytes that are not UTF-8."""
    llm = plainllama.load(device="cpu")
    with pytest.raises(PlainLlamaError, match="a chat message is not valid Unicode"):
        llm.encode_chat([{"role": "user", "content": "caf\udce9"}])
