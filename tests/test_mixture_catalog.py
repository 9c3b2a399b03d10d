"""Sources in the catalog, and the SQL views answering on a real catalog built by the commands."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from blip3.cli import app
from blip3.core.catalog import Catalog
from blip3.core.errors import UserError
from blip3.core.sql import run_query
from blip3.mixture.build import build_manifest
from blip3.mixture.sources import add_source, scan_shard
from blip3.mixture.tokens import ESTIMATE_LABEL, TokenCounter
from tests.mixture_fixtures import tiny_sources, write_spec  # noqa: F401  (fixture)

runner = CliRunner()


def _cli(*args: str) -> str:
    r = runner.invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def mixed_catalog(tmp_path_factory, tiny_sources):  # noqa: F811
    """Sources added through the CLI, a mixture built and recorded: (db, manifest path)."""
    tmp = tmp_path_factory.mktemp("mixcat")
    db = str(tmp / "cat.duckdb")
    for name, kind in [("caption-ocr", "caption"), ("caption-grounding", "caption"), ("interleaved", "interleaved"),
                       ("sft", "sft")]:
        _cli("source", "add", name, str(tiny_sources[name]), "--kind", kind, "--db", db)
    spec = write_spec(tmp / "spec.yaml", [{"name": "caption-ocr", "weight": 0.5}, {"name": "caption-grounding", "weight": 0.2},
                                          {"name": "interleaved", "weight": 0.2}, {"name": "sft", "weight": 0.1}],
                      name="mixed", seed=3, target={"samples": 1000})
    _cli("mix", "build", str(spec), "-o", str(tmp / "mixed.yaml"), "--db", db)
    return db, tmp / "mixed.yaml"


def _rows(sql: str, db) -> list[dict]:
    return run_query(sql, db).to_pylist()


def test_sources_are_registered_with_tokens(mixed_catalog, tiny_sources):  # noqa: F811
    db, _ = mixed_catalog
    rows = {r["source"]: r for r in _rows("SELECT * FROM v_source_tokens", db)}
    assert set(rows) == {"caption-ocr", "caption-grounding", "interleaved", "sft"}
    scanned = sum(scan_shard(t, "interleaved", TokenCounter()).tokens for t in sorted(tiny_sources["interleaved"].glob("*.tar")))
    assert rows["interleaved"]["tokens"] == scanned and rows["interleaved"]["samples"] == 48
    assert rows["sft"]["tokenizer"] == ESTIMATE_LABEL and rows["sft"]["token_count"] == "estimate"
    # images cost 128 vision tokens each: a caption sample is one image plus a short caption
    assert 128 < rows["caption-ocr"]["tokens_per_sample"] < 128 + 40


def test_mixture_views_answer(mixed_catalog):
    db, manifest = mixed_catalog
    weights = {r["source"]: r for r in _rows("SELECT * FROM v_mixture_weights WHERE mixture = 'mixed'", db)}
    assert weights["caption-ocr"]["target_weight"] == 0.5
    assert all(abs(r["weight_error"]) < 1e-3 for r in weights.values())
    assert weights["caption-ocr"]["epochs"] == pytest.approx(500 / 48, abs=1e-3)
    summary = _rows("SELECT * FROM v_mixture_summary", db)[0]
    assert (summary["mixture"], summary["samples"], summary["sources"]) == ("mixed", 1000, 4)
    assert Path(summary["manifest_path"]) == manifest.resolve()
    plan = {r["source"]: r for r in _rows("SELECT * FROM v_mixture_sources", db)}
    assert sum(r["planned_tokens"] for r in plan.values()) == summary["tokens"]
    assert sum(r["token_share"] for r in plan.values()) == pytest.approx(1, abs=1e-5)


def test_coverage_lengths_and_failures(mixed_catalog, tiny_sources):  # noqa: F811
    db, _ = mixed_catalog
    cov = {r["source"]: r for r in _rows("SELECT * FROM v_coverage", db)}
    with_text = 0
    for tar in sorted(tiny_sources["caption-ocr"].glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    with_text += bool(json.load(t.extractfile(m))["metadata"]["entries"])
    assert cov["caption-ocr"]["text_share"] == pytest.approx(with_text / 48, abs=1e-4)
    assert cov["caption-ocr"]["object_share"] == 0 and 0 < cov["caption-grounding"]["object_share"] < 1
    buckets = _rows("SELECT * FROM v_caption_lengths WHERE source = 'caption-ocr'", db)
    assert sum(b["n"] for b in buckets) == 48 and sum(b["share"] for b in buckets) == pytest.approx(1, abs=1e-3)
    q = _rows("SELECT * FROM v_caption_length_quantiles WHERE source = 'caption-ocr'", db)[0]
    assert q["min"] <= q["p10"] <= q["p50"] <= q["p90"] <= q["max"]
    ref = _rows("SELECT quantile_disc(caption_length, [0.1, 0.5, 0.9]) AS q FROM samples "
                "WHERE source = 'caption-ocr' AND status = 'success'", db)[0]["q"]
    assert [q["p10"], q["p50"], q["p90"]] == ref
    fails = _rows("SELECT * FROM v_failure_share ORDER BY source", db)
    assert [(f["source"], f["reason"], f["n"], f["inputs"]) for f in fails] == [
        ("caption-grounding", "too_large", 1, 49), ("caption-ocr", "decode", 2, 50)]


def test_mix_stats_command_and_sql(mixed_catalog):
    db, _ = mixed_catalog
    out = _cli("mix", "stats", "mixed", "--db", db, "--format", "csv")
    for title in ("weights, tokens and epochs per source", "OCR / grounding coverage", "failure reasons"):
        assert f"# {title}" in out
    assert '"caption-ocr","caption",0.5,0.5,' in out
    sql_out = _cli("sql", "SELECT source, epochs FROM v_mixture_weights ORDER BY source", "--db", db, "--format", "json")
    assert json.loads(sql_out.splitlines()[0]) == {"source": "caption-grounding", "epochs": pytest.approx(200 / 48, abs=1e-3)}
    r = runner.invoke(app, ["mix", "stats", "nope", "--db", db])
    assert isinstance(r.exception, UserError) and "no mixture 'nope'" in str(r.exception)


def test_mix_plot_and_sample_commands(mixed_catalog, tmp_path):
    db, manifest = mixed_catalog
    _cli("mix", "plot", "mixed", "-o", str(tmp_path / "mix.png"), "--db", db)
    img = Image.open(tmp_path / "mix.png")
    assert img.size[0] > 800 and len(set(img.convert("RGB").getdata())) > 50
    _cli("mix", "sample", str(manifest), "-n", "40", "--seed", "3", "--out", str(tmp_path / "s.jsonl"))
    lines = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(lines) == 40 and all({"source", "key", "kind", "epoch"} <= set(x) for x in lines)
    assert sum(x["source"] == "caption-ocr" for x in lines) == 20
    # the first N in loader order: the same samples, in the same order, as the loader yields them
    from blip3.mixture.loader import MixtureLoader

    want = MixtureLoader(manifest, seed=3).take(40)
    assert [x["index"] for x in lines] == list(range(40))
    assert [(x["source"], x["key"], x["epoch"], x["shard"]) for x in lines] == [
        (s["source"], s["key"], s["epoch"], s["shard"]) for s in want]
    assert [x["txt"] for x in lines] == [s["txt"] for s in want]


def test_source_add_is_idempotent_and_recounts_with_a_new_tokenizer(tmp_path, tiny_sources):  # noqa: F811
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(["open", "shop", "cafe", "exit", "sale", "."])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tok_dir)

    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        first = add_source(cat, "docs", tiny_sources["interleaved"], "interleaved", TokenCounter())
        again = add_source(cat, "docs", tiny_sources["interleaved"], "interleaved", TokenCounter())
        assert (again.added, again.tokens, again.samples) == (0, first.tokens, first.samples)
        assert cat.con.execute("SELECT count(*) FROM samples WHERE source = 'docs'").fetchone()[0] == 48
        hf = add_source(cat, "docs", tiny_sources["interleaved"], "interleaved", TokenCounter(tok_dir))
    assert hf.tokenizer == "hf:tok" and hf.tokens != first.tokens
    counter = TokenCounter(tok_dir)
    assert counter.text("open shop. sale") == 4
    expected = sum(scan_shard(t, "interleaved", counter).tokens for t in sorted(tiny_sources["interleaved"].glob("*.tar")))
    assert hf.tokens == expected
    spec = write_spec(tmp_path / "s.yaml", [{"name": "docs", "weight": 1}])
    with pytest.raises(UserError, match=r"sources\[0\]\.name: source 'docs' was counted with tokenizer hf:tok"):
        build_manifest(spec, db=db)
    assert build_manifest(spec, db=db, tokenizer=tok_dir).sources[0].tokens == expected


def _foreign_tar(path: Path, n: int) -> None:
    """An img2dataset-style tar (jpg/txt/json members, no sidecars of ours)."""
    with tarfile.open(path, "w") as t:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (10, 10), (i, 0, 0)).save(buf, format="JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", f"photo {i}".encode()),
                              ("json", json.dumps({"url": f"http://x/{i}", "width": 10, "height": 10}).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))


def test_foreign_webdataset_shards_become_a_source(tmp_path):
    (tmp_path / "wds").mkdir()
    _foreign_tar(tmp_path / "wds" / "00000.tar", 5)
    _foreign_tar(tmp_path / "wds" / "00001.tar", 3)
    (tmp_path / "wds" / "00000_stats.json").write_text(json.dumps({"count": 5, "successes": 5}))  # img2dataset's
    db = str(tmp_path / "c.duckdb")
    _cli("source", "add", "cc-mini", str(tmp_path / "wds" / "{00000..00001}.tar"), "--db", db)
    row = _rows("SELECT * FROM v_source_summary WHERE source = 'cc-mini'", db)[0]
    assert (row["shards"], row["samples"], row["ok"], row["mean_caption_chars"]) == (2, 8, 8, 7.0)
    taken = runner.invoke(app, ["source", "add", "x", str(tmp_path / "wds"), "--db", db])
    assert isinstance(taken.exception, UserError) and "already belongs to source 'cc-mini'" in str(taken.exception)
    (tmp_path / "other").mkdir()
    _foreign_tar(tmp_path / "other" / "a.tar", 2)
    bad = runner.invoke(app, ["source", "add", "x", str(tmp_path / "other"), "--kind", "sft", "--db", db])
    assert isinstance(bad.exception, UserError) and "json needs 'conversations'" in str(bad.exception)
    assert _rows("SELECT count(*) AS n FROM sources WHERE name = 'x'", db) == [{"n": 0}]


def test_wrong_kind_is_refused_before_anything_is_written(tmp_path, tiny_sources):  # noqa: F811
    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        with pytest.raises(UserError, match=r"00000\.tar: sample ocr0000000: json needs 'conversations'"):
            add_source(cat, "ocr", tiny_sources["caption-ocr"], "sft", TokenCounter())
        assert cat.con.execute("SELECT count(*) FROM sources").fetchone()[0] == 0
        assert cat.con.execute("SELECT count(*) FROM shards").fetchone()[0] == 0
        ok = add_source(cat, "ocr", tiny_sources["caption-ocr"], "caption", TokenCounter())
    assert (ok.kind, ok.shards, ok.samples) == ("caption", 2, 48)


def test_source_tiny_command_writes_every_kind(tmp_path):
    _cli("source", "tiny", str(tmp_path / "t"), "--shards", "1", "--per-shard", "3")
    for name in ("caption-ocr", "caption-grounding", "interleaved", "sft", "dpo"):
        assert (tmp_path / "t" / name / "00000.tar").is_file() and (tmp_path / "t" / name / "00000.parquet").is_file()


def test_failed_first_foreign_add_leaves_no_rows_of_earlier_shards(tmp_path):
    (tmp_path / "wds").mkdir()
    _foreign_tar(tmp_path / "wds" / "a.tar", 3)
    with tarfile.open(tmp_path / "wds" / "b.tar", "w") as t:  # a caption sample without an image
        info = tarfile.TarInfo("000000000.txt")
        info.size = 4
        t.addfile(info, io.BytesIO(b"text"))
    with Catalog(tmp_path / "c.duckdb") as cat:
        with pytest.raises(UserError, match=r"b\.tar: sample 000000000: a caption sample needs an image member"):
            add_source(cat, "x", tmp_path / "wds", "caption", TokenCounter())
        for table in ("sources", "shards", "samples"):
            assert cat.con.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table


def test_recorded_mixture_has_the_manifest_created_at(mixed_catalog):
    from datetime import datetime

    from blip3.mixture.manifest import load_manifest

    db, manifest_path = mixed_catalog
    created = _rows("SELECT created_at FROM mixtures WHERE name = 'mixed'", db)[0]["created_at"]
    assert created == datetime.fromisoformat(load_manifest(manifest_path, verify="none").created_at)


def test_source_add_hashes_only_foreign_shards_once(tmp_path, tiny_sources, monkeypatch):  # noqa: F811
    from blip3.core.shards import file_sha256
    from blip3.core.storage import Location

    hashed: list[str] = []
    real = Location.sha256

    def counting(self, name=""):
        hashed.append(self.child(name).name if name else self.name)
        return real(self, name)

    monkeypatch.setattr(Location, "sha256", counting)
    (tmp_path / "wds").mkdir()
    _foreign_tar(tmp_path / "wds" / "a.tar", 2)
    _foreign_tar(tmp_path / "wds" / "b.tar", 2)
    with Catalog(tmp_path / "c.duckdb") as cat:
        add_source(cat, "ours", tiny_sources["caption-ocr"], "caption", TokenCounter())
        assert hashed == []  # our shards: the sha256 their writer computed is trusted (hash once)
        hashed.clear()
        add_source(cat, "theirs", tmp_path / "wds", "caption", TokenCounter())
        assert sorted(hashed) == ["a.tar", "b.tar"]
    assert scan_shard(tmp_path / "wds" / "a.tar", "caption", TokenCounter(), checksum=True).sha256 == file_sha256(
        tmp_path / "wds" / "a.tar")
