import os
import signal
import sys

if os.environ.get("WORLD_SIZE", "1") != "1":
    # A tensor-parallel rank: PyTorch's c10d logs a failed connection with its C++ stack; plainllama
    # says what failed in one line instead (parallel/ranks.py)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")

# Ctrl+C while the modules below are imported exits quietly with status 130 instead of printing a
# traceback of the import; from main() on, Ctrl+C is a KeyboardInterrupt that main() handles.
signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

from .cli.main import main  # noqa: E402

signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(main())
