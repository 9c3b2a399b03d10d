"""`blip3 recaption` as a job on a local Ray cluster, with tiny real models: shards, records,
generator info, catalog scores and views, audit; and a run killed mid-way that resumes to the
bytes of an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import webdataset as wds
from typer.testing import CliRunner

from blip3.cli import app
from blip3.core.shards import clean_temporaries, file_sha256, read_sidecar, shard_complete
from blip3.core.sql import run_query
from blip3.datagen.recaption_prompts import DEFAULT_MERGE_PROMPT, DEFAULT_VLM_PROMPT
from tests.recaption_fixtures import ALT_TEXTS, tiny_llama, tiny_llava, write_images  # noqa: F401

pytestmark = pytest.mark.slow  # each job starts Ray Data stages and loads two models per actor

def _args(src, out, db, vlm, llm, *extra: str) -> list[str]:
    return ["recaption", str(src), "-o", str(out), "--vlm", str(vlm), "--llm", str(llm), "--db", str(db),
            "--workers", "1", "--max-new-tokens", "6", "--merge-max-new-tokens", "6", *extra]


def _rows(db, sql: str) -> list[dict]:
    return run_query(sql, db).to_pylist()


def test_recaption_job_writes_traceable_shards_and_catalog_scores(ray_local, tmp_path, tiny_llava, tiny_llama):  # noqa: F811
    src = write_images(tmp_path / "imgs", 6)
    out, db = tmp_path / "out", tmp_path / "c.duckdb"
    r = CliRunner().invoke(app, _args(src, out, db, tiny_llava, tiny_llama, "--shard-size", "4", "--batch-size", "3"))
    assert r.exit_code == 0, r.output
    assert "2 shard(s) written, 0 already done; 6 ok, 0 failed" in " ".join(r.output.split())

    stats = json.loads((out / "00000_stats.json").read_text())
    gen = stats["generator"]
    assert gen["name"] == "recaption" and gen["vlm"]["prompt"] == DEFAULT_VLM_PROMPT
    assert gen["llm"]["prompt"] == DEFAULT_MERGE_PROMPT and gen["llm"]["model"] == "tiny-llama"
    records = {s["__key__"]: s for s in wds.WebDataset(str(out / "00000.tar"), shardshuffle=False)}
    rec = json.loads(records["img_00"]["json"])
    assert rec["source_caption"] == ALT_TEXTS[0] and rec["metadata"]["merge"] == "merged"
    assert records["img_00"]["txt"].decode() == rec["captions"][1]["text"]
    assert [c["style"] for c in rec["captions"]] == ["dense", "knowledge"]
    assert json.loads(records["img_01"]["json"])["metadata"]["merge"] == "no_alt_text"  # no alt-text: no LLM call
    assert rec["generator"]["vlm"] == gen["vlm"]
    side = read_sidecar(out / "00000.parquet")
    assert side.column("n_captions").to_pylist() == [2, 1, 2, 2]

    # the catalog: generator info per shard, one score row per sample and signal, the views
    shard_gen = _rows(db, "SELECT generator FROM shards ORDER BY idx")
    assert json.loads(shard_gen[0]["generator"])["llm"]["prompt"] == DEFAULT_MERGE_PROMPT
    per_sample = _rows(db, "SELECT key, merged, alt_entities, entity_survival FROM v_recaption_scores ORDER BY key")
    assert [(s["key"], s["merged"], s["alt_entities"]) for s in per_sample] == [
        ("img_00", 1, 2), ("img_01", 0, None), ("img_02", 1, 1), ("img_03", 1, 3), ("img_04", 0, None), ("img_05", 1, None)]
    (quality,) = _rows(db, "SELECT * FROM v_recaption_quality")
    assert quality["samples"] == 6 and quality["merged_share"] == round(4 / 6, 4) and quality["alt_entities"] == 6
    survival = _rows(db, "SELECT shard, alt_entities FROM v_entity_survival ORDER BY shard")
    assert [s["alt_entities"] for s in survival] == [6, None]

    # a re-run skips every shard and reads no tar for scores again; audit reads the shards
    before = _rows(db, "SELECT count(*) AS n FROM sample_scores")
    r = CliRunner().invoke(app, _args(src, out, db, tiny_llava, tiny_llama, "--shard-size", "4", "--batch-size", "1"))
    assert r.exit_code == 0 and "0 shard(s) written, 2 already done" in " ".join(r.output.split()), r.output
    assert _rows(db, "SELECT count(*) AS n FROM sample_scores") == before
    r = CliRunner().invoke(app, ["audit", str(out), "-o", str(tmp_path / "audit")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "audit" / "index.html").is_file()


def test_killed_recaption_resumes_to_identical_shards(ray_local, tmp_path, tiny_llava, tiny_llama):  # noqa: F811
    n_images, shard_size = 16, 2
    n_shards = n_images // shard_size
    src = write_images(tmp_path / "imgs", n_images)
    ref = tmp_path / "ref"
    r = CliRunner().invoke(app, _args(src, ref, tmp_path / "ref.duckdb", tiny_llava, tiny_llama,
                                      "--shard-size", str(shard_size)))
    assert r.exit_code == 0, r.output

    out = tmp_path / "out"
    code = "import sys; from cli import main; sys.argv = ['blip3'] + sys.argv[1:]; main()"
    args = _args(src, out, tmp_path / "out.duckdb", tiny_llava, tiny_llama, "--shard-size", str(shard_size))
    proc = subprocess.Popen([sys.executable, "-c", code, *args, "--ray-address", ray_local],
                            env={**os.environ, "BLIP3_NO_PROGRESS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while not (out / "00000_stats.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no shard appeared"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = [i for i in range(n_shards) if shard_complete(out, i)]
    assert 0 < len(done_at_kill) < n_shards, f"the kill must land mid-way, finished: {done_at_kill}"

    # the re-run uses another batch size: greedy captions do not depend on it, so nothing is redone
    r = CliRunner().invoke(app, [*args, "--batch-size", "2", "--merge-batch-size", "2"])
    assert r.exit_code == 0, r.output
    assert f"{n_shards - len(done_at_kill)} shard(s) written, {len(done_at_kill)} already done" in " ".join(r.output.split())
    assert clean_temporaries(out) == 0
    names = sorted(p.name for p in ref.glob("*.tar"))
    assert names == sorted(p.name for p in out.glob("*.tar")) and len(names) == n_shards
    for name in names:
        assert file_sha256(out / name) == file_sha256(ref / name), name
    assert _rows(tmp_path / "out.duckdb", "SELECT count(DISTINCT key) AS n FROM sample_scores") == [{"n": n_images}]


def test_recaption_in_a_users_ray_data_pipeline_gives_the_cli_tar(ray_local, tmp_path, tiny_llava, tiny_llama):  # noqa: F811
    import ray.data

    from blip3.datagen.ray import Recaption, ShardSink
    from blip3.datagen.recaption_models import GenerationSettings

    src = write_images(tmp_path / "imgs", 4)
    r = CliRunner().invoke(app, _args(src, tmp_path / "cli", tmp_path / "c.duckdb", tiny_llava, tiny_llama,
                                      "--shard-size", "100"))
    assert r.exit_code == 0, r.output
    ctx = ray.data.DataContext.get_current()
    saved, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        gen = GenerationSettings(max_new_tokens=6, batch_size=3)
        ds = ray.data.read_binary_files(sorted(str(p) for p in src.glob("*.png")), include_paths=True)
        ds = ds.map_batches(Recaption, fn_constructor_kwargs={"root": str(src), "vlm": str(tiny_llava),
                                                              "llm": str(tiny_llama), "vlm_generation": gen,
                                                              "llm_generation": gen},
                            compute=ray.data.ActorPoolStrategy(size=1), batch_size=4)
        ds.repartition(1).write_datasink(ShardSink(tmp_path / "lib"))
    finally:
        ctx.execution_options.preserve_order = saved
    lib = {s["__key__"]: s for s in wds.WebDataset(str(tmp_path / "lib" / "00000.tar"), shardshuffle=False)}
    cli = {s["__key__"]: s for s in wds.WebDataset(str(tmp_path / "cli" / "00000.tar"), shardshuffle=False)}
    assert sorted(lib) == sorted(cli) == [f"img_{i:02d}" for i in range(4)]
    for key in cli:  # the same captions and records (the alt-texts come from the .txt files for the CLI only)
        assert json.loads(lib[key]["json"])["metadata"]["dense_caption"] == json.loads(cli[key]["json"])["metadata"]["dense_caption"]
