"""The curation building blocks: pHash against the `imagehash` package, the LSH search against all
pairs, the keep rule, the filters' scores, and the catalog's per-shard replacement."""

from __future__ import annotations

import itertools

import duckdb
import imagehash
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from blip3.core.catalog import Catalog
from blip3.core.curation import replace_rows
from blip3.datagen.curate_rules import parse_thresholds, score_rule
from blip3.datagen.curate_stages import ImageStage, TextStage, laplacian_variance, repetition_ratio
from blip3.datagen.dedup import cluster_decisions, components, exact_duplicates, near_duplicates
from blip3.datagen.image_hash import phash, pixel_sha256
from blip3.datagen.lsh import near_pairs, plan
from tests.curate_fixtures import encode, picture


def _images() -> list[Image.Image]:
    """Pictures where the two could differ: smooth and noisy, odd sizes, grey, RGBA, palette,
    tiny, wide, EXIF-free re-encodes."""
    rng = np.random.default_rng(7)
    out = [picture(i, (int(rng.integers(20, 400)), int(rng.integers(20, 400)))) for i in range(30)]
    out += [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((9, 13), (300, 17), (64, 64))]
    out += [picture(50).convert("L"), picture(51).convert("RGBA"), picture(52).convert("P"),
            Image.linear_gradient("L").resize((77, 33)), picture(53, (1000, 40))]
    return out


def test_phash_is_imagehash_phash():
    for img in _images():
        assert phash(img) == int(str(imagehash.phash(img)), 16), img


def test_pixel_hash_sees_through_the_container_only():
    img = Image.open(__import__("io").BytesIO(encode(picture(1))))
    png = Image.open(__import__("io").BytesIO(encode(img, "PNG")))
    assert pixel_sha256(img) == pixel_sha256(png)
    assert pixel_sha256(img) != pixel_sha256(img.resize((95, 72)))


def _flip(h: int, bits) -> int:
    for b in bits:
        h ^= 1 << int(b)
    return h


def test_lsh_finds_what_all_pairs_find():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2**63, 400, dtype=np.uint64) * np.uint64(2)
    hashes = [int(h) for h in base]
    for i in range(0, 400, 4):  # planted neighbours at distance 0..6
        hashes.append(_flip(hashes[i], rng.choice(64, size=i % 7, replace=False)))
    h = np.asarray(hashes, dtype=np.uint64)
    for k in (2, 4, 6):
        truth = {(i, j) for i, j in itertools.combinations(range(len(h)), 2) if bin(int(h[i]) ^ int(h[j])).count("1") <= k}
        found = {tuple(p) for p in near_pairs(h, k, recall=0.999).tolist()}
        assert found <= truth  # candidates are checked exactly
        assert len(found) >= 0.98 * len(truth) and len(truth) > 40


def test_lsh_plan_meets_its_recall():
    for n, k in ((1000, 2), (10**7, 4), (10**5, 8)):
        p = plan(n, k)
        assert p.recall >= 0.99 and 1 - (1 - p.collision(k)) ** p.bands == p.recall
        assert p.collision(k - 1) > p.collision(k)


def _hash_table(rows):
    cols = ["source", "shard", "key", "sha256", "pixel_sha256", "phash", "width", "height", "source_rank"]
    return pa.table({c: [r[i] for r in rows] for i, c in enumerate(cols)},
                    schema=pa.schema([(c, pa.uint64() if c == "phash" else pa.int64() if c in
                                       ("width", "height", "source_rank") else pa.string()) for c in cols]))


def test_keep_rule_highest_resolution_then_earliest_source():
    t = _hash_table([
        ("b", "s2", "k1", "x", "p1", 1, 100, 100, 2),
        ("a", "s1", "k2", "y", "p1", 1, 100, 100, 1),  # same size, earlier source: kept
        ("c", "s3", "k3", "z", "p2", 1, 50, 50, 0),
        ("c", "s3", "k4", "z", "p3", 2, 10, 10, 0),  # same bytes as k3, smaller
        ("c", "s3", "k5", None, None, None, 10, 10, 0),  # no image: alone
    ])
    rows, kept = exact_duplicates(t)
    assert kept.tolist() == [False, True, True, False, True]
    d = rows.to_pylist()
    assert d[0]["cluster"] == d[1]["cluster"] == "s1#k2" and d[0]["reason"] == "exact copy of k2 (s1)"
    assert d[2]["reason"].startswith("kept: highest resolution") and d[4]["cluster"] is None
    near = near_duplicates(t.filter(pa.array(kept)), 1).to_pylist()  # pHash 1 (k2, k3): one cluster; k3 is smaller
    assert [(r["key"], r["kept"]) for r in near] == [("k2", True), ("k3", False), ("k5", True)]


