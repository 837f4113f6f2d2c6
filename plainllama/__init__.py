"""plainllama: Llama inference you can read. See api.py for the Python API, cli/ for the commands.

`import plainllama` is cheap: the API (and PyTorch behind it) is imported when first used, so that the
command line can answer --help, and a Ctrl+C during start-up, without it."""

from .errors import PlainLlamaError

__version__ = "0.1.0"
__all__ = ["LLM", "Generation", "GenerationStream", "PlainLlamaError", "load", "__version__"]

_API = ("LLM", "Generation", "GenerationStream", "load")


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'plainllama' has no attribute {name!r}")
