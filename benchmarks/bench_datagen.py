"""Datagen at scale: the pipeline's own cost per core, the driver's writes, the driver's memory, and
catalog registration at size.

    python benchmarks/bench_datagen.py [--images 3000] [--workers 2] [--rss-small 10000] [--rss-large 200000]
                                       [--catalog-rows 1000000,4000000]

Rows:
- `plain loop`: one process doing read + decode/validate + the same annotate and captions
  (`--detector annotations`: COCO boxes, an annotator that costs almost nothing) + tar/parquet
  write, on the same images: the work itself, per core.
- `pipeline`: `datagen.grounding.ground` on a local Ray started beforehand (start-up not counted),
  run at N/2 and N images; the marginal time per image (difference of the two runs) excludes the
  job's fixed cost (actors loading, first shard). `per core` = marginal images/s / workers. The
  goal is at least 0.7x the loop's images/s.
- `driver writes`: bytes the driver process wrote during the N-image run, from `/proc/self/io`
  (`write_bytes`: to storage; `wchar`: every write call, sockets to Ray included), divided by the
  bytes of the output folder. No catalog (`register=False`): registration is measured apart.
- `driver RSS`: peak RSS of a fresh process that plans a whole job (streams the input into shard
  plans and drops each, as the driver does once a shard is sent) over a webdataset tar of
  `--rss-small` and `--rss-large` tiny members (no decode: planning is the driver's whole share).
  Goal: flat (large/small at most 1.2x).
- `catalog`: rows/s of registering fresh shards into catalogs of growing size, and the time to
  re-register one 1000-row shard at each size (goal: the same at every size). Sizes are given by
  `--catalog-rows`; 10M rows take minutes and a few GB on this 2-core box, so the default stops
  at 4M: pass `--catalog-rows 1000000,10000000` to measure the issue's sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import TreeMonitor, report  # noqa: E402

SHARD_SIZE = 100  # small enough that every worker has shards at a few thousand images


def make_images(folder: Path, n: int) -> Path:
    """n JPEGs of 320x240 with a few shapes, and their COCO boxes file; returns the COCO path."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        img = Image.new("RGB", (320, 240), ((i * 37) % 255, (i * 91) % 255, (i * 13) % 255))
        d = ImageDraw.Draw(img)
        box = (10 + i % 50, 20, 120 + i % 50, 140)
        d.rectangle(box, fill=(255, 255, 255))
        name = f"img{i:06d}.jpg"
        img.save(folder / name, quality=90)
        images.append({"id": i, "file_name": name, "width": 320, "height": 240})
        anns.append({"id": i, "image_id": i, "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                     "category_id": 1 + i % 2, "iscrowd": 0})
    coco = folder.parent / f"{folder.name}.coco.json"
    coco.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "sign"}, {"id": 2, "name": "box"}]}))
    return coco


def plain_loop(folder: Path, coco: Path, out: Path) -> tuple[float, float]:
    """Seconds for one process to read, decode, annotate, caption and write every image but the
    first shard's (a warm-up, not timed), and the CPU seconds it used."""
    from blip3.datagen.grounding import make_config
    from blip3.datagen.images import ImageLimits
    from blip3.datagen.inputs import iter_raw_refs
    from blip3.datagen.pipeline import write_shard
    from blip3.datagen.plans import iter_plans

    factory = make_config(detector="annotations", annotations=coco)
    annotator = factory()
    annotator.load()
    generator = {"name": annotator.name, **annotator.generator_info()}
    plans = iter_plans(iter_raw_refs(folder), SHARD_SIZE, generator)
    warm = next(plans)  # imports (pyarrow, pandas) and first-call costs, as a worker pays once
    write_shard(out / "warm-up", warm, annotator, ImageLimits(), generator, annotator.generator_info())
    t, cpu = time.perf_counter(), time.process_time()
    for plan in plans:
        write_shard(out, plan, annotator, ImageLimits(), generator, annotator.generator_info())
    return time.perf_counter() - t, time.process_time() - cpu


def _proc_io() -> dict[str, int]:
    return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}


def pipeline_run(folder: Path, coco: Path, out: Path, workers: int, limit: int
                 ) -> tuple[float, float, dict[str, int]]:
    """(wall s, CPU s of the whole process tree: driver, raylet, actors, driver I/O counters)."""
    from blip3.datagen.grounding import ground, make_config
    from blip3.datagen.pipeline import JobOptions

    before = _proc_io()
    t = time.perf_counter()
    with TreeMonitor(1.0) as mon:  # sparse: the sampling itself runs in the driver, inside the tree
        ground(folder, out, make_config(detector="annotations", annotations=coco),
               JobOptions(workers=workers, shard_size=SHARD_SIZE, limit=limit, register=False))
    wall = time.perf_counter() - t
    after = _proc_io()
    return wall, mon.cpu_s, {k: after[k] - before[k] for k in ("wchar", "write_bytes")}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


# VmHWM, not ru_maxrss: getrusage's peak survives fork + exec, so a child would report the
# benchmark process's own peak.
_PLAN_ONLY = """
import re, sys
from pathlib import Path
from blip3.datagen.plans import count_tars_locally, job_plans
n = sum(s.stop - s.start for p in job_plans(sys.argv[1], None, 1000, count_tars=count_tars_locally) for s in p.spans)
print(n, int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024)
"""


