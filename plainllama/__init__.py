"""plainllama: Llama inference you can read. See api.py for the Python API, cli/ for the commands."""

from .api import LLM, Generation, GenerationStream, load
from .errors import PlainLlamaError

__version__ = "0.1.0"
__all__ = ["LLM", "Generation", "GenerationStream", "PlainLlamaError", "load", "__version__"]
