"""The README's examples run as written: every ```bash block after a `<!-- readme-test: ... -->`
marker, in order, in one fresh folder, with `blip3` from this environment."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKED = re.compile(r"<!-- readme-test: (\S+) -->\s*```bash\n(.*?)```", re.S)


def readme_blocks() -> list[tuple[str, str]]:
    return MARKED.findall((REPO / "README.md").read_text())


def test_readme_has_the_two_command_quick_start():
    text = (REPO / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = [l.split("#")[0].strip() for l in re.search(r"```bash\n(.*?)```", quick, re.S).group(1).splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci


@pytest.mark.slow
def test_readme_examples_run(tmp_path):
    blocks = readme_blocks()
    assert [name for name, _ in blocks] == ["tour", "train", "sql"]
    (tmp_path / "manifests").symlink_to(REPO / "manifests")
    (tmp_path / "work").mkdir()
    script = "set -euo pipefail\n" + "\n".join(body for _, body in blocks)
    env = dict(os.environ, BLIP3_NO_PROGRESS="1", BLIP3_CACHE=str(tmp_path / "cache"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("BLIP3_DB", None)
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + "\n---\n" + r.stderr[-4000:]
    assert (tmp_path / "work" / "audit-ocr" / "index.html").exists()
    assert (tmp_path / "work" / "tour-mix.png").stat().st_size > 1000
    assert (tmp_path / "work" / "failed.parquet").exists()
    assert "tour-mix" in r.stdout + r.stderr and "tiny-sft" in r.stdout
