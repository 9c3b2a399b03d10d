"""Fixtures for mixture/audit tests: tiny sources of all kinds written with the real ShardWriter,
a catalog that registers them, and helpers to write specs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from blip3.core.catalog import Catalog
from blip3.mixture.sources import add_source
from blip3.mixture.tiny_sources import TINY_KINDS, write_tiny_sources
from blip3.mixture.tokens import TokenCounter


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory) -> dict[str, Path]:
    """{name: folder} of the five tiny sources (2 shards x 24 samples each). Read-only: copy to modify."""
    return write_tiny_sources(tmp_path_factory.mktemp("tiny-sources"))


@pytest.fixture(scope="session")
def tiny_catalog(tmp_path_factory, tiny_sources) -> Path:
    """A catalog file with every tiny source registered (estimate token counts)."""
    db = tmp_path_factory.mktemp("catalog") / "catalog.duckdb"
    with Catalog(db) as cat:
        for name, folder in tiny_sources.items():
            add_source(cat, name, folder, TINY_KINDS[name], TokenCounter())
    return db


def copy_sources(tiny_sources: dict[str, Path], dest: Path) -> dict[str, Path]:
    """A private copy of the tiny sources (for tests that move or corrupt shards)."""
    return {name: Path(shutil.copytree(folder, dest / name)) for name, folder in tiny_sources.items()}


def write_spec(path: Path, sources: list[dict], *, name: str = "t", seed: int = 0, **extra) -> Path:
    path.write_text(yaml.safe_dump({"name": name, "seed": seed, **extra, "sources": sources}, sort_keys=False))
    return path


def inline(tiny_sources: dict[str, Path], weights: dict[str, float]) -> list[dict]:
    """Inline spec entries for the named tiny sources."""
    return [{"name": n, "path": str(tiny_sources[n]), "kind": TINY_KINDS[n], "weight": w} for n, w in weights.items()]
