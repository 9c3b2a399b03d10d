"""The CLI surface: groups listed, every command documented, --help fast (no heavy imports)."""

import subprocess
import sys
from pathlib import Path

import typer.main

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
