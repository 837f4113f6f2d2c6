"""The bench models of issue 6: random weights at Llama 3.2 1B's body shapes (width 2048, 16 layers,
32 query / 8 key-value heads, feed-forward 8192; SmolLM2's 49152-token vocabulary), written in F16
with the `gguf` package and quantized by llama.cpp's own quantizer to Q8_0 and Q4_0, and with
--k-quants also to Q6_K, Q5_K_M and Q4_K_M (the files people download most: K-quant matrices,
with Q6_K values and down projections in the _M mixes) and Q2_K (the smallest K mix, for big models
on small machines: Q2_K matrices, Q3_K/Q4_K values and down projections, Q6_K output).

    .venv/bin/python benchmarks/make_models.py [FOLDER] [--k-quants]   # default ~/.cache/plainllama/bench-models

Prints the paths. Files that exist are kept. Needs the test set-up (gguf, llama-cpp-python).
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from gguf_files import default_vocabulary, write_llama_gguf  # noqa: E402

SHAPE = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, context_length=4096)


def quantize(src: Path, dst: Path, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 2
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if code != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} (code {code})")


def main() -> None:
    import llama_cpp

    arguments = [a for a in sys.argv[1:] if a != "--k-quants"]
    folder = Path(arguments[0] if arguments else Path.home() / ".cache" / "plainllama" / "bench-models")
    folder.mkdir(parents=True, exist_ok=True)
    f16 = folder / "llama-1b-shape-F16.gguf"
    if not f16.exists():
        write_llama_gguf(
            f16.with_suffix(".tmp"), default_vocabulary(), matrix_type="F16", embedding_type="F16", **SHAPE
        )
        f16.with_suffix(".tmp").rename(f16)
    paths = [f16]
    types = [("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)]
    if "--k-quants" in sys.argv[1:]:
        types += [
            ("Q6_K", llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K),
            ("Q5_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M),
            ("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M),
            ("Q2_K", llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K),
        ]
    for name, ftype in types:
        path = folder / f"llama-1b-shape-{name}.gguf"
        if not path.exists():
            quantize(f16, path.with_suffix(".tmp"), ftype)
            path.with_suffix(".tmp").rename(path)
        paths.append(path)
    print("\n".join(map(str, paths)))


if __name__ == "__main__":
    main()
