"""`plainllama bench`, run as a real subprocess: every figure present and meaningful (no timing
thresholds: speed is measured by benchmarks, not asserted by tests)."""

import json

from helpers import run_cli

FIELDS = (
    "load_seconds",
    "prefill_tokens_per_second",
    "time_to_first_token_seconds",
    "decode_tokens_per_second",
    "bytes_per_decoded_token",
    "achieved_bandwidth_gb_s",
    "memory_bandwidth_gb_s",
    "fraction_of_bandwidth",
    "sustained_read_bandwidth_gb_s",
    "fraction_of_sustained_read_bandwidth",
    "peak_rss_mib",
    "prefill_tflop_s",
    "matrix_peak_tflop_s",
    "fraction_of_matrix_peak",
)


def test_bench_json_reports_every_figure(model_path):
    result = run_cli(
        "bench", "--device", "cpu", "--prompt-tokens", "32", "--decode-tokens", "4", "--repeats", "1", "--json"
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    for field in FIELDS:
        assert figures[field] > 0, field
    assert figures["prompt_tokens"] == 32 and figures["decode_tokens"] == 4
    # The bytes one decode step reads are at least the file's weight matrices (Q4_1 and Q8_0 blocks)
    # and far less than their float32 size: the weights stayed compressed.
    assert 80e6 < figures["bytes_per_decoded_token"] < 150e6
    assert figures["model"] == str(model_path)
    # the path a prompt's products took, as the packed weights choose it on this CPU
    from plainllama.engine.cpu import kernels, packed

    paths = {
        "amx bfloat16",
        "oneDNN bfloat16",
        "int8 kernels (16-bit weights: float32)",
        "int8 kernels (16-bit weights: oneDNN bfloat16)",
    }
    assert figures["prompt_products"] == packed.prompt_products() and figures["prompt_products"] in paths
    assert (figures["prompt_products"] == "amx bfloat16") == kernels.amx()


def test_bench_table_and_bad_settings():
    result = run_cli("bench", "--device", "cpu", "--prompt-tokens", "16", "--decode-tokens", "3", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    for label in (
        "prefill (16 tokens)",
        "prefill arithmetic",
        "decode (3 tokens)",
        "time to first token",
        "bandwidth achieved",
        "peak RSS",
    ):
        assert label in result.stdout
    bad = run_cli("bench", "--prompt-tokens", "100000")
    assert bad.returncode == 1 and bad.stderr.startswith("plainllama: error:") and "context" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_prefill_flops_count_every_matrix_of_the_model(model_path):
    """The operations counted for a prompt equal 2 x each token's multiply-adds with the model's own
    matrices, read off the loaded modules' shapes (not the config), plus causal attention and the
    last token's output projection."""
    import plainllama
    from plainllama.cli.bench import prefill_flops
    from plainllama.engine.cpu.packed import PackedLinear

    llm = plainllama.load(str(model_path))
    matrices = [m for m in llm.model.layers.modules() if isinstance(m, PackedLinear)]
    assert len(matrices) >= 4 * llm.model.args.n_layers  # q, k, v (stacked or not), o, gate/up, down
    layer_macs = sum(m.in_features * m.out_features for m in matrices)
    args = llm.model.args
    T = 100
    attention = args.n_layers * 2 * (T * (T + 1) // 2) * args.n_heads * args.head_dim
    expected = 2 * (T * layer_macs + attention + args.dim * args.vocab_size)
    assert prefill_flops(args, T) == expected
