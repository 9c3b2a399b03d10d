"""The catalog is the only database writer, and `--db` is declared and resolved in one place."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import typer
from typer.testing import CliRunner

from blip3.core.options import DbOption
from tests.mixture_fixtures import inline, tiny_sources, write_spec  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "datagen", "mixture", "train", "model", "demo")
# The catalog's module writes; views.py declares the views; sql.py runs users' read-only queries;
# curation.py reads and writes the catalog's curation tables (scores, hashes, decisions, matches).
DATABASE_MODULES = {"core/catalog.py", "core/views.py", "core/sql.py", "core/curation.py"}
DB_ACCESS = re.compile(r"\.execute\(|duckdb\.connect\(|\bcon\.(register|sql)\(")


def test_no_module_outside_the_catalog_talks_to_the_database():
    offenders = []
    for path in [REPO / "cli.py", *(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))]:
        rel = path.relative_to(REPO).as_posix()
        if rel in DATABASE_MODULES:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if DB_ACCESS.search(line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "database access outside the catalog layer:\n" + "\n".join(offenders)


def test_db_option_resolves_flag_then_env_then_default(tmp_path, monkeypatch):
    app = typer.Typer()

    @app.command()
    def show(db: Path = DbOption) -> None:
        print(db)

    runner = CliRunner()
    monkeypatch.delenv("BLIP3_DB", raising=False)
    assert runner.invoke(app, []).output.strip() == "catalog.duckdb"
    monkeypatch.setenv("BLIP3_DB", str(tmp_path / "env.duckdb"))
    assert runner.invoke(app, []).output.strip() == str(tmp_path / "env.duckdb")
    assert runner.invoke(app, ["--db", str(tmp_path / "flag.duckdb")]).output.strip() == str(tmp_path / "flag.duckdb")


def test_mix_build_records_the_mixture_through_the_catalog_in_the_env_db(tmp_path, tiny_sources):  # noqa: F811
    spec = write_spec(tmp_path / "spec.yaml", inline(tiny_sources, {"sft": 2, "dpo": 1}), name="owner")
    db = tmp_path / "env.duckdb"
    env = {**os.environ, "BLIP3_DB": str(db)}
    r = subprocess.run([sys.executable, "-m", "blip3.cli", "mix", "build", str(spec), "-o", str(tmp_path / "m.yaml")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "catalog.duckdb").exists()
    con = duckdb.connect(str(db), read_only=True)
    try:
        assert con.execute("SELECT name, seed FROM mixtures").fetchall() == [("owner", 0)]
        rows = con.execute("SELECT source, kind, n_shards FROM mixture_sources ORDER BY source").fetchall()
    finally:
        con.close()
    assert rows == [("dpo", "dpo", 2), ("sft", "sft", 2)]
