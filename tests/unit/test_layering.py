"""Imports and includes point only downward through the five layers
(docs/architecture.md): a layer may use the layers below it, never above."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Python: package -> its layer. A module may import from packages of the
# same or a lower layer (and from the extension loader, layer 0).
PY_LAYERS = {
    "_library": 0,
    "_env": 0,
    "topology": 1,
    "plan": 2,
    "transport": 3,
    "launch": 3,  # bootstrap: uses the transport's timeout only
    "ops": 4,
    "backend": 4,  # the "alltoall" torch.distributed backend, over ops' selection rule
    "moe": 5,
    "cli": 5,
    "bench": 5,  # python -m alltoall.bench
    "testing": 6,
    "integrations": 6,  # framework integrations (alltoall.integrations.megatron), above the library
}

# C++: folder -> the folders it may include from.
CPP_ALLOWED = {
    "common": {"common"},
    "plan": {"plan"},
    "kernels": {"common", "kernels"},
    "transport": {"transport"},
    "ops": {"common", "kernels", "plan", "transport", "ops"},
    "backend": {"common", "kernels", "plan", "transport", "ops", "backend"},
    "bindings": {"common", "kernels", "plan", "transport", "ops", "backend", "bindings"},
}


def package_of(path: Path) -> str:
    rel = path.relative_to(ROOT / "alltoall")
    return rel.parts[0].removesuffix(".py") if rel.parts[0] != "__init__.py" else "__init__"


def alltoall_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "alltoall" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


PY_FILES = sorted(p for p in (ROOT / "alltoall").rglob("*.py") if package_of(p) != "__init__")


@pytest.mark.parametrize("path", PY_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_imports_point_down(path):
    mine = PY_LAYERS[package_of(path)]
    for line, target in alltoall_imports(path):
        assert target in PY_LAYERS, f"{path}:{line} imports unknown package alltoall.{target}"
        assert PY_LAYERS[target] <= mine, (
            f"{path}:{line}: layer {mine} ({package_of(path)}) imports alltoall.{target} (layer {PY_LAYERS[target]})"
        )


CPP_FILES = sorted(p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cpp", ".cu"))


@pytest.mark.parametrize("path", CPP_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cpp_includes_point_down(path):
    folder = path.relative_to(ROOT / "csrc").parts[0]
    allowed = CPP_ALLOWED[folder]
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        match = re.match(r'\s*#include\s+"([^/"]+)/', text)
        if match:
            assert match.group(1) in allowed, f"{path}:{line}: {folder}/ includes {match.group(1)}/"


def test_plans_are_pure_cpp():
    # Layer 2 is data: no torch, no CUDA, so it builds and tests anywhere.
    for path in (ROOT / "csrc" / "plan").iterdir():
        for line, text in enumerate(path.read_text().splitlines(), start=1):
            assert not re.match(r"\s*#include\s+<(torch|ATen|c10|cuda)", text), f"{path}:{line}: {text.strip()}"
