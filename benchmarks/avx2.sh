#!/usr/bin/env bash
# The AVX2 level side by side with its peer: plainllama with PLAINLLAMA_ISA=avx2 (kernels/cpu_matmul_avx2.c)
# against llama.cpp built for AVX2 only (GGML_AVX512=OFF, no AMX, the same flags otherwise), on the
# same files, in one run, as ratios. llama-cpp-python is compiled once into build/llama-cpp-avx2
# (~10 minutes on 2 cores) and used instead of the test set-up's build through PYTHONPATH.
#   benchmarks/avx2.sh [MODEL ...]      # default: the 1B-shaped Q8_0, Q4_0 and Q4_K_M files
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
target=build/llama-cpp-avx2
if [ ! -d "$target/llama_cpp" ]; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
-DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
        .venv/bin/pip install --no-cache-dir --no-deps --no-binary llama-cpp-python --target "$target" \
        llama-cpp-python==0.3.36
fi
if [ $# -eq 0 ]; then
    log=$(mktemp)
    if ! models=$(.venv/bin/python benchmarks/make_models.py --k-quants 2>"$log"); then cat "$log"; exit 1; fi
    set -- $(echo "$models" | grep -E 'Q8_0|Q4_0|Q4_K_M')
fi
for model in "$@"; do
    PLAINLLAMA_ISA=avx2 PYTHONPATH="$target" .venv/bin/python benchmarks/compare_generate.py -m "$model" \
        --engines plainllama,llama.cpp --decode-tokens 32
done
