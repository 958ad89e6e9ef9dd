"""Numeric settings read from the environment, with one error message for
every variable (layer 0: any layer may read its settings through it)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar, overload

T = TypeVar("T", int, float)


def _read(name: str, convert: Callable[[str], T], what: str) -> T | None:
    """``name`` converted, or None when it is unset or empty; ValueError naming both otherwise."""
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        return convert(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not {what}") from None


@overload
def env_int(name: str, default: int, minimum: int | None = None) -> int: ...
@overload
def env_int(name: str, default: None = None, minimum: int | None = None) -> int | None: ...
def env_int(name: str, default: int | None = None, minimum: int | None = None) -> int | None:
    """``name`` as an int; ``default`` when it is unset or empty.

    Raises:
        ValueError: naming the variable and its value, when the value is not
            an integer or is below ``minimum``.
    """
    value = _read(name, int, "an integer")
    if value is None:
        return default
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}")
    return value


def env_float(name: str, what: str = "a number") -> float | None:
    """``name`` as a float, or None when it is unset or empty.

    Raises:
        ValueError: ``"NAME='value' is not <what>"``.
    """
    return _read(name, float, what)
