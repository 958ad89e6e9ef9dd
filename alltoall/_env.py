"""Integer settings read from the environment, with one error message for
every variable (layer 0: any layer may read its settings through it)."""

from __future__ import annotations

import os
from typing import overload


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
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be at least {minimum}")
    return value
