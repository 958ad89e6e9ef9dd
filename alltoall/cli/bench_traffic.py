"""What alltoall-bench sends: message sizes, element types, and the traffic
matrix (elements each rank sends to each other rank) for uniform and skewed,
MoE-like exchanges. Pure functions: no communication, identical on every rank.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

# nccl-tests' names first, then the torch spellings people also type.
DTYPES: dict[str, torch.dtype] = {
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int32": torch.int32,
    "int64": torch.int64,
    "half": torch.float16,
    "float": torch.float32,
    "double": torch.float64,
    "bfloat16": torch.bfloat16,
}
DTYPE_ALIASES = {
    "float16": "half", "fp16": "half", "float32": "float", "fp32": "float",
    "float64": "double", "fp64": "double", "bf16": "bfloat16",
}

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from '4096', '1K', '4M', '1GiB', '64KB' (powers of 1024, as nccl-tests)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"size {text!r} is not a byte count such as 4096, 1K, 4M or 1G")
    number, unit, _ = match.groups()
    return int(number) * _UNITS[unit.lower()]


def format_size(size: int) -> str:
    """'1K', '4M', or plain bytes when not a whole power-of-1024 unit."""
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def parse_dtype(name: str) -> tuple[str, torch.dtype]:
    """The nccl-tests name of a type and the torch dtype."""
    key = DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in DTYPES:
        choices = ", ".join([*DTYPES, *DTYPE_ALIASES])
        raise ValueError(f"dtype {name!r} is not one of {choices}")
    return key, DTYPES[key]


def size_sweep(min_bytes: int, max_bytes: int, factor: int, world_size: int, element_size: int) -> list[int]:
    """Bytes per rank from min to max, times ``factor`` each step.

    Each size is rounded down to whole elements per peer (at least one), as
    nccl-tests does, so a row's size is what was really sent.
    """
    if min_bytes <= 0 or max_bytes < min_bytes:
        raise ValueError(f"sizes must satisfy 0 < min ({min_bytes}) <= max ({max_bytes})")
    if factor < 2 and max_bytes > min_bytes:
        raise ValueError(f"the step factor must be >= 2 to sweep from {min_bytes} to {max_bytes}, got {factor}")
    unit = world_size * element_size
    sizes: list[int] = []
    size = min_bytes
    while size <= max_bytes:
        rounded = max(size // unit, 1) * unit
        if rounded not in sizes:
            sizes.append(rounded)
        if factor < 2:
            break
        size *= factor
    return sizes


@dataclass(frozen=True)
class SplitsSpec:
    """How a rank's bytes are divided among destinations.

    kind: "uniform" (equal blocks), "zipf" (destination popularity follows a
    Zipf law of exponent ``alpha``, the same hot ranks for every source, as
    with popular experts) or "file" (an n x n matrix of relative weights, row
    = source, column = destination).
    """

    kind: str
    alpha: float = 0.0
    weights: tuple[tuple[float, ...], ...] | None = None
    text: str = "uniform"

    @property
    def uniform(self) -> bool:
        return self.kind == "uniform"


def parse_splits(text: str) -> SplitsSpec:
    """'uniform', 'zipf:ALPHA' or the path of a weight-matrix file."""
    if text == "uniform":
        return SplitsSpec("uniform")
    if text.startswith("zipf:"):
        raw = text.split(":", 1)[1]
        try:
            alpha = float(raw)
        except ValueError:
            raise ValueError(f"--splits {text!r}: the Zipf exponent {raw!r} is not a number") from None
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"--splits {text!r}: the Zipf exponent must be finite and >= 0, got {alpha}")
        return SplitsSpec("zipf", alpha=alpha, text=text)
    return SplitsSpec("file", weights=read_weight_matrix(text), text=text)


def read_weight_matrix(path: str) -> tuple[tuple[float, ...], ...]:
    """A square matrix of non-negative weights: one row per line, numbers
    separated by spaces or commas; '#' starts a comment."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as error:
        raise ValueError(f"--splits {path!r} is neither 'uniform', 'zipf:ALPHA' nor a readable file: "
                         f"{error.strerror}") from None
    rows: list[tuple[float, ...]] = []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].replace(",", " ").strip()
        if not line:
            continue
        try:
            row = tuple(float(v) for v in line.split())
        except ValueError:
            raise ValueError(f"{path}:{number}: {line!r} is not a row of numbers") from None
        bad = [v for v in row if not math.isfinite(v) or v < 0]
        if bad:
            raise ValueError(f"{path}:{number}: weight {bad[0]} is negative or not finite")
        rows.append(row)
    if not rows or any(len(r) != len(rows) for r in rows):
        shape = [len(r) for r in rows]
        raise ValueError(f"{path}: expected a square matrix, got {len(rows)} rows of lengths {shape}")
    return tuple(rows)


def _weights(spec: SplitsSpec, world_size: int, seed: int) -> list[list[float]]:
    if spec.kind == "uniform":
        return [[1.0] * world_size for _ in range(world_size)]
    if spec.kind == "zipf":
        # Which destination is hottest is seeded, and the same for every source.
        order = torch.randperm(world_size, generator=torch.Generator().manual_seed(seed)).tolist()
        popularity = [0.0] * world_size
        for place, dest in enumerate(order):
            popularity[dest] = 1.0 / (place + 1) ** spec.alpha
        return [list(popularity) for _ in range(world_size)]
    assert spec.weights is not None
    if len(spec.weights) != world_size:
        raise ValueError(f"--splits {spec.text!r} is a {len(spec.weights)}x{len(spec.weights)} matrix but the "
                         f"world has {world_size} ranks")
    return [list(row) for row in spec.weights]


def traffic_matrix(spec: SplitsSpec, world_size: int, elements_per_rank: int, seed: int) -> list[list[int]]:
    """``m[s][d]``: elements rank s sends to rank d.

    Every source sends ``elements_per_rank`` in all (a row of zero weights
    sends nothing), shared in proportion to its weights with the largest-
    remainder rule, so rows sum exactly.
    """
    matrix: list[list[int]] = []
    for row in _weights(spec, world_size, seed):
        total_weight = sum(row)
        if total_weight == 0:
            matrix.append([0] * world_size)
            continue
        shares = [elements_per_rank * w / total_weight for w in row]
        counts = [math.floor(s) for s in shares]
        remainder = elements_per_rank - sum(counts)
        by_fraction = sorted(range(world_size), key=lambda d: (counts[d] - shares[d], d))
        for d in by_fraction[:remainder]:
            counts[d] += 1
        matrix.append(counts)
    return matrix


def receive_imbalance(matrix: list[list[int]]) -> float:
    """Most elements any rank receives, over the mean received (1.0 = even)."""
    received = [sum(col) for col in zip(*matrix, strict=True)]
    mean = sum(received) / len(received)
    return max(received) / mean if mean else 1.0
