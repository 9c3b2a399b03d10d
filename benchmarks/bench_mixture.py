"""Mixture benchmark: loader throughput vs a bare webdataset read, proportions, `mix stats` latency.

1. Samples/s delivered by `MixtureLoader` through a torch DataLoader (1 and 2 workers) vs a bare
   `webdataset.WebDataset(...).decode()` read of the same shards with the same workers (json
   parsed, text decoded, images left as bytes in both; webdataset splits the shards between the
   workers), as a ratio in one run: per wall second, and per CPU second of the process and its
   workers (what a loaded machine cannot distort).
2. Realised source proportions vs target weights over 100k samples.
3. Latency of `blip3 mix stats` (all its queries) on a catalog with 10M sample rows.

    python benchmarks/bench_mixture.py [--shards 16] [--per-shard 500] [--rows 10000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SOURCES = 4


def make_sources(root: Path, shards: int, per_shard: int) -> list[Path]:
    """`SOURCES` caption sources sharing `shards` tars, ~12 KB JPEGs, captions and json records."""
    from PIL import Image

    from blip3.core.shards import SampleRow, ShardWriter

    rng = random.Random(0)
    images = []
    for i in range(16):
        img = Image.effect_noise((160, 120), 40 + i).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        images.append(buf.getvalue())
    folders = []
    for s in range(SOURCES):
        folder = root / f"src{s}"
        for k in range(shards // SOURCES):
            with ShardWriter(folder, k, generator={"name": "bench"}) as w:
                for i in range(per_shard):
                    key = f"s{s}k{k}i{i:05d}"
                    cap = " ".join(rng.choice(("a", "sign", "that", "reads", "open", "cafe")) for _ in range(20))
                    jpg = images[i % len(images)]
                    w.add(key, {"jpg": jpg, "txt": cap, "json": {"uid": key, "captions": [{"text": cap}]}},
                          SampleRow(key, image_bytes=len(jpg), caption_length=len(cap)))
        folders.append(folder)
    return folders


class _Clock:
    """Wall seconds and CPU seconds of this process plus its reaped children (the DataLoader
    workers, joined when their iterator is shut down): on a shared machine the CPU time tells
    the cost apart from waiting for a core."""

    def __enter__(self) -> "_Clock":
        self._cpu0, self._t0 = self._cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._t0
        self.cpu = self._cpu() - self._cpu0

    @staticmethod
    def _cpu() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def bare_webdataset(tars: list[str], workers: int) -> tuple[int, _Clock]:
    """Every sample of `tars` once; webdataset gives each DataLoader worker its own shards."""
    import torch
    import webdataset as wds

    ds = wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode()
    with _Clock() as clock:
        dl = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=workers, collate_fn=list)
        n = sum(len(b) for b in dl)
    return n, clock


def mixture(manifest, n: int, workers: int) -> tuple[int, _Clock]:
    """The first `n` samples of the mixture (workers shut down inside the clock)."""
    from blip3.mixture.loader import MixtureLoader

    loader = MixtureLoader(manifest, verify="none", shuffle_buffer=1000).dataloader(32, num_workers=workers)
    with _Clock() as clock:
        it = iter(loader)
        got = 0
        for batch in it:
            got += len(batch)
            if got >= n:
                break
        it.close()  # shuts the DataLoader's workers down (joined, so their CPU time is counted)
    return got, clock


def stats_latency(rows: int) -> dict[str, float]:
    """Fill a catalog with `rows` synthetic sample rows over 8 sources, build a mixture row set,
    then time each `mix stats` query (mean of 3, warm)."""
    from blip3.core.catalog import Catalog
    from blip3.mixture.stats import mixture_queries
    from blip3.core.sql import run_query

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "catalog.duckdb"
        with Catalog(db) as cat:
            t0 = time.perf_counter()
            cat.con.execute(
                f"""INSERT INTO samples (source, shard, key, status, error_message, caption_length, n_ocr, n_objects,
                                         mean_confidence, image_bytes)
                    SELECT 'src' || (i % 8), 'shard' || (i // 10000), 'k' || i,
                           CASE WHEN i % 37 = 0 THEN 'failed' ELSE 'success' END,
                           CASE WHEN i % 37 = 0 THEN (CASE WHEN i % 2 = 0 THEN 'decode: bad' ELSE 'too_large: big' END) END,
                           (hash(i) % 600)::INT, (hash(i + 1) % 4)::INT, (hash(i + 2) % 5)::INT,
                           (hash(i + 3) % 1000) / 1000.0, 20000
                    FROM range({rows}) t(i)"""
            )
            insert_s = time.perf_counter() - t0
            for s in range(8):
                cat.upsert_source(f"src{s}", "caption", tmp)
            cat.con.execute("INSERT INTO mixtures (name, seed, weight_by, target_samples, target_tokens) "
                            "VALUES ('bench', 0, 'samples', 1000000, 100000000)")
            for s in range(6):
                cat.con.execute(
                    "INSERT INTO mixture_sources (mixture, source, kind, weight, sample_weight, available_samples, "
                    "available_tokens, target_samples, target_tokens, epochs) VALUES ('bench', ?, 'caption', ?, ?, ?, ?, ?, ?, ?)",
                    [f"src{s}", 1 / 6, 1 / 6, rows // 8, rows // 8 * 150, 1_000_000 // 6, 1_000_000 // 6 * 150,
                     (1_000_000 / 6) / (rows / 8)],
                )
        out = {"insert rows/s": rows / insert_s}
        total = 0.0
        for title, sql in mixture_queries("bench").items():
            run_query(sql, db)
            t0 = time.perf_counter()
            for _ in range(3):
                run_query(sql, db)
            ms = (time.perf_counter() - t0) / 3 * 1000
            out[f"{title} ms"] = ms
            total += ms
        out["mix stats total ms"] = total
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--rows", type=int, default=10_000_000, help="catalog rows for `mix stats` (0: skip that part)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each loader read (the best is reported)")
    args = ap.parse_args()
    from benchmarks._common import peak_rss_mb, report
    from blip3.mixture.build import build_manifest
    from blip3.mixture.loader import MixtureLoader

    with tempfile.TemporaryDirectory() as tmp:
        folders = make_sources(Path(tmp), args.shards, args.per_shard)
        tars = sorted(str(p) for f in folders for p in f.glob("*.tar"))
        spec = {"name": "bench", "seed": 0,
                "sources": [{"name": f.name, "path": str(f), "kind": "caption", "weight": 1 + i} for i, f in enumerate(folders)]}
        manifest = build_manifest(spec)
        t0 = time.perf_counter()
        MixtureLoader(manifest, verify="sha256")
        verify_s = time.perf_counter() - t0
        rows = []
        for workers in (1, 2):
            # alternate the two reads, keep each one's best run: load from other processes only slows
            bare, mix = [], []
            for _ in range(args.repeat):
                n_bare, c_bare = bare_webdataset(tars, workers)
                n_mix, c_mix = mixture(manifest, n_bare, workers)
                bare.append((n_bare / c_bare.wall, n_bare / c_bare.cpu))
                mix.append((n_mix / c_mix.wall, n_mix / c_mix.cpu))
            (b_wall, b_cpu), (m_wall, m_cpu) = max(bare), max(mix)
            rows.append({"workers": workers, "samples": n_bare, "bare wds samples/s": b_wall, "mixture samples/s": m_wall,
                         "mixture / bare": m_wall / b_wall, "bare samples/CPU-s": b_cpu,
                         "mixture samples/CPU-s": m_cpu, "mixture / bare (CPU)": m_cpu / b_cpu})
        counts = Counter(s["source"] for s in MixtureLoader(manifest, decode=False, verify="none").take(100_000))
        weights = {s.name: s.sample_weight for s in manifest.sources}
        max_rel = max(abs(counts[k] / 100_000 - w) / w for k, w in weights.items())
        rows[0]["max rel. proportion error (100k)"] = max_rel
        rows[0]["sha256 verify s"] = verify_s
        rows[0]["peak RSS MB"] = peak_rss_mb()
    report("mixture_loader", rows, "mixture loader vs bare webdataset (same shards, DataLoader batch 32)")
    if args.rows:
        report("mixture_stats", [{"sample rows": args.rows, **stats_latency(args.rows), "peak RSS MB": peak_rss_mb()}],
               "mix stats latency")


if __name__ == "__main__":
    main()
