"""The CLI surface: groups listed, every command documented, --help fast (no heavy imports)."""

import importlib.metadata
import re
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import typer.main

from blip3.core.catalog import Catalog
from blip3.core.sql import run_query
from tests.core_fixtures import write_caption_shard

REPO = Path(__file__).resolve().parents[1]


def _walk(cmd, path: tuple[str, ...] = ()):
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _walk(sub, path + (name,))


def test_every_command_has_help_text():
    from blip3.cli import app

    root = typer.main.get_command(app)
    seen = []
    for path, cmd in _walk(root):
        if not path:
            continue
        seen.append(" ".join(path))
        assert (cmd.help or cmd.short_help or "").strip(), f"`blip3 {' '.join(path)}` has no help text"
    assert {"catalog add", "catalog stats", "sql"} <= set(seen)


def test_help_lists_groups_and_imports_nothing_heavy():
    code = (
        "import sys; from typer.testing import CliRunner; from blip3.cli import app; "
        "r = CliRunner().invoke(app, ['--help']); print(r.output); "
        "heavy = [m for m in ('torch', 'ray', 'transformers') if m in sys.modules]; print('HEAVY', heavy)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "catalog" in r.stdout and "sql" in r.stdout
    assert "HEAVY []" in r.stdout


def test_version_and_completion_options():
    r = subprocess.run([sys.executable, "-m", "blip3.cli", "--version"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == f"blip3 {importlib.metadata.version('blip3-engine')}"
    r = subprocess.run([sys.executable, "-m", "blip3.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert "--install-completion" in r.stdout and "--show-completion" in r.stdout


def test_piped_table_keeps_one_line_per_row_and_out_file_is_not_printed(tmp_path):
    write_caption_shard(tmp_path / "src", 0, 3)
    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        cat.add_output(tmp_path / "src", source="a-source-with-a-rather-long-name-" + "x" * 150)
    q = "SELECT source, key, status FROM samples ORDER BY key"
    r = subprocess.run([sys.executable, "-m", "blip3.cli", "sql", q, "--db", str(db)],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "COLUMNS": "80"})
    n = run_query("SELECT count(*) AS n FROM samples", db).column("n")[0].as_py()
    rows = [line for line in r.stdout.splitlines() if "a-source-with" in line]
    assert len(rows) == n and all("x" * 150 in line for line in rows)  # nothing folded onto a second line
    out = tmp_path / "t.txt"
    r = subprocess.run([sys.executable, "-m", "blip3.cli", "sql", q, "--db", str(db), "--out", str(out)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout == "" and len([ln for ln in out.read_text().splitlines()
                                                         if "a-source-with" in ln]) == n
    for fmt in ("csv", "json"):
        r = subprocess.run([sys.executable, "-m", "blip3.cli", "catalog", "stats", "--db", str(db), "--format", fmt],
                           capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0 and "a-source-with" in r.stdout
    pq_out = tmp_path / "s.parquet"
    r = subprocess.run([sys.executable, "-m", "blip3.cli", "catalog", "stats", "--db", str(db), "-f", "parquet",
                        "-o", str(pq_out)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and pq.read_table(pq_out).column("source")[0].as_py().startswith("a-source-with")


def test_every_option_has_help_and_a_long_form():
    from blip3.cli import app

    seen = 0
    for path, cmd in _walk(typer.main.get_command(app)):
        for p in getattr(cmd, "params", []):
            if p.param_type_name == "option":
                seen += 1
                where = f"`blip3 {' '.join(path)}` {p.opts}"
                assert (p.help or "").strip(), f"{where} has no help text"
                assert any(o.startswith("--") for o in p.opts), f"{where} has no long form"
    assert seen > 100  # the walk did see the options


def test_output_is_dash_o_everywhere_and_the_positional_form_still_works(tmp_path):
    """`-o/--out` names the output of every command that writes a folder; the older positional
    form is kept; both given and disagreeing is one clear line."""
    def run(*args):
        return subprocess.run([sys.executable, "-m", "blip3.cli", *args], capture_output=True, text=True, cwd=REPO)

    new, old = tmp_path / "new", tmp_path / "old"
    assert run("source", "tiny", "-o", str(new), "--shards", "1", "--per-shard", "2").returncode == 0
    assert run("source", "tiny", str(old), "--shards", "1", "--per-shard", "2").returncode == 0
    assert sorted(p.relative_to(new).as_posix() for p in new.rglob("*")) == sorted(
        p.relative_to(old).as_posix() for p in old.rglob("*"))
    r = run("source", "tiny", str(old), "-o", str(new))
    assert r.returncode == 2 and "pass it once, as -o/--out" in r.stderr and "Traceback" not in r.stderr
    r = run("source", "tiny")
    assert r.returncode == 2 and r.stderr.strip() == "error: --out: missing the output folder: pass -o/--out"


#: Every command that writes a file or folder, each named by `-o/--out`.
WRITERS = {"sql", "ocr", "ground", "recaption", "retemplate", "import-released", "audit", "train", "merge-lora", "demo", "eval",
           "catalog stats", "export blip3-ocr", "source import-obelics", "source tiny", "mix build", "mix sample",
           "mix stats", "mix plot", "model init"}


def test_one_output_convention_across_commands():
    """`-o/--out` on every command that writes; a positional output is only the older, optional form."""
    from blip3.cli import app

    with_out = set()
    for path, cmd in _walk(typer.main.get_command(app)):
        name = " ".join(path)
        params = getattr(cmd, "params", [])
        outs = [p for p in params if p.param_type_name == "option" and "--out" in p.opts]
        for p in outs:
            assert "-o" in p.opts, f"`blip3 {name}` has --out without -o"
            with_out.add(name)
        for p in params:
            if p.param_type_name != "argument":
                continue
            assert p.name != "out", f"`blip3 {name}` takes its output as a positional argument"
            if "older form of -o/--out" in (getattr(p, "help", None) or ""):
                assert not p.required and outs, f"`blip3 {name}`: the positional output must be optional"
    assert with_out == WRITERS


def test_model_init_writes_to_dash_o_and_keeps_the_positional_form(tmp_path):
    from typer.testing import CliRunner

    from blip3.cli import app

    runner = CliRunner()
    new, old = tmp_path / "new", tmp_path / "old"
    assert runner.invoke(app, ["model", "init", "-o", str(new), "--config", "tiny", "--seed", "1"]).exit_code == 0
    assert runner.invoke(app, ["model", "init", str(old), "--config", "tiny", "--seed", "1"]).exit_code == 0
    assert (new / "model.safetensors").read_bytes() == (old / "model.safetensors").read_bytes()
    r = subprocess.run([sys.executable, "-m", "blip3.cli", "model", "init", "--config", "tiny"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and r.stderr.strip() == "error: --out: missing the model directory: pass -o/--out"
    r = subprocess.run([sys.executable, "-m", "blip3.cli", "merge-lora", str(new), str(old), "--out", str(new)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "pass it once, as -o/--out" in r.stderr and "Traceback" not in r.stderr


def test_choices_are_shown_as_choices_and_match_the_libraries_lists():
    from typing import get_args

    from blip3.cli import app
    from blip3.core.catalog import SOURCE_KINDS
    from blip3.core.options import InputFormat, SourceKind
    from blip3.datagen.grounding import DETECTORS, TAG_SOURCES
    from blip3.datagen.grounding_captions import FORMATS, ORDERS, STYLES
    from blip3.datagen.inputs import INPUT_FORMATS
    from blip3.datagen.ocr_engines import ENGINES
    from blip3.eval.protocols import PROTOCOLS

    assert get_args(SourceKind) == SOURCE_KINDS and get_args(InputFormat) == INPUT_FORMATS
    cmds = {" ".join(path): cmd for path, cmd in _walk(typer.main.get_command(app))}
    expect = {("ocr", "--engine"): ENGINES, ("ocr", "--input-format"): INPUT_FORMATS,
              ("ground", "--detector"): DETECTORS, ("ground", "--tags"): TAG_SOURCES,
              ("ground", "--caption-format"): FORMATS, ("ground", "--caption-style"): STYLES,
              ("ground", "--tag-order"): ORDERS, ("catalog add", "--kind"): SOURCE_KINDS,
              ("sql", "--format"): ("table", "csv", "json", "parquet"), ("eval", "--protocol"): tuple(PROTOCOLS)}
    for (cmd, opt), values in expect.items():
        param = next(p for p in cmds[cmd].params if opt in p.opts)
        assert param.type_descriptor.is_choice and set(param.type_descriptor.choices) == set(values), (cmd, opt)
    # no option lists its alternatives in free text ("a | b") instead of as choices
    for path, cmd in cmds.items():
        for p in getattr(cmd, "params", []):
            if p.param_type_name == "option" and not p.type_descriptor.is_choice:
                assert not re.match(r"^[\w.-]+( \([^)]*\))? ?\| ?[\w.-]+", p.help or ""), (path, p.opts, p.help)
