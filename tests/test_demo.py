"""`blip3 demo` end to end, through the real CLI: every stage leaves what it promises."""

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import webdataset as wds
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "sft", "interleave", "dpo", "safety")


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, BLIP3_NO_PROGRESS="1", BLIP3_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "blip3.cli", "demo", "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "report:" in r.stderr

    # Caption shards, read back by webdataset, with the captions of docs/captions.md.
    for source in ("ocr-web", "ocr-local", "coco-grounding"):
        tars = sorted((out / "shards" / source).glob("*.tar"))
        assert tars, source
        samples = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False))
        assert samples, source
        rec = json.loads(samples[0]["json"])
        assert rec["captions"], source
    ocr = [json.loads(s["json"]) for s in wds.WebDataset(str(out / "shards/ocr-web/00000.tar"), shardshuffle=False)]
    texts = {e["text"] for rec in ocr for e in rec["metadata"]["entries"]}
    assert "MACK SHOP" in texts  # real OCR on a rendered sign fetched over HTTP by img2dataset

    # The catalog: sources, failures recorded with reasons, runs of all five stages.
    con = duckdb.connect(str(out / "catalog.duckdb"), read_only=True)
    try:
        sources = dict(con.execute("SELECT name, kind FROM sources").fetchall())
        assert {"ocr-web", "ocr-local", "coco-grounding", "tiny-interleaved", "tiny-sft", "tiny-dpo"} <= set(sources)
        reasons = {r[0] for r in con.execute("SELECT reason FROM v_failures WHERE source = 'ocr-web'").fetchall()}
        assert {"download", "decode"} <= reasons  # the 404 and the corrupt image
        runs = dict(con.execute("SELECT stage, checkpoint FROM runs").fetchall())
        assert set(runs) == set(STAGES)
        assert con.execute("SELECT count(*) FROM mixtures WHERE name = 'demo-mix'").fetchone()[0] == 1
    finally:
        con.close()

    manifest = yaml.safe_load((out / "demo-mix.manifest.yaml").read_text())
    assert {s["name"] for s in manifest["sources"]} >= {"ocr-web", "coco-grounding", "tiny-dpo"}
    for stage in STAGES:
        final = out / "runs" / stage / "final"
        assert (final / "config.json").is_file(), stage
        assert any(final.glob("*.safetensors")), stage

    report = (out / "report.html").read_text()
    assert "losses.png" in report and "mixture.png" in report and "audit/ocr-web/index.html" in report
    assert (out / "losses.png").stat().st_size > 1000


def test_demo_out_refuses_a_folder_that_is_not_an_earlier_demo(tmp_path):
    from blip3.core.errors import UserError
    from blip3.demo.run import MARKER, claim_out_dir

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    env = dict(os.environ, BLIP3_NO_PROGRESS="1")
    for args in (["--corpus-only"], []):  # the full demo refuses before any work too
        r = subprocess.run([sys.executable, "-m", "blip3.cli", "demo", "--out", str(mine), *args],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "--force" in r.stderr
        assert (mine / "thesis.tex").read_text() == "years of work" and not (mine / "corpus").exists()
    r = subprocess.run([sys.executable, "-m", "blip3.cli", "demo", "--out", str(mine), "--corpus-only", "--force"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (mine / "corpus" / "scenes" / "coco.json").is_file() and (mine / MARKER).is_file()

    earlier = claim_out_dir(tmp_path / "demo")  # an earlier demo's folder is replaced without --force
    (earlier / "stale.txt").write_text("x")
    assert claim_out_dir(earlier) == earlier and not (earlier / "stale.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert claim_out_dir(empty) == empty
    with pytest.raises(UserError, match="is a file"):
        claim_out_dir(mine / "thesis.tex")
