"""`blip3 ocr` end to end on a local Ray cluster: rendered text, real photos, every bad input."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import duckdb
import pytest
import webdataset as wds
from typer.testing import CliRunner

from blip3.cli import app
from blip3.core.shards import read_sidecar
from blip3.datagen.ocr_metrics import OcrScore
from blip3.datagen.pipeline import JobOptions
from tests.ocr_fixtures import BAD_EXPECTED, RENDERED, bad_inputs, png_bytes, real_photos, render

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ocr_run(ray_local, tmp_path_factory):
    """One `blip3 ocr` run over rendered signs, real photos and bad files; shared by the tests below."""
    root = tmp_path_factory.mktemp("ocr_e2e")
    src = root / "in"
    (src / "signs").mkdir(parents=True)
    (src / "photos").mkdir()
    (src / "bad").mkdir()
    for spec in RENDERED:
        (src / "signs" / f"{spec.name}.png").write_bytes(png_bytes(render(spec)))
    (src / "signs" / "sign_mack.txt").write_text("a shop front at night")
    for name, (data, _) in real_photos().items():
        ext = ".png" if data.startswith(b"\x89PNG") else ".jpg"
        (src / "photos" / f"{name}{ext}").write_bytes(data)
    for name, data in bad_inputs().items():
        (src / "bad" / name).write_bytes(data)
    out, db = root / "out", root / "catalog.duckdb"
    result = CliRunner().invoke(app, ["ocr", str(src), str(out), "--workers", "2", "--shard-size", "8",
                                      "--db", str(db), "--source", "ocr-e2e"])
    assert result.exit_code == 0, result.output
    tars = sorted(out.glob("*.tar"))
    samples = {s["__key__"]: s for s in wds.WebDataset([str(t) for t in tars], shardshuffle=False)}
    rows = [r for t in tars for r in read_sidecar(t.with_suffix(".parquet")).to_pylist()]
    return {"root": root, "out": out, "db": db, "samples": samples, "rows": rows}


def _by_prefix(items: dict, prefix: str):
    """Folder keys are `dir_name_<hash>` (the `/` was rewritten): find one by its readable prefix."""
    (match,) = [v for k, v in items.items() if re.fullmatch(re.escape(prefix) + "[0-9a-f]{10}", k)]
    return match


def _entries(sample) -> list[dict]:
    return json.loads(sample["json"])["metadata"]["entries"]


def test_rendered_text_is_recognised(ocr_run):
    total = OcrScore()
    for spec in RENDERED:
        sample = _by_prefix(ocr_run["samples"], f"signs_{spec.name}_")
        got = " ".join(e["text"] for e in _entries(sample))
        one = OcrScore().add(spec.text.replace("\n", " "), got)  # lines joined in reading order
        assert one.cer <= 0.25, (spec.name, got)
        total.add(spec.text.replace("\n", " "), got)
    print(f"through the pipeline, {len(RENDERED)} rendered images: {total.summary()}")
    assert total.cer < 0.05 and total.word_recall >= 0.9


def test_sample_records_follow_the_format(ocr_run):
    mack = _by_prefix(ocr_run["samples"], "signs_sign_mack_")
    record = json.loads(mack["json"])
    assert set(record) >= {"key", "uid", "url", "width", "height", "source_caption", "captions", "metadata",
                           "generator", "status"}
    assert record["source_caption"] == "a shop front at night" and record["status"] == "success"
    assert len(record["captions"]) == 12 and record["generator"]["engine"] == "rapidocr"
    assert mack["txt"].decode().startswith('a shop front at night. The image contains the text "MACK SHOP" starts at [')
    assert "jpg" in mack and "png" not in mack  # one image member type per job: the PNG input stored as jpg
    assert record["source_path"].startswith("signs/")  # lineage: the relative path of the folder input


def test_real_photos_with_and_without_text(ocr_run):
    by_name = {name: _by_prefix(ocr_run["samples"], f"photos_{name}_") for name in real_photos()}
    for name, (_, has_text) in real_photos().items():
        entries = _entries(by_name[name])
        assert json.loads(by_name[name]["json"])["status"] == "success"
        if has_text is not None:
            assert bool(entries) == has_text, (name, entries)
        if has_text is False:
            assert by_name[name]["txt"].decode() == "The image contains no text."
    assert any("matpl" in e["text"] for e in _entries(by_name["photo_logo"]))


def test_every_bad_input_is_recorded_in_sidecar_and_catalog(ocr_run):
    by_key = {r["key"]: r for r in ocr_run["rows"]}
    for name, reason in BAD_EXPECTED.items():
        stem = name.rsplit(".", 1)[0]
        row = _by_prefix(by_key, f"bad_{stem}_")
        if reason is None:
            assert row["status"] == "success", (name, row["error_message"])
        else:
            assert row["status"] == "failed" and row["error_message"].startswith(reason + ":"), (name, row["error_message"])
    con = duckdb.connect(str(ocr_run["db"]), read_only=True)
    failed = dict(con.execute(
        "SELECT split_part(error_message, ':', 1), count(*) FROM samples WHERE source = 'ocr-e2e' AND status = 'failed' GROUP BY 1"
    ).fetchall())
    assert failed == {"empty": 1, "decode": 3, "too_large": 1, "too_small": 1}
    n_rows = con.execute("SELECT count(*) FROM samples WHERE source = 'ocr-e2e'").fetchone()[0]
    assert n_rows == len(ocr_run["rows"]) == len(RENDERED) + len(real_photos()) + len(BAD_EXPECTED)


def test_nothing_is_written_outside_the_output_folder(ocr_run):
    out: Path = ocr_run["out"]
    written = {p.relative_to(ocr_run["root"]).parts[0] for p in ocr_run["root"].rglob("*") if p.is_file()}
    assert written == {"in", "out", "catalog.duckdb"}
    names = sorted(p.name for p in out.iterdir())
    assert all(n.split(".")[0].split("_")[0].isdigit() for n in names), names
    keys = [r["key"] for r in ocr_run["rows"]]
    assert len(keys) == len(set(keys))


def test_rerun_skips_finished_shards(ocr_run):
    out = ocr_run["out"]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_stats.json")}
    src = ocr_run["root"] / "in"
    db = ocr_run["db"]
    r = CliRunner().invoke(app, ["ocr", str(src), str(out), "--db", str(db), "--source", "ocr-e2e", "--shard-size", "8"])
    assert r.exit_code == 0 and "0 shard(s) written" in " ".join(r.output.split()), r.output
    assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("*_stats.json")}


def test_webdataset_input_with_hostile_member_names_stays_inside_output(ray_local, tmp_path):
    from blip3.datagen.ocr import run_ocr
    from tests.ocr_fixtures import text_image

    img = png_bytes(text_image("SAFE 1"))
    tar_path = tmp_path / "in" / "shard-000.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w") as tar:
        for name in ["dup.png", "../../escape.png", "/abs/root.png", "dup.png", "naïve ☕.png", "a/b/c.png"]:
            info = tarfile.TarInfo(name)
            info.size = len(img)
            tar.addfile(info, io.BytesIO(img))
    out = tmp_path / "out"
    result = run_ocr(str(tmp_path / "in" / "shard-{000..000}.tar"), out,
                     JobOptions(workers=1, shard_size=4, db=tmp_path / "c.duckdb"))
    assert result.successes == 6 and result.failed == 0
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert all(f.startswith(("in/", "out/")) or f == "c.duckdb" for f in files), files
    keys = [s["__key__"] for t in sorted(out.glob("*.tar")) for s in wds.WebDataset(str(t), shardshuffle=False)]
    assert len(keys) == len(set(keys)) == 6 and "dup" in keys and "dup_1" in keys
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", k) for k in keys)
    with tarfile.open(out / "00000.tar") as tar:
        assert all("/" not in m.name and ".." not in m.name for m in tar.getmembers())
