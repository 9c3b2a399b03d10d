"""One import namespace: everything is `blip3.*`, nothing else lands at the top level, and a
user's own `model.py` / `train.py` / `core.py` in the working folder can never be imported by us.

Subprocesses run with `cwd` a temporary folder, as a user's shell would: Python puts that folder
first on `sys.path` for `-c` and `-m`, so a wrong top-level import would pick the user's file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

USER_FILES = ("model.py", "train.py", "core.py", "cli.py", "mixture.py", "datagen.py")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture
def hostile_folder(tmp_path: Path) -> Path:
    """A folder holding files named like our packages, each raising on import."""
    for name in USER_FILES:
        (tmp_path / name).write_text(f"raise RuntimeError('the user file {name} was imported')\n")
    return tmp_path


def _blip3() -> list[str]:
    exe = shutil.which("blip3") or str(Path(sys.executable).with_name("blip3"))
    return [exe]


def test_blip3_help_ignores_user_files(hostile_folder: Path):
    r = _run([*_blip3(), "--help"], hostile_folder)
    assert r.returncode == 0, r.stderr
    assert "was imported" not in r.stdout + r.stderr
    for group in ("ocr", "ground", "source", "mix", "audit", "train", "model", "demo", "catalog"):
        assert group in r.stdout


def test_packages_import_beside_user_files(hostile_folder: Path):
    code = "import blip3.model.resampler, blip3.train, blip3.datagen, blip3.mixture; print('ok')"
    r = _run([sys.executable, "-c", code], hostile_folder)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_trainer_module_help_beside_user_files(hostile_folder: Path):
    r = _run([sys.executable, "-m", "blip3.train", "--help"], hostile_folder)
    assert r.returncode == 0, r.stderr
    assert "was imported" not in r.stdout + r.stderr
    assert "usage" in r.stdout.lower()


@pytest.mark.parametrize("name", ["model", "train", "core", "datagen", "mixture", "cli", "demo"])
def test_no_top_level_module_of_ours(tmp_path: Path, name: str):
    r = _run([sys.executable, "-c", f"import {name}"], tmp_path)
    assert r.returncode != 0
    assert "ModuleNotFoundError" in r.stderr


def test_a_missing_command_module_is_loud():
    """cli registers every group it lists; one that does not import is an error, not a gap."""
    from blip3 import cli

    with pytest.raises(ModuleNotFoundError):
        cli._register_groups(("blip3.core.commands",))  # a package without a commands.py
