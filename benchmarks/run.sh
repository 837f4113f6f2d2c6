#!/usr/bin/env bash
# Sets up .venv with the peers (llama.cpp, transformers: test-only, never runtime dependencies),
# then compares plainllama with them on the same file. Arguments go to compare_generate.py.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
exec .venv/bin/python benchmarks/compare_generate.py "$@"
