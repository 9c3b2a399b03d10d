"""`blip3 curate` end to end on real shards, a real catalog and local Ray: a planted re-encoded
copy, a planted resized copy and a planted benchmark image are each found and flagged, and
`blip3 mix build` leaves them out (the loader never yields them; resume stays exact)."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from blip3.cli import app
from blip3.core.catalog import Catalog
from blip3.core.sql import run_query
from blip3.mixture.build import build_manifest
from blip3.mixture.loader import MixtureLoader
from tests.curate_fixtures import planted_sources
from tests.eval_fixtures import write_benchmarks

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]  # Ray end to end


@pytest.fixture(scope="module")
def curated(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("curate")
    bench = write_benchmarks(root / "eval-data")
    bench_image = (bench / "textvqa" / "train_images" / "val0001.jpg").read_bytes()  # TextVQA val question 1
    sources = planted_sources(root, bench_image)
    db = root / "catalog.duckdb"
    with Catalog(db) as cat:
        cat.add_output(sources["web"], source="web").check()
        cat.add_output(sources["more"], source="more").check()
    r = CliRunner().invoke(app, ["curate", "--db", str(db), "--eval-data", str(bench), "--work", str(root / "work")])
    assert r.exit_code == 0, r.output
    return {"root": root, "db": db, "output": r.output, "bench": bench}


def _decisions(db, rule: str) -> dict[str, tuple[bool, str | None, str | None]]:
    t = run_query(f"SELECT key, kept, reason, cluster FROM sample_decisions WHERE rule = '{rule}'", db)
    return {r["key"]: (r["kept"], r["reason"], r["cluster"]) for r in t.to_pylist()}


def test_the_three_plants_are_found_and_flagged(curated):
    db = curated["db"]
    exact = _decisions(db, "exact_dup")
    assert {k for k, (kept, _, _) in exact.items() if not kept} == {"copy"}
    assert exact["copy"][1].startswith("exact copy of w0003") and exact["w0003"][0]  # same size: earlier source kept
    assert exact["copy"][2] == exact["w0003"][2]  # one cluster, named by the sample kept
    near = _decisions(db, "near_dup")
    assert {k for k, (kept, _, _) in near.items() if not kept} == {"small"}
    assert near["w0005"][0] and "pHash within 4 bits" in near["small"][1]  # the larger one is kept
    decontam = _decisions(db, "decontam")
    assert {k for k, (kept, _, _) in decontam.items() if not kept} == {"bench"}
    assert "textvqa" in decontam["bench"][1] and "questions 1" in decontam["bench"][1]
    matches = run_query("SELECT key, task, question_ids, match FROM benchmark_matches", db).to_pylist()
    assert matches == [{"key": "bench", "task": "textvqa", "question_ids": ["1"], "match": "sha256"}]
    # every sample has one row per rule, and the views count them
    counts = {(r["source"], r["rule"]): (r["kept"], r["dropped"]) for r in
              run_query("SELECT * FROM v_curation WHERE rule IN ('exact_dup', 'decontam')", db).to_pylist()}
    assert counts == {("more", "decontam"): (6, 1), ("more", "exact_dup"): (6, 1),
                      ("web", "decontam"): (10, 0), ("web", "exact_dup"): (10, 0)}
    clusters = run_query("SELECT rule, size, key FROM v_duplicate_clusters", db).to_pylist()
    assert sorted((c["rule"], c["size"], c["key"]) for c in clusters) == [
        ("exact_dup", 2, "copy"), ("exact_dup", 2, "w0003"), ("near_dup", 2, "small"), ("near_dup", 2, "w0005")]
    assert "checked: " in curated["output"] and "textvqa" in curated["output"]


def test_a_rerun_replaces_its_rows(curated):
    db = curated["db"]
    before = run_query("SELECT count(*) AS n FROM sample_decisions", db).column("n")[0].as_py()
    scores = run_query("SELECT count(*) AS n FROM sample_scores", db).column("n")[0].as_py()
    r = CliRunner().invoke(app, ["curate", "--db", str(db), "--eval-data", str(curated["bench"]),
                                 "--work", str(curated["root"] / "work"), "--source", "more"])
    assert r.exit_code == 0, r.output
    assert run_query("SELECT count(*) AS n FROM sample_decisions", db).column("n")[0].as_py() == before
    assert run_query("SELECT count(*) AS n FROM sample_scores", db).column("n")[0].as_py() == scores


def _spec(path, curation=None, name="m"):
    spec = {"name": name, "seed": 3, "sources": [{"name": "web", "weight": 1}, {"name": "more", "weight": 1}]}
    if curation is not None:
        spec["curation"] = curation
    path.write_text(yaml.safe_dump(spec))
    return path


def _epoch_keys(manifest, source: str) -> list[str]:
    """Keys of one full pass over `source` as the loader serves it."""
    src = manifest.source(source)
    loader = MixtureLoader(manifest, decode=False, shuffle_buffer=4)
    seen = [s["key"] for s in loader.take(4 * (src.samples + 8)) if s["source"] == source]
    return seen[:src.samples]


def test_mix_build_leaves_them_out(curated, tmp_path):
    db = curated["db"]
    default = build_manifest(_spec(tmp_path / "d.yaml", name="default"), db=db, out=tmp_path / "d-manifest.yaml")
    assert default.source("more").samples == 6 and default.source("more").curation == {"decontam": 1}
    assert "bench" not in _epoch_keys(default, "more")

    spec = _spec(tmp_path / "s.yaml", {"exclude": ["exact_dup", "near_dup"]}, name="curated")
    m = build_manifest(spec, db=db, out=tmp_path / "manifest.yaml")
    assert m.curation["rules"] == ["decontam", "exact_dup", "near_dup"]
    assert m.source("more").curation == {"decontam": 1, "exact_dup": 1, "near_dup": 1}
    assert m.source("more").samples == 4 and m.source("web").samples == 10
    written = yaml.safe_load((tmp_path / "manifest.yaml").read_text())["sources"][1]["shards"]
    assert [(sh["path"].rsplit("/", 1)[1], sh["samples"], sh.get("exclude")) for sh in written] == [
        ("00000.tar", 3, None), ("00001.tar", 1, ["copy", "small"])]  # 00002.tar held only `bench`
    keys = _epoch_keys(m, "more")
    assert sorted(keys) == ["m0000", "m0001", "m0002", "m0003"]  # every kept sample once per epoch, no plant

    # resume is exact over the kept samples only
    loader = MixtureLoader(tmp_path / "manifest.yaml", decode=False, shuffle_buffer=4)
    first = [s["key"] for s in loader.take(7)]
    state = json.loads(json.dumps(loader.state_dict()))
    rest = [s["key"] for s in loader.take(9)]
    again = MixtureLoader(tmp_path / "manifest.yaml", decode=False, shuffle_buffer=4)
    again.load_state_dict(state)
    assert [s["key"] for s in again.take(9)] == rest and not {"copy", "small", "bench"} & set(first + rest)

    r = CliRunner().invoke(app, ["mix", "stats", "curated", "--db", str(db), "--format", "csv"])
    assert r.exit_code == 0, r.output
    assert '"more","near_dup",1,' in r.output and '"more","decontam",1,' in r.output

    keep_all = build_manifest(_spec(tmp_path / "k.yaml", {"keep_all": True}, name="all"), db=db)
    assert keep_all.source("more").samples == 7 and keep_all.curation is None


def test_score_threshold_rules_and_missing_rules(curated, tmp_path, caplog):
    db = curated["db"]
    m = build_manifest(_spec(tmp_path / "c.yaml", {"exclude": ["caption_words_below_7"], "keep_all": True}), db=db)
    # captions of 6 words or fewer: "a small boat..." has 8, "the same picture stored again" 5, ...
    short = run_query("SELECT source, count(*) AS n FROM sample_scores WHERE name = 'caption_words' AND value < 7 "
                      "GROUP BY source", db).to_pylist()
    assert {s.name: (s.curation or {}).get("caption_words_below_7", 0) for s in m.sources} == \
        {**{"web": 0, "more": 0}, **{r["source"]: r["n"] for r in short}}
    from blip3.core.errors import UserError

    with pytest.raises(UserError, match=r"curation.exclude\[0\]: no source of the mixture has decisions of rule 'sem_dup'"):
        build_manifest(_spec(tmp_path / "x.yaml", {"exclude": ["sem_dup"]}), db=db)
    with pytest.raises(UserError, match="no source of the mixture has scores of rule 'clip_below_0.28'"):
        build_manifest(_spec(tmp_path / "y.yaml", {"exclude": ["clip_below_0.28"]}), db=db)
    # a rule decided for some sources only: applied there, the others named in a warning
    from tests.curate_fixtures import encode, picture, write_source

    write_source(curated["root"] / "late", [("l0", encode(picture(3)), "a late copy of w0003")])
    with Catalog(db) as cat:
        cat.add_output(curated["root"] / "late", source="late").check()
    spec = {"name": "late", "sources": [{"name": "more", "weight": 1}, {"name": "late", "weight": 1}],
            "curation": {"exclude": ["exact_dup"]}}
    (tmp_path / "late.yaml").write_text(yaml.safe_dump(spec))
    import logging

    logging.getLogger("blip3").addHandler(caplog.handler)  # blip3's loggers do not propagate to the root
    try:
        m = build_manifest(tmp_path / "late.yaml", db=db)
    finally:
        logging.getLogger("blip3").removeHandler(caplog.handler)
    assert m.source("late").curation is None and m.source("late").samples == 1
    assert m.source("more").curation == {"decontam": 1, "exact_dup": 1}
    assert "curation rule 'exact_dup' was not decided for source 'late'" in caplog.text
    with pytest.raises(UserError, match=r"curation.exclude\[0\]: unknown rule 'nearest'"):
        build_manifest(_spec(tmp_path / "z.yaml", {"exclude": ["nearest"]}), db=db)


def test_audit_shows_clusters_side_by_side_and_drops_with_reason(curated, tmp_path):
    import re

    from blip3.datagen.audit import write_audit

    root = curated["root"]
    r = write_audit(f"{root}/{{web,more}}/*.tar", tmp_path / "audit", n=4, db=curated["db"])
    page = r.html.read_text()
    clusters = re.findall(r'<div class="cluster">(.*?)</div>', page, re.S)
    exact = next(c for c in clusters if c.startswith("<h3>exact_dup"))
    assert exact.index("<b>w0003</b>") < exact.index("<b>copy</b>")  # the kept one first, side by side
    assert 'class="dropped"' in exact and "exact copy of w0003" in exact
    assert any("<b>small</b>" in c and "<b>w0005</b>" in c for c in clusters if c.startswith("<h3>near_dup"))
    drops = page.split('<div class="drops">', 1)[1]
    assert re.search(r"<b>bench</b>.*?decontam: in textvqa image val0001\.jpg \(questions 1; sha256\)", drops, re.S)
    assert (tmp_path / "audit" / "scores.png").stat().st_size > 1000 and "scores.png" in page
    shown = re.findall(r'<img src="(curation/[^"]+)"', page)
    assert shown and all((tmp_path / "audit" / s).is_file() for s in shown)
