"""Options declared once: the vocabularies every job shares and the checks every option is put through.

Torch-free on purpose: the command line imports it to build `--help`, and the library configs check their fields
with the same functions, so a value the CLI accepts is exactly a value the library accepts. Every check takes the
value and the parameter's name (for the error message), and returns the value, normalised (a tuple for a list, an
int for a token count written "2M"), or raises an LlmdropError that names the parameter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import Any

from .errors import LlmdropError
from .files import literal

DTYPES = ("float32", "bfloat16", "float16")
TARGETS = ("attn", "mlp", "block", "joint")
# Where evaluation data comes from: the hub when reachable else the offline copies, the offline copies, the hub.
DATA = ("auto", "local", "hub")

Check = Callable[[Any, str], Any]


def is_int(value: object) -> bool:
    """A whole number, and not a bool (True is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def count(value: Any, param: str, *, least: int = 1, optional: bool = False) -> int | None:
    """A whole number of at least `least` (None allowed when `optional`)."""
    if optional and value is None:
        return None
    if not is_int(value) or value < least:
        raise LlmdropError(f"{{{param}}} must be a whole number of at least {least} (got {literal(repr(value))})",
                           params=[param])
    return value


def boolean(value: Any, param: str) -> bool:
    """True or False exactly: "no", "false", None and 0 are truthy or falsy by accident, never by intent."""
    if not isinstance(value, bool):
        raise LlmdropError(f"{{{param}}} must be True or False (got {literal(repr(value))})", params=[param])
    return value


def choice(value: Any, param: str, allowed: Iterable[str], *, optional: bool = False) -> str | None:
    """One of `allowed` (None allowed when `optional`)."""
    if optional and value is None:
        return None
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise LlmdropError(f"{{{param}}} must be one of {', '.join(allowed)} (got {literal(repr(value))})",
                           params=[param])
    return value


def number(value: Any, param: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, optional: bool = False) -> float | None:
    """A finite number within [low, high] (an open end excludes the bound); None allowed when `optional`."""
    if optional and value is None:
        return None
    ok = is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'above' if low_open else 'at least'} {low:g}"
        hi = "" if high is None else f"{'below' if high_open else 'at most'} {high:g}"
        bound = " and ".join(b for b in (lo, hi) if b)
        raise LlmdropError(f"{{{param}}} must be a finite number{' ' + bound if bound else ''} (got "
                           f"{literal(repr(value))})", params=[param])
    return value


def names(value: Any, param: str) -> tuple[str, ...]:
    """Names, as a list / tuple of non-empty strings or one comma-separated string ("piqa, arc_easy")."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
        raise LlmdropError(f"{{{param}}} must be a list of names (got {literal(repr(value))[:80]})", params=[param])
    return tuple(value)


def parse_count(text: str | int) -> int:
    """A count as people write it: 100000, 82k, 2M, 1.5M, 1G (k = 1000). ValueError when it is not one."""
    if is_int(text):
        return text  # type: ignore[return-value]
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", str(text))
    if not match:
        raise ValueError(f"not a count: {text!r}")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2).lower()]
    return int(round(float(match.group(1)) * scale))


def token_count(value: Any, param: str, *, optional: bool = False) -> int | None:
    """A number of tokens of at least 1, as an int or as text such as "500000", "82k" or "2M"."""
    if optional and value is None:
        return None
    if isinstance(value, str):
        try:
            value = parse_count(value)
        except ValueError:
            raise LlmdropError(f"{{{param}}} must be a token count such as 500000, 82k or 2M (got "
                               f"{literal(repr(value))})", params=[param]) from None
    return count(value, param)


def path(value: Any, param: str, *, optional: bool = True) -> str | None:
    """A path given as a str or os.PathLike, kept as a str (None allowed when `optional`)."""
    import os

    if optional and value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(os.fspath(value)).strip():
        raise LlmdropError(f"{{{param}}} must be a path (got {literal(repr(value))})", params=[param])
    return str(os.fspath(value))


def shard(value: Any, param: str = "shard") -> tuple[int, int] | None:
    """(rank, world size) with 0 <= rank < world, or None."""
    if value is None:
        return None
    pair = tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(pair) != 2 or not all(is_int(v) for v in pair) or not 0 <= pair[0] < pair[1]:
        raise LlmdropError(f"{{{param}}} must be (rank, world size) with 0 <= rank < world (got "
                           f"{literal(repr(value))})", params=[param])
    return pair  # type: ignore[return-value]
