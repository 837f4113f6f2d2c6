"""Tracing, `plainllama inspect`, the HTML report (opened in a real headless Chromium through
selenium and chromedriver) and the examples for learners."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import oracle


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def traced(llm):
    return llm.trace(PROMPT, max_new_tokens=4)


def test_tracing_does_not_change_the_logits(llm, traced):
    ids = [t.id for t in traced.tokens]
    assert torch.equal(traced.logits, llm.logits(ids))  # hooks attached or not: the same numbers
    assert not any(layer._forward_hooks for layer in llm.model.layers)  # and they are gone afterwards


def test_attention_rows_sum_to_one_and_are_causal(traced):
    for layer in traced.layers:
        attention = layer.attention  # [H, T, T]
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:2]))
        assert torch.triu(attention, diagonal=1).abs().max() == 0  # nothing attends to the future
        assert attention.min() >= 0


def test_last_layer_logit_lens_is_the_model_output(traced):
    probs = traced.logits.softmax(-1)
    last = traced.layers[-1]
    for position, top in enumerate(last.lens_top):
        expected = torch.topk(probs[position], len(top))
        assert [t for t, _ in top] == expected.indices.tolist()
        assert [p for _, p in top] == pytest.approx(expected.values.tolist(), abs=1e-5)
    torch.testing.assert_close(last.lens_final_prob, probs.max(-1).values, atol=1e-5, rtol=1e-5)


def test_trace_records_tokens_and_steps(llm, traced):
    assert [t.id for t in traced.tokens[: traced.prompt_length]] == llm.tokenizer.encode(PROMPT)
    assert bytes(traced.tokens[0].bytes) == b"The"
    generated = llm.generate(PROMPT, max_new_tokens=4).tokens
    assert [s.chosen for s in traced.steps] == generated
    assert all(abs(sum(p for _, p in s.candidates) - 1) < 1 and s.candidates[0][0] == s.chosen for s in traced.steps)
    assert traced.first_layer_knowing(traced.prompt_length - 1) is not None


def test_inspect_command(tmp_path):
    report = tmp_path / "report.html"
    result = subprocess.run(
        [sys.executable, "-m", "plainllama", "inspect", PROMPT, "-n", "3", "--html", str(report)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (
        '" Paris"' in result.stdout
        and "logit lens" in result.stdout
        and "first layer with the final answer" in result.stdout
    )
    page = report.read_text()
    assert "<script>" in page and "http://" not in page and "https://" not in page  # self-contained


def test_examples_run():
    minimal = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "minimal.py")], capture_output=True, text=True, timeout=300
    )
    assert minimal.returncode == 0, minimal.stderr
    assert minimal.stdout.startswith("The capital of France is Paris")
    assert len(open(os.path.join(ROOT, "examples", "minimal.py")).read().splitlines()) < 40
    walk = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "walkthrough.py")], capture_output=True, text=True, timeout=300
    )
    assert walk.returncode == 0, walk.stderr
    assert "largest difference from model(tokens)" in walk.stdout and "' Paris'" in walk.stdout


def test_walkthrough_logits_equal_the_model_forward():
    """The walkthrough asserts it itself; here it runs on a second model (a random-weight file with
    GQA 4/2) to show it is not written for the default one."""
    import tempfile

    from gguf_files import default_vocabulary, write_llama_gguf

    with tempfile.TemporaryDirectory() as tmp:
        path = write_llama_gguf(
            os.path.join(tmp, "m.gguf"), default_vocabulary(), dim=128, n_heads=4, n_kv_heads=2, hidden_dim=256
        )
        walk = subprocess.run(
            [sys.executable, os.path.join(ROOT, "examples", "walkthrough.py"), "Hello there", path],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert walk.returncode == 0, walk.stderr
    difference = float(walk.stdout.rsplit(":", 1)[1])
    assert difference < 1e-3


def chromium_driver():
    webdriver = oracle("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("Debian's chromium and chromium-driver are installed by `scripts/setup.sh --test` (as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1200,1600",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(chromedriver), options=options)


def test_html_report_in_a_real_browser(llm, traced, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from plainllama.inspection.report import write_report

    path = tmp_path / "report.html"
    write_report(traced, llm.tokenizer, str(path), PROMPT)
    driver = chromium_driver()
    try:
        driver.get(path.as_uri())
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []  # no script errors
        tokens = driver.find_elements(By.CSS_SELECTOR, "#tokens .tok")
        assert [t.text for t in tokens][:2] == ["The", " capital"] and len(tokens) == len(traced.tokens)
        assert len(driver.find_elements(By.CSS_SELECTOR, ".lens-row")) == len(traced.layers)
        assert len(driver.find_elements(By.CSS_SELECTOR, ".lens-cell")) == len(traced.layers) * len(traced.tokens)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#steps .step")) == len(traced.steps)
        assert driver.find_element(By.CSS_SELECTOR, "#steps .chosen").text == " Paris"
        layer, head = Select(driver.find_element(By.ID, "layer")), Select(driver.find_element(By.ID, "head"))
        assert len(layer.options) == len(traced.layers) and len(head.options) == len(traced.layers[0].attention)
        heatmap = driver.find_element(By.ID, "heatmap")
        assert heatmap.get_attribute("data-drawn") == f"{len(traced.layers) - 1}:0"
        layer.select_by_value("3")
        head.select_by_value("2")
        assert heatmap.get_attribute("data-drawn") == "3:2"  # the heatmap follows the selection
        # hovering a token shows its details
        from selenium.webdriver import ActionChains

        ActionChains(driver).move_to_element(tokens[1]).perform()
        tip = driver.find_element(By.ID, "tip")
        assert "id 3575" in tip.text
        assert driver.get_log("browser") == []
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        driver.quit()
