"""Benchmark decontamination: training samples whose image is also an image `blip3 eval` scores on.

Every task the eval module knows (`eval.tasks.TASKS`) is loaded from the `blip3 eval` data folder
(its test split: the questions a score is computed on), the same way `blip3 eval` loads it, so
the images hashed are exactly the ones evaluated. Tasks whose files are absent are skipped and
named. Each benchmark image is fingerprinted like a training image (datagen/image_hash.py) and
matched against `sample_hashes`:

- `sha256`: the same file; `pixels`: the same picture in another file;
- `phash`: within `k` bits (a resized or re-compressed copy), found by the LSH of datagen/lsh.py
  over training and benchmark hashes together.

A match is a `benchmark_matches` row (task, image, the question ids about it) and the sample's
`decontam` decision is "dropped"; `blip3 mix build` leaves those out by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from blip3.core.errors import UserError
from blip3.datagen.dedup import DECISION_SCHEMA
from blip3.datagen.image_hash import bytes_sha256, open_image, phash, pixel_sha256
from blip3.datagen.lsh import near_pairs

MATCH_SCHEMA = pa.schema([("source", pa.string()), ("shard", pa.string()), ("key", pa.string()),
                          ("task", pa.string()), ("image", pa.string()), ("question_ids", pa.list_(pa.string())),
                          ("match", pa.string()), ("distance", pa.int32())])


@dataclass
class BenchmarkImage:
    task: str
    ref: str
    sha256: str
    pixel_sha256: str
    phash: int
    question_ids: list[str] = field(default_factory=list)


@dataclass
class BenchmarkSet:
    images: list[BenchmarkImage]
    tasks: list[str]  # tasks hashed
    skipped: dict[str, str]  # task -> why (files absent)


def benchmark_images(data: str | Path) -> BenchmarkSet:
    """Fingerprints of every test image of every eval task found under `data`."""
    from blip3.eval.tasks import TASKS

    root = Path(data)
    if not root.is_dir():
        raise UserError("not a folder (the `blip3 eval --data` folder)", file=root, field="--eval-data")
    images: dict[tuple[str, str], BenchmarkImage] = {}
    tasks, skipped = [], {}
    for name, cls in TASKS.items():
        try:
            items = cls().load(root, "test")
        except UserError as e:
            skipped[name] = str(e)
            continue
        tasks.append(name)
        for item in items:
            ref = getattr(item.image, "ref", None)
            if ref is None:
                raise TypeError(f"{name}: an item's image does not say where it comes from")
            qid = str(item.target.get("question_id", item.id))
            found = images.get((name, ref))
            if found is None:
                raw = item.image.raw()
                try:
                    img = open_image(raw)
                except Exception as e:  # noqa: BLE001 - a benchmark file that does not decode
                    raise UserError(f"{name}: not a readable image ({type(e).__name__})", file=ref) from None
                found = images[(name, ref)] = BenchmarkImage(name, ref, bytes_sha256(raw), pixel_sha256(img), phash(img))
            if qid not in found.question_ids:
                found.question_ids.append(qid)
    if not tasks:
        raise UserError(f"no benchmark files of any task ({', '.join(TASKS)}) found (see docs/evaluation.md)",
                        file=root, field="--eval-data")
    return BenchmarkSet(list(images.values()), tasks, skipped)


def match_benchmarks(hashes: pa.Table, bench: BenchmarkSet, k: int) -> tuple[pa.Table, pa.Table]:
    """(`benchmark_matches` rows, `decontam` decision rows for every row of `hashes`)."""
    n = hashes.num_rows
    by_sha: dict[str, list[int]] = {}
    by_pix: dict[str, list[int]] = {}
    for j, b in enumerate(bench.images):
        by_sha.setdefault(b.sha256, []).append(j)
        by_pix.setdefault(b.pixel_sha256, []).append(j)
    found: dict[tuple[int, int], tuple[str, int]] = {}  # (sample row, benchmark image) -> (match, distance)
    for i, (sha, pix) in enumerate(zip(hashes["sha256"].to_pylist(), hashes["pixel_sha256"].to_pylist())):
        for j in by_sha.get(sha, []) if sha else []:
            found[(i, j)] = ("sha256", 0)
        for j in by_pix.get(pix, []) if pix else []:
            found.setdefault((i, j), ("pixels", 0))
    ph = hashes["phash"].to_pylist()
    rows = [i for i, v in enumerate(ph) if v is not None]
    train = np.asarray([ph[i] for i in rows], dtype=np.uint64)
    bench_h = np.asarray([b.phash for b in bench.images], dtype=np.uint64)
    pairs = near_pairs(np.concatenate([train, bench_h]), k)
    cross = pairs[(pairs[:, 0] < len(train)) & (pairs[:, 1] >= len(train))]
    for a, b in cross.tolist():
        i, j = rows[a], b - len(train)
        d = int(np.bitwise_count(np.uint64(train[a]) ^ np.uint64(bench_h[j])))
        found.setdefault((i, j), ("phash", d))
    src, shard, key = hashes["source"].to_pylist(), hashes["shard"].to_pylist(), hashes["key"].to_pylist()
    matches = {c: [] for c in MATCH_SCHEMA.names}
    reasons: dict[int, list[str]] = {}
    for (i, j), (how, d) in sorted(found.items()):
        b = bench.images[j]
        for c, v in (("source", src[i]), ("shard", shard[i]), ("key", key[i]), ("task", b.task), ("image", b.ref),
                     ("question_ids", b.question_ids), ("match", how), ("distance", d)):
            matches[c].append(v)
        reasons.setdefault(i, []).append(f"{b.task} image {Path(b.ref.split(':')[0]).name} "
                                         f"(questions {', '.join(b.question_ids[:5])}"
                                         f"{', ...' if len(b.question_ids) > 5 else ''}; {how}"
                                         f"{f', {d} bits' if how == 'phash' else ''})")
    decisions = pa.table({
        "source": hashes["source"], "shard": hashes["shard"], "key": hashes["key"],
        "rule": pa.array(["decontam"] * n, pa.string()),
        "kept": pa.array([i not in reasons for i in range(n)]),
        "reason": pa.array(["in " + "; ".join(reasons[i]) if i in reasons else None for i in range(n)], pa.string()),
        "cluster": pa.nulls(n, pa.string()),
    }, schema=DECISION_SCHEMA)
    return pa.table(matches, schema=MATCH_SCHEMA), decisions
