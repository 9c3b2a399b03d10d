"""The README's examples run as written: every ```bash block after a `<!-- readme-test: ... -->`
marker, in order, in one fresh folder, with `blip3` from this environment; and each ```python block
after a `<!-- readme-test-python: ... -->` marker, with this Python, in a folder holding the
tour's demo corpus."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKED = re.compile(r"<!-- readme-test: (\S+) -->\s*```bash\n(.*?)```", re.S)
PYTHON = re.compile(r"<!-- readme-test-python: (\S+) -->\s*```python\n(.*?)```", re.S)


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
    env = dict(os.environ, BLIP3_NO_PROGRESS="1", BLIP3_CACHE=str(tmp_path / "cache"), COLUMNS="200",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("BLIP3_DB", None)
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + "\n---\n" + r.stderr[-4000:]
    assert (tmp_path / "work" / "audit-ocr" / "index.html").exists()
    assert (tmp_path / "work" / "tour-mix.png").stat().st_size > 1000
    assert (tmp_path / "work" / "failed.parquet").exists()
    assert "tour-mix" in r.stdout + r.stderr and "tiny-sft" in r.stdout
    _check_tour_output(r.stdout, tmp_path / "work")


@pytest.mark.slow
def test_readme_ray_data_example_runs(tmp_path):
    """The Ray Data pipeline of the tour: the demo's 9 images through our OCR into our shards."""
    (name, code), = PYTHON.findall((REPO / "README.md").read_text())
    assert name == "ray-data"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(BLIP3_NO_PROGRESS="1")
    subprocess.run([sys.executable, "-m", "blip3.cli", "demo", "--corpus-only", "--out", "blip3-demo"], cwd=tmp_path,
                   env=env, check=True, capture_output=True, timeout=300)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.strip().splitlines()[-1] == "9 samples"
    assert sorted(p.name for p in (tmp_path / "work" / "ocr-ray").iterdir()) == [
        "00000.parquet", "00000.tar", "00000_stats.json"]


def _table_rows(stdout: str) -> list[list[str]]:
    """Cells of every table body row printed (rich tables, one line per row at COLUMNS=200)."""
    return [[c.strip() for c in line.strip().strip("│").split("│")]
            for line in stdout.splitlines() if line.startswith("│")]


def _check_tour_output(stdout: str, work: Path) -> None:
    """What the tour's commands print, not only that they exit 0: the demo corpus is fixed, so the
    counts are too (9 OCR images, 8 annotated scenes, a 500-sample mixture weighted 5:2:2:1)."""
    import json

    from blip3.mixture.loader import MixtureLoader

    rows = _table_rows(stdout)
    # blip3 catalog stats: source kind shards samples ok failed ...
    stats = {r[0]: r[1:6] for r in rows if len(r) == 10 and r[1] == "caption"}
    assert stats == {"ocr": ["caption", "3", "9", "9", "0"], "grounding": ["caption", "1", "8", "8", "0"]}
    # blip3 sql "SELECT source, status, count(*) ..."
    assert [r for r in rows if len(r) == 3] == [["grounding", "success", "8"], ["ocr", "success", "9"]]
    # blip3 mix stats tour-mix: the mixture row, then weights and planned samples per source
    assert ["tour-mix", "samples", "7", "4", "500"] in [r[:5] for r in rows]
    planned = {r[0]: (r[2], r[7]) for r in rows if len(r) == 11}
    assert planned == {"ocr": ("0.5", "250"), "grounding": ("0.2", "100"), "tiny-interleaved": ("0.2", "100"),
                       "tiny-sft": ("0.1", "50")}
    # blip3 mix sample work/tour-mix.yaml -n 5: the loader's first five samples, one JSON line each
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"index": ')]
    want = MixtureLoader(work / "tour-mix.yaml").take(5)
    assert [(x["index"], x["source"], x["key"]) for x in lines] == [(i, s["source"], s["key"]) for i, s in enumerate(want)]
    # blip3 sql ... --format csv over v_mixture_sources
    for row in ('"ocr",0.5,250,', '"grounding",0.2,100,', '"tiny-interleaved",0.2,100,', '"tiny-sft",0.1,50,'):
        assert any(line.startswith(row) for line in stdout.splitlines()), row
