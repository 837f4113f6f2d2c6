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


def test_bench_table_and_bad_settings():
    result = run_cli("bench", "--device", "cpu", "--prompt-tokens", "16", "--decode-tokens", "3", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    for label in ("prefill (16 tokens)", "decode (3 tokens)", "time to first token", "bandwidth achieved", "peak RSS"):
        assert label in result.stdout
    bad = run_cli("bench", "--prompt-tokens", "100000")
    assert bad.returncode == 1 and bad.stderr.startswith("plainllama: error:") and "context" in bad.stderr
    assert "Traceback" not in bad.stderr
