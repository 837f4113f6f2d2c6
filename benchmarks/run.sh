#!/usr/bin/env bash
# Sets up .venv with the peers (llama.cpp, transformers: test-only, never runtime dependencies),
# then compares plainllama with them on the same files, side by side in one run, as ratios:
#   1. the default model (SmolLM2-135M Q4_1) against llama.cpp and transformers, and written as a
#      Meta checkpoint, plainllama on it against Meta's reference code;
#   2. random-weight files at Llama 3.2 1B's body shapes in F16, and Q8_0, Q4_0, Q6_K, Q5_K_M and Q4_K_M
#      made by llama.cpp's own quantizer (benchmarks/make_models.py), against llama.cpp;
#   3. `plainllama bench` on the F16 file: the bandwidth decoding achieves against the measured bound.
# Arguments go to the first comparison (e.g. --repeats 5).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/python benchmarks/compare_generate.py --engines plainllama,llama.cpp,transformers,meta-reference,plainllama-meta "$@"
log=$(mktemp)
if ! models=$(.venv/bin/python benchmarks/make_models.py --k-quants 2>"$log"); then cat "$log"; exit 1; fi
for model in $models; do
    .venv/bin/python benchmarks/compare_generate.py -m "$model" --engines plainllama,llama.cpp --decode-tokens 32
done
.venv/bin/plainllama bench -m "$(echo "$models" | head -1)" --decode-tokens 32
# 4. the AVX2 level against llama.cpp built for AVX2 only: benchmarks/avx2.sh (compiles that build once)