def test_components_join_chains():
    assert components(5, np.array([[0, 1], [1, 2]])).tolist()[:3] == [0, 0, 0]
    labels = components(4, np.zeros((0, 2), dtype=np.int64))
    rows, kept = cluster_decisions(_hash_table([("a", "s", f"k{i}", None, None, None, 1, 1, 0) for i in range(4)]),
                                   labels, "near_dup", "x")
    assert kept.all() and rows.column("cluster").null_count == 4


def test_image_stage_scores_and_records_undecodable_images():
    sharp = picture(4, (600, 200))
    batch = {"key": ["a", "b", "c"], "image": [encode(sharp), encode(sharp.filter(__import__("PIL.ImageFilter").ImageFilter.GaussianBlur(6))), b"not an image"]}
    out = ImageStage()(batch)
    assert out["score.width"][0] == 600 and out["score.min_side"][0] == 200 and out["score.aspect"][0] == 3.0
    assert out["score.blur"][1] < out["score.blur"][0] / 4
    assert out["image_error"][2].startswith("image does not decode") and np.isnan(out["score.width"][2])
    assert out["has_phash"].tolist() == [True, True, False]


def test_laplacian_is_opencvs():
    import cv2

    grey = np.asarray(picture(9, (120, 80)).convert("L"))
    ours = laplacian_variance(grey)
    ref = cv2.Laplacian(grey.astype(np.float64), cv2.CV_64F, ksize=1)[1:-1, 1:-1].var()
    assert ours == pytest.approx(ref, rel=1e-9)


def test_text_scores():
    out = TextStage()({"key": ["a", "b", "c"], "caption": ["A dog runs across a wide green field.",
                                                           "Le chat dort sur le canapé du salon, près de la fenêtre.",
                                                           "buy now " * 20]})
    assert out["score.caption_words"].tolist() == [8, 12, 40]
    assert out["lang"].tolist()[:2] == ["en", "fr"] and out["score.lang_score"][1] > 0.9
    assert out["score.repetition"][2] > 0.9 and out["score.repetition"][0] == 0
    assert repetition_ratio("") == 0.0


def test_rule_options():
    assert parse_thresholds(["min_side=384", "blur=off"]) == {"min_side": 384.0, "blur": None}
    assert score_rule("clip_below_0.28") == ("clip", "below", 0.28)
    assert score_rule("caption_words_above_40") == ("caption_words", "above", 40.0)
    assert score_rule("near_dup") is None
    from blip3.core.errors import UserError

    for bad in ("min_side", "nope=3", "clip=x", "clip=inf"):
        with pytest.raises(UserError, match="--threshold"):
            parse_thresholds([bad])


def test_replace_rows_replaces_per_shard_and_rule(tmp_path):
    with Catalog(tmp_path / "c.duckdb") as cat:
        def rows(shard, rule, n, kept=True):
            return pa.table({"source": ["s"] * n, "shard": [shard] * n, "key": [f"k{i}" for i in range(n)],
                             "rule": [rule] * n, "kept": [kept] * n, "reason": [None] * n, "cluster": [None] * n})
        replace_rows(cat.con, "sample_decisions", pa.concat_tables([rows("a", "blur", 3), rows("b", "blur", 2),
                                                                   rows("a", "clip", 3)]), ["a", "b"], ["blur", "clip"])
        replace_rows(cat.con, "sample_decisions", rows("a", "blur", 3, kept=False), ["a"], ["blur"])
        got = cat.con.execute("SELECT shard, rule, kept, count(*) FROM sample_decisions GROUP BY ALL ORDER BY ALL").fetchall()
        assert got == [("a", "blur", False, 3), ("a", "clip", True, 3), ("b", "blur", True, 2)]
        with pytest.raises(duckdb.Error):
            replace_rows(cat.con, "sample_decisions", rows("a", "blur", 1).drop(["kept"]).append_column(
                "kept", pa.array([None], pa.bool_())), ["a"], ["blur"])
        assert cat.con.execute("SELECT count(*) FROM sample_decisions").fetchone()[0] == 8  # rolled back


def test_a_catalogued_tar_that_no_longer_reads_is_one_line(tmp_path):
    from blip3.core.errors import UserError
    from blip3.datagen.curate import _user_error
    from blip3.datagen.curate_stages import read_shard_samples
    from tests.core_fixtures import write_caption_shard

    write_caption_shard(tmp_path, 0, 3)
    tar = tmp_path / "00000.tar"
    ok = read_shard_samples({"source": ["s"], "shard": [str(tar)]})
    assert ok["key"].tolist() == ["s000_0000", "s000_0001", "s000_0002"] and ok["image"][0][:2] == b"\xff\xd8"
    tar.write_bytes(tar.read_bytes()[:700])  # truncated inside the first member
    with pytest.raises(UserError, match="cannot read the catalogued tar") as err:
        read_shard_samples({"source": ["s"], "shard": [str(tar)]})
    wrapped = RuntimeError("task failed")
    wrapped.cause = err.value  # how Ray carries a task's exception
    assert str(_user_error(wrapped)) == str(err.value) and _user_error(RuntimeError("x")) is None
