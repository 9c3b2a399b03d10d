"""Specs and manifests: round trip, the plan, clear errors for malformed input, shipped files."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from blip3.core.catalog import Catalog
from blip3.core.errors import UserError
from blip3.mixture.build import build_manifest, validate_spec
from blip3.mixture.loader import MixtureLoader
from blip3.mixture.manifest import load_manifest, manifest_from_dict, write_manifest
from blip3.mixture.sources import add_source
from blip3.mixture.tiny_sources import TINY_KINDS
from blip3.mixture.tokens import TokenCounter
from tests.mixture_fixtures import copy_sources, inline, tiny_catalog, tiny_sources, write_spec  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def test_manifest_round_trip(tmp_path, tiny_sources):  # noqa: F811
    spec = write_spec(tmp_path / "spec.yaml", inline(tiny_sources, {"caption-ocr": 3, "interleaved": 1}), seed=5)
    built = build_manifest(spec, out=tmp_path / "m.yaml")
    loaded = load_manifest(tmp_path / "m.yaml", verify="sha256")
    assert loaded == built
    write_manifest(loaded, tmp_path / "again.yaml")
    assert yaml.safe_load((tmp_path / "again.yaml").read_text()) == yaml.safe_load((tmp_path / "m.yaml").read_text())


def test_plan_by_samples_default_target_is_one_pass_of_the_heaviest(tiny_sources):  # noqa: F811
    m = build_manifest({"name": "p", "sources": inline(tiny_sources, {"caption-ocr": 3, "interleaved": 1})})
    ocr, doc = m.sources
    assert (ocr.weight, doc.weight) == (0.75, 0.25)
    assert ocr.target_samples == ocr.samples == 48 and ocr.epochs == 1.0
    assert doc.target_samples == 16 and doc.epochs == pytest.approx(16 / 48, abs=1e-6)
    assert m.target == {"samples": 64, "tokens": ocr.target_tokens + doc.target_tokens}
    assert sum(sh.samples for sh in ocr.shards) == 48 and all(len(sh.sha256) == 64 for sh in ocr.shards)


def test_plan_by_tokens_matches_token_shares(tiny_sources):  # noqa: F811
    m = build_manifest({"name": "p", "weight_by": "tokens", "target": {"tokens": 200_000},
                        "sources": inline(tiny_sources, {"caption-ocr": 1, "interleaved": 1})})
    ocr, doc = m.sources
    assert ocr.tokens / ocr.samples < doc.tokens / doc.samples  # documents are longer...
    assert ocr.sample_weight > doc.sample_weight  # ...so fewer of them are drawn
    share = ocr.target_tokens / (ocr.target_tokens + doc.target_tokens)
    assert share == pytest.approx(0.5, abs=0.002)
    assert m.target["tokens"] == pytest.approx(200_000, rel=0.01)


@pytest.mark.parametrize("bad,field", [
    ({"weight": 0}, "sources[1].weight"),
    ({"weight": -1}, "sources[1].weight"),
    ({"weight": "lots"}, "sources[1].weight"),
    ({"kind": "video"}, "sources[1].kind"),
    ({"path": ""}, "sources[1].path"),
])
def test_malformed_source_entry_names_field_and_file(tmp_path, tiny_sources, bad, field):  # noqa: F811
    entries = inline(tiny_sources, {"caption-ocr": 1, "sft": 1})
    entries[1].update(bad)
    spec = write_spec(tmp_path / "bad.yaml", entries)
    with pytest.raises(UserError) as e:
        build_manifest(spec)
    assert str(e.value).startswith(f"{spec}: {field}: ")
    assert "\n" not in str(e.value)


def test_malformed_top_level_fields(tmp_path):
    for data, field in [({"name": "x", "sources": []}, "sources"), ({"name": "a b", "sources": [{}]}, "name"),
                        ({"name": "x", "seed": -2, "sources": [{}]}, "seed"),
                        ({"name": "x", "target": {"epochs": 3}, "sources": [{}]}, "target"),
                        ({"name": "x", "weight_by": "bytes", "sources": [{}]}, "weight_by")]:
        with pytest.raises(UserError, match=rf"^spec.yaml: {field}: "):
            validate_spec(data, "spec.yaml")


def test_unknown_source_is_named(tmp_path, tiny_catalog):  # noqa: F811
    spec = write_spec(tmp_path / "s.yaml", [{"name": "caption-ocr", "weight": 1}, {"name": "laion-9b", "weight": 1}])
    with pytest.raises(UserError, match=r"s\.yaml: sources\[1\]\.name: unknown source 'laion-9b'.*caption-ocr"):
        build_manifest(spec, db=tiny_catalog, record=False)


def test_unknown_source_without_a_catalog(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BLIP3_DB", raising=False)
    spec = write_spec(tmp_path / "s.yaml", [{"name": "cc3m", "weight": 1}])
    with pytest.raises(UserError, match=r"sources\[0\]\.name: source 'cc3m' has no path and there is no catalog"):
        build_manifest(spec)


def test_build_refuses_sources_counted_with_other_vision_tokens_per_image(tmp_path, tiny_catalog):  # noqa: F811
    spec = write_spec(tmp_path / "s.yaml", [{"name": "caption-ocr", "weight": 1}])
    with pytest.raises(UserError, match=r"sources\[0\]\.name: source 'caption-ocr' was counted with 128 vision tokens "
                                        r"per image, this build uses 256"):
        build_manifest(spec, db=tiny_catalog, crops_per_image=2, record=False)
    assert build_manifest(spec, db=tiny_catalog, record=False).vision_tokens_per_image == 128


@pytest.fixture()
def private_catalog(tmp_path, tiny_sources):  # noqa: F811
    """A catalog over a private copy of two tiny sources, so the test may move or corrupt shards."""
    folders = copy_sources({k: tiny_sources[k] for k in ("caption-ocr", "sft")}, tmp_path / "data")
    db = tmp_path / "cat.duckdb"
    with Catalog(db) as cat:
        for name, folder in folders.items():
            add_source(cat, name, folder, TINY_KINDS[name], TokenCounter())
    spec = write_spec(tmp_path / "s.yaml", [{"name": "caption-ocr", "weight": 1}, {"name": "sft", "weight": 1}])
    return db, folders, spec


def test_moved_shard_is_a_clear_error(private_catalog):
    db, folders, spec = private_catalog
    shutil.move(folders["sft"] / "00001.tar", folders["sft"].parent / "elsewhere.tar")
    with pytest.raises(UserError, match=r"s\.yaml: sources\[1\]\.name: source 'sft': shard .*00001\.tar is missing"):
        build_manifest(spec, db=db)


def test_changed_shard_is_caught_by_checksum(private_catalog):
    db, folders, spec = private_catalog
    tar = folders["caption-ocr"] / "00000.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # same size, different bytes
    tar.write_bytes(bytes(data))
    build_manifest(spec, db=db)  # same size: the sha256 its writer recorded is trusted (hash once) ...
    with pytest.raises(UserError, match=r"sources\[0\]\.name: source 'caption-ocr': shard .*00000\.tar changed"):
        build_manifest(spec, db=db, verify="sha256")  # ... unless a re-read is asked for


def test_manifest_detects_moved_and_changed_shards_before_reading(tmp_path, tiny_sources):  # noqa: F811
    folders = copy_sources({"dpo": tiny_sources["dpo"]}, tmp_path / "data")
    m_path = tmp_path / "m.yaml"
    build_manifest({"name": "m", "sources": inline(folders, {"dpo": 1})}, out=m_path)
    tar = folders["dpo"] / "00001.tar"
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF
    tar.write_bytes(bytes(data))
    load_manifest(m_path)  # size unchanged: the cheap check passes ...
    with pytest.raises(UserError, match=r"m\.yaml: sources\[0\]\.shards\[1\]\.sha256: shard .* changed"):
        MixtureLoader(m_path, verify="sha256")  # ... the loader hashes when asked (its default trusts the stats)
    tar.unlink()
    with pytest.raises(UserError, match=r"m\.yaml: sources\[0\]\.shards\[1\]\.path: shard .* is missing"):
        load_manifest(m_path)


def test_malformed_manifest_fields(tmp_path, tiny_sources):  # noqa: F811
    m = build_manifest({"name": "m", "sources": inline(tiny_sources, {"sft": 1})}).to_dict()
    m["sources"][0]["weight"] = 0
    with pytest.raises(UserError, match=r"^x\.yaml: sources\[0\]\.weight: must be > 0"):
        manifest_from_dict(m, file="x.yaml")
    m["sources"][0]["weight"] = 1
    m["sources"][0]["samples"] += 1
    with pytest.raises(UserError, match=r"sources\[0\]\.samples: .* does not match"):
        manifest_from_dict(m, file="x.yaml")
    spec_like = {"name": "m", "sources": [{"name": "a", "weight": 1}]}
    with pytest.raises(UserError, match="manifest_version: .*mixture spec"):
        manifest_from_dict(spec_like, file="x.yaml")


def test_every_shipped_spec_validates():
    files = sorted(REPO.glob("manifests/*.yaml"))
    assert {"xgenmm-stage1.yaml", "tiny-mix.yaml"} <= {f.name for f in files}
    for f in files:
        validate_spec(yaml.safe_load(f.read_text()), str(f))


def test_shipped_tiny_mixtures_build_and_run(tmp_path, tiny_sources, monkeypatch):  # noqa: F811
    monkeypatch.setenv("BLIP3_TINY_SOURCES", str(next(iter(tiny_sources.values())).parent))
    for spec in ("tiny-mix.yaml", "tiny-tokens.yaml"):
        m = build_manifest(REPO / "manifests" / spec, out=tmp_path / spec)
        samples = MixtureLoader(tmp_path / spec).take(50)
        assert {s["source"] for s in samples} == {s.name for s in m.sources}


def test_xgenmm_stage1_spec_builds_over_catalogued_sources(tmp_path, tiny_sources):  # noqa: F811
    spec_path = REPO / "manifests" / "xgenmm-stage1.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    stand_in = {"mint1t": "interleaved", "obelics": "interleaved", "blip3-ocr": "caption-ocr",
                "blip3-grounding": "caption-grounding"}
    db = tmp_path / "cat.duckdb"
    with Catalog(db) as cat:
        for s in spec["sources"]:
            tiny = next((v for k, v in stand_in.items() if s["name"].startswith(k)), "caption-grounding")
            folder = shutil.copytree(tiny_sources[tiny], tmp_path / s["name"])  # a shard belongs to one source
            add_source(cat, s["name"], folder, TINY_KINDS[tiny], TokenCounter())
    m = build_manifest(spec_path, db=db, out=tmp_path / "stage1.yaml")
    w = {s.name: s.weight for s in m.sources}
    assert w["mint1t-html"] + w["mint1t-pdf"] + w["mint1t-arxiv"] == pytest.approx(0.325)
    assert w["mint1t-html"] / w["mint1t-arxiv"] == pytest.approx(7) and w["blip3-kale"] == pytest.approx(0.25)
    assert w["vg"] == pytest.approx(0.0125) and sum(w.values()) == pytest.approx(1)
    assert m.target["tokens"] == pytest.approx(1e11, rel=1e-3)
    assert m.source("vg").epochs > 1000  # tiny stand-ins: the plan says how often each repeats


def test_cli_prints_one_line_naming_field_and_file(tmp_path):
    import subprocess
    import sys

    (tmp_path / "empty").mkdir()
    cases = [
        ([{"name": "a", "path": str(tmp_path / "empty"), "kind": "caption", "weight": 1}],
         r"sources\[0\]\.path: source 'a': .*no \.tar shards found"),
        ([{"name": "a", "path": "x", "kind": "caption", "weight": 0}], r"sources\[0\]\.weight: must be a number > 0"),
    ]
    blip3 = Path(sys.executable).with_name("blip3")
    for entries, message in cases:
        spec = write_spec(tmp_path / "bad.yaml", entries)
        r = subprocess.run([str(blip3), "mix", "build", str(spec), "-o", str(tmp_path / "m.yaml"),
                            "--db", str(tmp_path / "c.duckdb")], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {spec}: "), r.stderr
        assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "m.yaml").exists()


def test_size_only_verification_skips_hashing_but_still_catches_moves(private_catalog):
    db, folders, spec = private_catalog
    tar = folders["caption-ocr"] / "00000.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    m = build_manifest(spec, db=db, verify="size", record=False)  # same size: not noticed here ...
    with pytest.raises(UserError, match="sha256 differs"):
        MixtureLoader(m, verify="sha256")  # ... but the loader hashes when asked
    tar.unlink()
    with pytest.raises(UserError, match="is missing"):
        build_manifest(spec, db=db, verify="size")


def test_inline_folder_uses_only_finished_shards(tmp_path, tiny_sources):  # noqa: F811
    folders = copy_sources({"sft": tiny_sources["sft"]}, tmp_path / "data")
    (folders["sft"] / "00001_stats.json").unlink()  # as if killed between the tar and its stats
    m = build_manifest({"name": "m", "sources": inline(folders, {"sft": 1})})
    assert [Path(sh.path).name for sh in m.sources[0].shards] == ["00000.tar"] and m.sources[0].samples == 24


def test_a_shard_listed_twice_is_refused_not_served_twice(tmp_path, tiny_sources):  # noqa: F811
    """A duplicated shard would be served twice per epoch (its weight silently doubled): refused in a
    manifest, across two sources of a spec, and in a Manifest built in code; a pattern naming one tar
    twice names it once."""
    built = build_manifest({"name": "m", "sources": inline(tiny_sources, {"sft": 1})})
    d = built.to_dict()
    src = d["sources"][0]
    src["shards"].append(dict(src["shards"][0]))
    src["samples"] += src["shards"][0]["samples"]
    m_path = tmp_path / "m.yaml"
    m_path.write_text(yaml.safe_dump(d, sort_keys=False))
    with pytest.raises(UserError, match=r"sources\[0\]\.shards\[2\]\.path: shard .* is listed twice in source 'sft' "
                                        r"\(also sources\[0\]\.shards\[0\]\)"):
        load_manifest(m_path)
    built.sources[0].shards.append(built.sources[0].shards[0])
    with pytest.raises(UserError, match="listed twice"):
        MixtureLoader(built)
    twice = inline(tiny_sources, {"sft": 1}) + [dict(inline(tiny_sources, {"sft": 1})[0], name="sft-again")]
    with pytest.raises(UserError, match=r"spec\.yaml: sources\[1\]: shard .* listed twice in sources 'sft' and "
                                        r"'sft-again'"):
        build_manifest(write_spec(tmp_path / "spec.yaml", twice))
    folder = tiny_sources["sft"]
    overlap = [{"name": "sft", "kind": "sft", "weight": 1, "path": f"{{{folder}/00000.tar,{folder}/*.tar}}"}]
    m = build_manifest({"name": "o", "sources": overlap})
    assert len(m.sources[0].shards) == 2 and m.sources[0].samples == 48
