"""Progress bars on the long steps of a datagen job (listing the input, re-hashing finished shards
on resume: ours; then each Ray Data stage: Ray Data's), on stderr only, and none with BLIP3_NO_PROGRESS."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from blip3.core import logs
from blip3.datagen.pipeline import JobOptions, run_job
from tests.ocr_fixtures import png_bytes, text_image
from tests.test_datagen_pipeline import SizeCaptioner

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def terminal(monkeypatch) -> io.StringIO:
    """The project console as a terminal writing into a buffer, bars switched on."""
    buf = io.StringIO()
    monkeypatch.setattr(logs, "console", Console(file=buf, force_terminal=True, width=200))
    monkeypatch.delenv("BLIP3_NO_PROGRESS", raising=False)
    return buf


def _rows(buf: io.StringIO) -> str:
    return _ANSI.sub("", buf.getvalue())


def _inputs(tmp_path, n: int = 5):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(n):
        (src / f"img{i}.png").write_bytes(png_bytes(text_image(f"N {i}", size=(60 + 4 * i, 30))))
    return src


def _final(rows: str, description: str) -> str:
    """The last drawn state of one bar row (the count after its description)."""
    drawn = [line for line in rows.replace("\r", "\n").splitlines() if description in line]
    assert drawn, f"no {description!r} row in:\n{rows}"
    return drawn[-1]


@pytest.fixture
def data_bars():
    """Ray Data's own bars on (the test session's cluster has them off)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars
    ctx.enable_progress_bars = True
    yield ctx
    ctx.enable_progress_bars = saved


def test_the_jobs_stages_show_ray_datas_bars_unless_bars_are_off(data_bars, monkeypatch):
    """While a job runs, Ray Data draws a row per stage (its rich bars, on stderr: seen in a
    terminal, where they show `ReadShardPlans->MapBatches(ProcessShards)`, or the three stages of
    an accelerator's job); BLIP3_NO_PROGRESS turns them off; the settings are restored after."""
    from blip3.datagen.pipeline import _data_context

    monkeypatch.delenv("BLIP3_NO_PROGRESS", raising=False)
    data_bars.enable_rich_progress_bars = False
    with _data_context():
        assert data_bars.enable_progress_bars and data_bars.enable_rich_progress_bars and not data_bars.use_ray_tqdm
        assert data_bars.max_errored_blocks == -1  # a failed shard is reported by the driver, after the rest
    assert not data_bars.enable_rich_progress_bars and data_bars.max_errored_blocks == 0
    monkeypatch.setenv("BLIP3_NO_PROGRESS", "1")
    with _data_context():
        assert not data_bars.enable_progress_bars
    assert data_bars.enable_progress_bars


def test_a_datagen_job_shows_listing_and_resume_hashing(ray_local, tmp_path, terminal, capsys):
    src, out = _inputs(tmp_path), tmp_path / "out"
    run_job(src, out, SizeCaptioner, JobOptions(workers=1, shard_size=2, register=False))
    first = _rows(terminal)
    assert "5/?" in _final(first, "in: inputs listed")
    assert "re-hashed" not in first  # only --verify re-hashes
    assert capsys.readouterr().out == ""  # bars never land on stdout

    terminal.truncate(0)
    terminal.seek(0)
    again = run_job(src, out, SizeCaptioner, JobOptions(workers=1, shard_size=2, register=False, verify=True))
    assert again.shards_skipped == 3
    resumed = _rows(terminal)
    assert "3/?" in _final(resumed, "finished shards re-hashed (--verify)")
    assert "5/?" in _final(resumed, "in: inputs listed")
    assert capsys.readouterr().out == ""


def test_no_bars_with_blip3_no_progress(ray_local, tmp_path, terminal, monkeypatch):
    monkeypatch.setenv("BLIP3_NO_PROGRESS", "1")
    run_job(_inputs(tmp_path, 2), tmp_path / "out", SizeCaptioner,
            JobOptions(workers=1, shard_size=2, register=False, verify=True))
    assert "inputs listed" not in _rows(terminal)