def planning_rss(tmp: Path, n: int) -> float:
    """Peak RSS (MB) of a process planning a job over a tar of n tiny samples."""
    tar_path = tmp / f"wds-{n}.tar"
    data = b"\xff\xd8fake"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(n):
            info = tarfile.TarInfo(f"{i:09d}.jpg")
            info.size = len(data)
            tar.addfile(info, fileobj=__import__("io").BytesIO(data))
    out = subprocess.run([sys.executable, "-c", _PLAN_ONLY, str(tar_path)], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    count, rss = out.stdout.split()
    assert int(count) == n
    tar_path.unlink()
    return float(rss)


def catalog_scale(tmp: Path, sizes: list[int]) -> list[dict]:
    """Registration rows/s and per-shard re-registration time at each catalog size."""
    from blip3.core.catalog import Catalog, transaction
    from blip3.core.shards import SampleRow, ShardWriter, list_shards

    out = tmp / "cat-shard"
    with ShardWriter(out, 0, generator={"name": "bench"}) as w:
        for i in range(1000):
            w.add(f"k{i}", {"jpg": b"x", "txt": "c"}, SampleRow(f"k{i}", width=1, height=1))
    info = list_shards(out)[0]
    rows = []
    with Catalog(tmp / "scale.duckdb") as cat:
        have = 0
        for size in sizes:
            t = time.perf_counter()
            # Bulk rows as the catalog stores them (what registering size/1000 shards inserts).
            cat.con.execute(
                "INSERT INTO samples (source, shard, key, status, width, height) SELECT 'bench', "
                "'/bench/' || lpad(((? + i) // 1000)::VARCHAR, 9, '0') || '.tar', 'k' || i, 'success', 1, 1 "
                "FROM range(?) t(i)", [have, size - have])
            bulk = time.perf_counter() - t
            added, have = size - have, size
            tar = str(info.tar.resolve())
            times = []
            for _ in range(5):
                t = time.perf_counter()
                with transaction(cat.con):
                    cat._insert_shard(tar, "bench", info)
                times.append(time.perf_counter() - t)
            times.sort()
            rows.append({"catalog rows": f"{size:,}", "bulk rows/s": f"{added / bulk:,.0f}",
                         "re-register 1 shard (median of 5)": f"{times[2] * 1000:.1f} ms"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rss-small", type=int, default=10_000)
    ap.add_argument("--rss-large", type=int, default=200_000)
    ap.add_argument("--catalog-rows", default="1000000,4000000")
    args = ap.parse_args()
    os.environ.setdefault("BLIP3_NO_PROGRESS", "1")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-datagen-") as d:
        tmp = Path(d)
        folder = tmp / "images"
        coco = make_images(folder, args.images)
        loop_s, loop_cpu = plain_loop(folder, coco, tmp / "loop")
        done = args.images - SHARD_SIZE  # the first shard was the warm-up
        loop_rate, loop_cpu_rate = done / loop_s, done / loop_cpu
        rows.append({"what": "plain loop (1 process)", "images": done, "seconds": f"{loop_s:.2f} wall, {loop_cpu:.2f} CPU",
                     "images/s per core": f"{loop_rate:.0f} wall, {loop_cpu_rate:.0f} CPU", "vs loop": "1.00x"})

        import ray

        from blip3.core.ray_session import ray_session

        with ray_session(num_cpus=args.workers):
            half = args.images // 2
            t_half, cpu_half, _ = pipeline_run(folder, coco, tmp / "p-half", args.workers, half)
            t_full, cpu_full, io = pipeline_run(folder, coco, tmp / "p-full", args.workers, args.images)
            assert ray.is_initialized()
        extra = args.images - half
        per_core = extra / (t_full - t_half) / args.workers
        per_cpu = extra / (cpu_full - cpu_half)
        rows.append({"what": f"pipeline, {args.workers} workers (marginal)", "images": f"{half}->{args.images}",
                     "seconds": f"{t_half:.1f}/{t_full:.1f} wall, {cpu_half:.1f}/{cpu_full:.1f} CPU",
                     "images/s per core": f"{per_core:.0f} wall, {per_cpu:.0f} CPU",
                     "vs loop": f"{per_core / loop_rate:.2f}x wall, {per_cpu / loop_cpu_rate:.2f}x CPU"})
        out_bytes = folder_bytes(tmp / "p-full")
        rows.append({"what": "driver writes / output bytes", "images": args.images,
                     "seconds": f"output {out_bytes / 1e6:.1f} MB",
                     "images/s per core": f"write_bytes {io['write_bytes'] / out_bytes:.2%}",
                     "vs loop": f"wchar {io['wchar'] / out_bytes:.2%}"})
        small, large = planning_rss(tmp, args.rss_small), planning_rss(tmp, args.rss_large)
        rows.append({"what": "driver peak RSS, planning (MB)", "images": f"{args.rss_small:,} / {args.rss_large:,}",
                     "seconds": "", "images/s per core": f"{small:.0f} / {large:.0f}",
                     "vs loop": f"{large / small:.2f}x"})
        report("datagen", rows, "datagen at scale")
        sizes = [int(s) for s in args.catalog_rows.split(",")]
        report("datagen-catalog", catalog_scale(tmp, sizes), "catalog registration at size")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
