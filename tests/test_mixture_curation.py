"""Mixtures leave out what curation dropped (no Ray: decisions are registered the way `blip3
curate` registers them, through core.curation): the manifest's per-shard exclusions, the loader
serving each kept sample once per epoch, exact resume over kept samples, and the spec's checks."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import yaml

from blip3.core.catalog import Catalog
from blip3.core.curation import replace_rows
from blip3.core.errors import UserError
from blip3.mixture.build import build_manifest
from blip3.mixture.loader import MixtureLoader
from blip3.mixture.manifest import load_manifest
from tests.core_fixtures import write_caption_shard


@pytest.fixture()
def catalog(tmp_path):
    db = tmp_path / "c.duckdb"
    keys = write_caption_shard(tmp_path / "src", 0, 6) + write_caption_shard(tmp_path / "src", 1, 6)
    with Catalog(db) as cat:
        cat.add_output(tmp_path / "src", source="src").check()
        shards = [r.path for r in cat.source_shards("src")]
        drop = {"s000_0001": ("near_dup", "near copy of s000_0000"), "s001_0004": ("decontam", "in textvqa image x")}
        rows = {"source": [], "shard": [], "key": [], "rule": [], "kept": [], "reason": [], "cluster": []}
        for rule in ("near_dup", "decontam"):
            for key in keys:
                shard = shards[0] if key.startswith("s000") else shards[1]
                dropped = drop.get(key, (None,))[0] == rule
                for c, v in (("source", "src"), ("shard", shard), ("key", key), ("rule", rule), ("kept", not dropped),
                             ("reason", drop[key][1] if dropped else None), ("cluster", None)):
                    rows[c].append(v)
        replace_rows(cat.con, "sample_decisions", pa.table(rows), shards, ["near_dup", "decontam"])
        replace_rows(cat.con, "sample_scores", pa.table({
            "source": ["src"] * 12, "shard": [shards[0]] * 6 + [shards[1]] * 6, "key": keys,
            "name": ["clip"] * 12, "value": [0.1 * i for i in range(12)], "generator": ["test"] * 12}), shards, ["clip"])
    return db, tmp_path


def _build(db, tmp_path, curation=None, name="m"):
    spec = {"name": name, "seed": 1, "sources": [{"name": "src", "weight": 1}]}
    if curation is not None:
        spec["curation"] = curation
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return build_manifest(tmp_path / f"{name}.yaml", db=db, out=tmp_path / f"{name}-manifest.yaml")


def _all_keys():
    return [f"s{i:03d}_{j:04d}" for i in range(2) for j in range(6)]


def _take(path, n):
    return [s["key"] for s in MixtureLoader(path, decode=False, shuffle_buffer=3).take(n)]


def test_default_leaves_decontaminated_samples_out(catalog):
    db, tmp = catalog
    m = _build(db, tmp)
    assert m.source("src").samples == 11 and m.source("src").curation == {"decontam": 1}
    assert m.curation == {"rules": ["decontam"], "exclude": [], "keep_all": False}
    keys = _take(tmp / "m-manifest.yaml", 22)
    assert len(set(keys[:9])) == 9  # whole shuffle blocks of the first epoch: no sample twice
    assert set(keys) == {k for k in _all_keys() if k != "s001_0004"}


def test_listed_rules_and_score_thresholds(catalog):
    db, tmp = catalog
    m = _build(db, tmp, {"exclude": ["near_dup", "clip_below_0.25"]})
    # clip < 0.25: s000_0000..0002 (0.0, 0.1, 0.2); near_dup: s000_0001 (counted under both rules)
    assert m.source("src").curation == {"decontam": 1, "near_dup": 1, "clip_below_0.25": 3}
    assert m.source("src").samples == 8
    reloaded = load_manifest(tmp / "m-manifest.yaml")
    assert [sh.exclude for sh in reloaded.source("src").shards] == [["s000_0000", "s000_0001", "s000_0002"],
                                                                    ["s001_0004"]]
    assert [sh.samples for sh in reloaded.source("src").shards] == [3, 5]
    keys = _take(tmp / "m-manifest.yaml", 16)
    assert len(set(keys[:6])) == 6  # whole shuffle blocks of the first epoch: no sample twice
    assert set(keys) == {"s000_0003", "s000_0004", "s000_0005", "s001_0000", "s001_0001", "s001_0002",
                         "s001_0003", "s001_0005"}


def test_resume_is_exact_over_kept_samples(catalog):
    db, tmp = catalog
    _build(db, tmp, {"exclude": ["near_dup"]})
    path = tmp / "m-manifest.yaml"
    whole = _take(path, 25)
    loader = MixtureLoader(path, decode=False, shuffle_buffer=3)
    first = [s["key"] for s in loader.take(9)]
    state = json.loads(json.dumps(loader.state_dict()))
    again = MixtureLoader(path, decode=False, shuffle_buffer=3)
    again.load_state_dict(state)
    assert first + [s["key"] for s in again.take(16)] == whole
    assert len(set(whole[:9])) == 9  # whole shuffle blocks of the first epoch: no sample twice


def test_keep_all_and_bad_specs(catalog):
    db, tmp = catalog
    assert _build(db, tmp, {"keep_all": True}).source("src").samples == 12
    assert _build(db, tmp, {"keep_all": True, "exclude": ["near_dup"]}).source("src").curation == {"near_dup": 1}
    for bad, match in (({"exclude": "near_dup"}, "curation.exclude: must be a list"),
                       ({"exclude": ["clip_under_3"]}, r"curation.exclude\[0\]: unknown rule"),
                       ({"keep_all": "yes"}, "curation.keep_all: must be true or false"),
                       ({"drop": []}, "curation.drop: unknown field"),
                       ({"exclude": ["sem_dup"]}, "no source of the mixture has decisions of rule 'sem_dup'"),
                       ({"exclude": ["blur_below_9"]}, "no source of the mixture has scores of rule 'blur_below_9'")):
        with pytest.raises(UserError, match=match):
            _build(db, tmp, bad)


def test_loader_refuses_exclusions_the_shard_does_not_hold(catalog):
    db, tmp = catalog
    _build(db, tmp, {"exclude": ["near_dup"]})
    path = tmp / "m-manifest.yaml"
    data = yaml.safe_load(path.read_text())
    data["sources"][0]["shards"][0]["exclude"] = ["s000_0001", "nope"]
    data["sources"][0]["shards"][0]["samples"] = 4
    data["sources"][0]["samples"] = 9
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match="leaves out 1 key"):
        MixtureLoader(path, decode=False, shuffle_buffer=1).take(20)
    data["sources"][0]["shards"][0]["exclude"] = ["s000_0001", "s000_0001"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match=r"shards\[0\].exclude: lists a key twice"):
        load_manifest(path)


def test_re_registering_a_changed_shard_drops_its_curation_rows(catalog):
    from tests.core_fixtures import write_caption_shard

    db, tmp = catalog
    write_caption_shard(tmp / "src", 1, 4, prefix="n")  # shard 1 rewritten with other samples
    with Catalog(db) as cat:
        cat.add_output(tmp / "src", source="src", refresh=True).check()
        left = cat.con.execute("SELECT rule, count(*) FROM sample_decisions GROUP BY rule ORDER BY rule").fetchall()
    assert left == [("decontam", 6), ("near_dup", 6)]  # shard 0's rows only
    assert _build(db, tmp).source("src").samples == 10  # shard 0 (6) + the new shard 1 (4); nothing stale left out
