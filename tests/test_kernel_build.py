"""How the C kernels are built and chosen: PLAINLLAMA_ISA caps the instruction sets, the status says
which path runs, --threads reaches PyTorch and the kernels' shared pool, and a cached library that
cannot be loaded is built again. Each runs in a fresh process (the library is loaded once per process).
The oracle for "which path ran" is the C library itself: amx_available() and whether it loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import run_cli
from plainllama.engine.cpu import kernels

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="the C kernels cannot be built on this machine")


def generate_json(*options, env=None):
    result = run_cli("generate", "Hi", "-n", "2", "--json", *options, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@needs_kernels
def test_status_names_the_path_and_the_threads():
    record = generate_json("--threads", "1")
    assert record["threads"] == 1
    assert record["compute"] == f"kernels {kernels.isa()}" and kernels.isa() in ("amx", "avx512", "avx2")
    assert generate_json(env={"PLAINLLAMA_ISA": "none"})["compute"] == "torch weight-only"
    assert generate_json("--dtype", "float32")["compute"] == "float weights"  # an explicit dtype converts the weights


@needs_kernels
def test_isa_cap_leaves_amx_out():
    code = "from plainllama.engine.cpu import kernels; print(kernels.isa(), kernels.amx())"
    for level, expected in (("avx512", "avx512 False"), ("avx2", "avx2 False"), ("none", "none False")):
        if level == "avx512" and "avx512" not in kernels.levels():
            continue  # an AVX2-only CPU builds its own level under a higher cap
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PLAINLLAMA_ISA": level}
        )
        assert out.stdout.split() == expected.split(), out.stderr


def test_unknown_isa_and_threads_are_clear_errors():
    for options, env, message in (
        ((), {"PLAINLLAMA_ISA": "avx3"}, "PLAINLLAMA_ISA=avx3: expected one of amx, avx512, avx2, none"),
        (("--threads", "0"), {}, "--threads must be >= 1, got 0"),
    ):
        result = run_cli("generate", "Hi", "-n", "2", *options, env={**os.environ, **env})
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


@needs_kernels
def test_a_corrupt_cached_library_is_rebuilt(tmp_path):
    env = {**os.environ, "PLAINLLAMA_CACHE": str(tmp_path)}
    code = "from plainllama.engine.cpu import kernels; print(kernels.isa())"
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    (library,) = tmp_path.glob("cpu_matmul-*.so")
    library.write_bytes(b"<html>not a shared library</html>")  # as a cut-short or overwritten file would be
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert first.stdout == second.stdout and second.stdout.strip() in ("amx", "avx512", "avx2"), second.stderr
    assert library.read_bytes()[:4] == b"\x7fELF"  # built again in its place


def test_a_failed_build_says_why_once(tmp_path):
    """A compiler that fails: the run goes on with PyTorch's weight-only products and says so once,
    with the reason."""
    env = {"CC": "/bin/false", "PLAINLLAMA_CACHE": str(tmp_path)}
    result = run_cli("generate", "Hi", "-n", "2", "--json", env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["compute"] == "torch weight-only"
    assert result.stderr.count("the C kernels are off") == 1 and "weight-only operators" in result.stderr


# CPU kinds the kernels must compile for, by gcc's -march names: AVX2 without and with AVX-VNNI,
# AVX-512 without VNNI (Skylake-SP: plainllama.h then takes the AVX2 kernels beside AVX-512F code),
# with VNNI (Ice Lake), with BF16 (Cooper Lake), with AMX (Sapphire Rapids), and AMD Zen 3 and 4.
MARCH = ["haswell", "alderlake", "skylake-avx512", "icelake-server", "cooperlake", "sapphirerapids", "znver3", "znver4"]


@pytest.mark.skipif(not kernels.available(), reason="the C kernels cannot be built on this machine")
@pytest.mark.parametrize("march", MARCH)
def test_the_kernels_compile_for_every_cpu_kind(march):
    """The library is built with -march=native, so only the CPU it runs on is ever compiled for; this
    compiles the same sources for each kind above (syntax and types only: a second), with a function
    used where it is not declared made an error (a missing helper otherwise only fails at load time).
    Found this way: Skylake-SP's build failed (exp8 was only declared without AVX-512), which would
    have left such a CPU on PyTorch's path."""
    compiler = os.environ.get("CC") or "cc"
    command = [compiler, "-fsyntax-only", f"-march={march}", "-fopenmp", "-Werror=implicit-function-declaration"]
    result = subprocess.run([*command, *map(str, kernels.SOURCES)], capture_output=True, text=True)
    if "bad value" in result.stderr and march in result.stderr:
        pytest.skip(f"this compiler does not know -march={march}")
    assert result.returncode == 0, result.stderr
