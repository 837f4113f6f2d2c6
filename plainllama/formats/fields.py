"""Reading one field of a config file or of GGUF metadata: its type and range checked where it is
read, and a message that names the file and the field when it is wrong. A number given as a string,
a count of zero that would later divide, or a NaN that would empty every answer: each stops here,
before anything is sized by it."""

from __future__ import annotations

import math

from ..errors import PlainLlamaError

MISSING = object()


def _show(value) -> str:
    text = repr(value)
    return (text[:60] + "...") if len(text) > 60 else text


def integer(where: str, name: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    """An integer field (a bool is not one) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlainLlamaError(f"{where}: {name} must be an integer, got {_show(value)} ({type(value).__name__})")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise PlainLlamaError(f"{where}: {name} must be {bound}, got {value}")
    return value


def number(where: str, name: str, value, positive: bool = True) -> float:
    """A finite real number (an integer is one), above zero unless positive=False."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlainLlamaError(f"{where}: {name} must be a number, got {_show(value)} ({type(value).__name__})")
    if not math.isfinite(value) or (positive and value <= 0):
        raise PlainLlamaError(f"{where}: {name} must be a finite number{' above 0' if positive else ''}, got {value}")
    return float(value)


def mapping(where: str, name: str, value) -> dict:
    if not isinstance(value, dict):
        raise PlainLlamaError(f"{where}: {name} must be an object (a mapping of keys), got {type(value).__name__}")
    return value


def string(where: str, name: str, value) -> str:
    if not isinstance(value, str):
        raise PlainLlamaError(f"{where}: {name} must be a string, got {_show(value)} ({type(value).__name__})")
    return value
