import signal
import sys

# Ctrl+C while the modules below are imported exits quietly with status 130 instead of printing a
# traceback of the import; from main() on, Ctrl+C is a KeyboardInterrupt that main() handles.
signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

from .cli.main import main  # noqa: E402

signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(main())
