"""The `plainllama` command: main.py builds the parser, each other file here runs one subcommand."""

from .main import main

__all__ = ["main"]
