"""The packages' dependency order: core <- model <- eval <- train (datagen and mixture beside).

A model directory is loaded by `model.directory` and the process group joined by
`model.runtime`, so evaluation never needs the trainer; the trainer runs benchmarks through eval
(a stage's `benchmarks:`), never the other way round."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> dict[str, set[str]]:
    """module file -> the blip3 packages it imports (at top level or inside functions)."""
    found: dict[str, set[str]] = {}
    for f in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for n in names:
                if n.startswith("blip3."):
                    found.setdefault(str(f.relative_to(ROOT)), set()).add(n.split(".")[1])
    return found


@pytest.mark.parametrize("package, forbidden", [("model", {"train", "eval"}), ("eval", {"train"}), ("core", {"model", "train", "eval"})])
def test_lower_layers_do_not_import_higher_ones(package, forbidden):
    wrong = {f: sorted(pkgs & forbidden) for f, pkgs in _imports(package).items() if pkgs & forbidden}
    assert wrong == {}
