"""Datagen at scale: the pipeline's own cost per core, the driver's writes, the driver's memory, and
catalog registration at size.

    python benchmarks/bench_datagen.py [--images 10000] [--workers 2] [--repeat 3]
                                       [--rss-small 10000] [--rss-large 200000]
                                       [--catalog-rows 1000000,4000000]

Every rate is given twice: per wall second and per CPU second. CPU seconds are the honest figure on
a shared machine (wall time measures the neighbours as much as the work); the CPU of the pipeline
is that of its whole process tree (driver, Ray's daemons, the actors), sampled every 50 ms.

Rows:
- `plain loop`: one process with no framework: list the folder, then read + decode + the same
  annotator and captions (`--detector annotations`: COCO boxes, an annotator that costs almost
  nothing) + tarfile + one parquet per shard, on the same images: the work itself, per core. Run
  before and after the pipeline (the machine may be shared): wall from the faster run, CPU over
  both.
- `worker path in one process`: the pipeline's own shard function (`datagen.pipeline.write_shard`:
  planning, validation, records, sidecar, stats, fsyncs) called without Ray: the framework's cost
  inside a worker, apart from Ray's.
- `pipeline`: `datagen.grounding.ground` on a local Ray started beforehand (start-up not counted),
  run at N/2 and N images, `--repeat` times, after one untimed job (the first job of a cluster gets
  Ray's pre-started workers for free, later ones start their own); the marginal cost per image
  (difference of the two runs) excludes the job's fixed cost (actors starting and loading, first
  shard). `per core` = marginal images/s / workers (wall), or marginal images per CPU-second of the
  whole tree. The goal is at least 0.7x the loop's rate. Each run also splits its marginal CPU per
  image into the driver (planning, scheduling), the workers and Ray's daemons; the last row pools
  the runs (all extra images over all their marginal CPU), with the median and range of the runs.
- `driver writes`: bytes the driver process wrote during the N-image run, from `/proc/self/io`
  (`write_bytes`: to storage; `wchar`: every write call, sockets to Ray included), divided by the
  bytes of the output folder. No catalog (`register=False`): registration is measured apart.
- `driver RSS`: peak RSS of a fresh process that plans a whole job (streams the input into shard
  plans and drops each, as the driver does once a shard is sent) over a webdataset tar of
  `--rss-small` and `--rss-large` tiny members (no decode: planning is the driver's whole share).
  Goal: flat (large/small at most 1.2x). Also its rate, refs per CPU-second, with the tar counted
  in the same process (a job counts tars in Ray tasks, so the driver's own share is far less).
- `catalog`: rows/s of registering fresh shards into catalogs of growing size, and the time to
  re-register one 1000-row shard at each size (goal: the same at every size). Sizes are given by
  `--catalog-rows` (empty: skipped); 10M rows take minutes and a few GB on this 2-core box, so the
  default stops at 4M: pass `--catalog-rows 1000000,10000000` to measure the issue's sizes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import TreeMonitor, report, wait_for_actor_exit  # noqa: E402
from blip3.datagen.annotator import Annotation, AnnotatorConfig  # noqa: E402

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


def plain_loop(folder: Path, coco: Path, out: Path) -> tuple[int, float, float]:
    """The work itself, as a one-process script would write it with no framework: list the folder,
    then per image read the bytes, decode them, annotate and caption with the same annotator, and
    write the image, caption and json record to a tar (tarfile), one parquet row per image (key,
    caption, sizes, sha256) per shard. Returns (images, wall s, CPU s), the first shard being a
    warm-up (imports and first-call costs, which a worker pays once) and not timed."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from blip3.datagen.grounding import make_config
    from blip3.datagen.inputs import InputSample

    annotator = make_config(detector="annotations", annotations=coco)()
    annotator.load()
    out.mkdir(parents=True)
    files = sorted(folder.glob("*.jpg"))

    def shard(index: int, paths: list[Path]) -> None:
        rows = []
        with tarfile.open(out / f"{index:05d}.tar", "w") as tar:
            for path in paths:
                data = path.read_bytes()
                image = Image.open(io.BytesIO(data)).convert("RGB")
                ann = annotator.annotate(image, InputSample(key=path.stem, image=data, ext="jpg",
                                                            meta={"path": path.name}))
                record = {"key": path.stem, "width": image.width, "height": image.height, "captions": ann.captions,
                          "metadata": ann.metadata}
                for ext, member in (("jpg", data), ("txt", ann.default_caption.encode()),
                                    ("json", json.dumps(record, ensure_ascii=False).encode())):
                    info = tarfile.TarInfo(f"{path.stem}.{ext}")
                    info.size = len(member)
                    tar.addfile(info, io.BytesIO(member))
                rows.append({"key": path.stem, "caption": ann.default_caption, "width": image.width,
                             "height": image.height, "sha256": hashlib.sha256(data).hexdigest()})
        pq.write_table(pa.Table.from_pylist(rows), out / f"{index:05d}.parquet")

    shard(0, files[:SHARD_SIZE])
    t, cpu = time.perf_counter(), time.process_time()
    for i in range(SHARD_SIZE, len(files), SHARD_SIZE):
        shard(i // SHARD_SIZE, files[i:i + SHARD_SIZE])
    return len(files) - SHARD_SIZE, time.perf_counter() - t, time.process_time() - cpu


def worker_path(folder: Path, coco: Path, out: Path) -> tuple[int, float, float]:
    """The pipeline's per-shard worker function (`datagen.pipeline.write_shard`) called in this
    process, no Ray, over the job's own shard plans (planning included): the framework's cost
    inside one worker (validation, records, sidecar, stats, fsyncs) apart from Ray's. Returns
    (images, wall s, CPU s) after a one-shard warm-up."""
    from blip3.datagen.grounding import make_config
    from blip3.datagen.images import ImageLimits
    from blip3.datagen.inputs import iter_raw_refs
    from blip3.datagen.pipeline import write_shard
    from blip3.datagen.plans import iter_plans

    annotator = make_config(detector="annotations", annotations=coco)()
    annotator.load()
    generator = {"name": annotator.name, **annotator.generator_info()}
    record_generator = annotator.generator_info()
    plans = iter_plans(iter_raw_refs(folder), SHARD_SIZE, generator)
    write_shard(out / "warm-up", next(plans), annotator, ImageLimits(), generator, record_generator)
    t, cpu = time.perf_counter(), time.process_time()
    done = 0
    for plan in plans:
        write_shard(out, plan, annotator, ImageLimits(), generator, record_generator)
        done += len(plan.refs)
    return done, time.perf_counter() - t, time.process_time() - cpu


def _proc_io() -> dict[str, int]:
    return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}


@dataclass
class PipelineRun:
    """One `ground` job: wall seconds, CPU seconds of the whole process tree (without the
    monitor's own sampling) split into driver / workers / Ray's daemons, and the driver's I/O."""

    wall: float
    cpu: dict[str, float]
    io: dict[str, int]

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu.values())


def _role(pid: int, cmdline: str) -> str:
    if pid == os.getpid():
        return "driver"
    # Ray Data's tasks and actors (`ray::MapWorker(...)`, `ray::ReadBinary`, idle pool workers) are
    # worker processes; the rest of the tree (raylet, GCS, agents, log monitor) is Ray's daemons
    return "workers" if cmdline.startswith("ray::") or "default_worker" in cmdline else "ray daemons"


#: How the job is cut into Ray Data rows: `plan-rows` is `blip3 ground` (one row per shard plan);
#: the others are the same work as a user's pipeline of `blip3.datagen.ray` with one row per
#: image, carrying its encoded bytes (`read_binary_files`) or its pixels (`read_images`).
DESIGNS = ("plan-rows", "image-bytes", "image-pixels")


def _library_job(folder: Path, coco: Path, out: Path, workers: int, limit: int, pixels: bool) -> None:
    import ray.data

    from blip3.datagen.ray import Grounding, ShardSink

    files = [str(p) for p in sorted(folder.glob("*.jpg"))[:limit]]
    ds = (ray.data.read_images(files, include_paths=True, mode="RGB") if pixels
          else ray.data.read_binary_files(files, include_paths=True))
    ds = ds.map_batches(Grounding, fn_constructor_kwargs={"root": str(folder), "detector": "annotations",
                                                          "annotations": str(coco)},
                        compute=ray.data.ActorPoolStrategy(size=workers), batch_size=SHARD_SIZE)
    ds.write_datasink(ShardSink(out, rows_per_shard=SHARD_SIZE))


def pipeline_run(folder: Path, coco: Path, out: Path, workers: int, limit: int, design: str = "plan-rows") -> PipelineRun:
    """Run `ground` (or its `design` alternative) on the first `limit` images, Ray already up."""
    from blip3.datagen.grounding import ground, make_config
    from blip3.datagen.pipeline import JobOptions

    before = _proc_io()
    t = time.perf_counter()
    # Sampled often: the actors are killed at the job's end and only sampled CPU counts.
    with TreeMonitor(0.05) as mon:
        if design == "plan-rows":
            ground(folder, out, make_config(detector="annotations", annotations=coco),
                   JobOptions(workers=workers, shard_size=SHARD_SIZE, limit=limit, register=False))
        else:
            _library_job(folder, coco, out, workers, limit, pixels=design == "image-pixels")
    wall = time.perf_counter() - t
    after = _proc_io()
    cpu: dict[str, float] = {"driver": 0.0, "workers": 0.0, "ray daemons": 0.0}
    for pid, seconds in mon.cpu_by_pid.items():
        cpu[_role(pid, mon.names.get(pid, ""))] += seconds
    return PipelineRun(wall, cpu, {k: after[k] - before[k] for k in ("wchar", "write_bytes")})


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


# VmHWM, not ru_maxrss: getrusage's peak survives fork + exec, so a child would report the
# benchmark process's own peak.
_PLAN_ONLY = """
import re, sys, time
from pathlib import Path
import ray
from blip3.datagen.plan_source import put_plan
from blip3.datagen.plans import count_tars_locally, job_plans
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
cpu = time.process_time()
# the tar is counted in this process (a job counts it in a Ray task); plans are tar ranges, each put
# into the object store as a job's driver does, keeping only the reference
blocks, n = [], 0
for p in job_plans(sys.argv[1], None, 1000, count_tars=count_tars_locally):
    n += sum(s.stop - s.start for s in p.spans)
    blocks.append(put_plan(p))
cpu = time.process_time() - cpu
print(n, int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024, cpu)
ray.shutdown()
"""


def planning_rss(tmp: Path, n: int) -> tuple[float, float]:
    """Peak RSS (MB) of a process planning a job over a tar of n tiny samples, and its planning
    rate (refs per CPU-second: how many images a second one driver can hand out)."""
    tar_path = tmp / f"wds-{n}.tar"
    data = b"\xff\xd8fake"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(n):
            info = tarfile.TarInfo(f"{i:09d}.jpg")
            info.size = len(data)
            tar.addfile(info, fileobj=__import__("io").BytesIO(data))
    out = subprocess.run([sys.executable, "-c", _PLAN_ONLY, str(tar_path)], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    count, rss, cpu = out.stdout.split()[-3:]
    assert int(count) == n
    tar_path.unlink()
    return float(rss), n / float(cpu)


def catalog_scale(tmp: Path, sizes: list[int]) -> list[dict]:
    """Registration rows/s and per-shard re-registration time at each catalog size."""
    from benchmarks.bench_catalog import reregister_ms
    from blip3.core.catalog import Catalog
    from blip3.core.shards import SampleRow, ShardWriter

    out = tmp / "cat-shard"
    with ShardWriter(out, 0, generator={"name": "bench"}) as w:
        for i in range(1000):
            w.add(f"k{i}", {"jpg": b"x", "txt": "c"}, SampleRow(f"k{i}", width=1, height=1))
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
            wall_ms, cpu_ms = reregister_ms(cat, out, "bench")
            rows.append({"catalog rows": f"{size:,}", "bulk rows/s": f"{added / bulk:,.0f}",
                         "re-register 1 shard (of 15)": f"{wall_ms:.1f} ms wall (median), {cpu_ms:.1f} ms CPU (least)"})
    return rows


# -- the model stage's busy fraction, without an accelerator --------------------------------
@dataclass(frozen=True)
class HoldAccelerator(AnnotatorConfig):
    """A stand-in for a model on an accelerator: each image holds the stage for `hold_s` seconds (a
    sleep, so no core is used, as a GPU kernel uses none) and logs when, to `log_dir`. The images
    around it are really read, decoded and written, so the busy fraction says whether the CPU work
    keeps the "accelerator" fed."""

    hold_s: float = 0.02
    log_dir: str = ""

    def __call__(self) -> "_Holding":
        return _Holding(self)


class _Holding:
    name = "hold"

    def __init__(self, config: HoldAccelerator):
        self.config = config

    def load(self) -> None:
        pass

    def generator_info(self) -> dict:
        return {"engine": "hold", "hold_s": self.config.hold_s}

    def annotate(self, image, sample):
        start = time.time()
        time.sleep(self.config.hold_s)
        end = time.time()
        with open(Path(self.config.log_dir) / f"{os.getpid()}.log", "a") as f:
            f.write(f"{start} {end}\n")
        text = f"an image of {image.width}x{image.height}"
        return Annotation(text, [{"text": text}], {})


def make_photos(folder: Path, n: int, size: tuple[int, int]) -> None:
    """n JPEGs of `size` with noise, so decoding them costs what a photo's decode costs."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    for i in range(n):
        small = np.roll(base, i, axis=1)
        img = Image.fromarray(small).resize(size, Image.BILINEAR)
        img.save(folder / f"photo{i:06d}.jpg", quality=90)


def _busy(log_dir: Path, wall: float) -> tuple[float, float, int]:
    """(busy / wall of the whole job, busy / the window from the first hold to the last, holds)."""
    spans = sorted(tuple(map(float, line.split())) for p in log_dir.glob("*.log") for line in p.read_text().splitlines())
    held = sum(e - s for s, e in spans)
    window = spans[-1][1] - spans[0][0]
    return held / wall, held / window, len(spans)


def busy_fraction(tmp: Path, n: int, size: tuple[int, int], hold_s: float, design: str = "staged") -> dict:
    """Run one job of `n` photos with the stand-in model, return its row. `staged`: the model's
    actor holds the one "accelerator" of the cluster (a custom resource), so the job runs as
    decode tasks -> that actor -> write tasks; `one actor`: the same annotator without it, so the
    job is one stage, its actor decoding and writing between holds. Ray must be up, with
    `{"accelerator": 1}`."""
    from blip3.datagen.pipeline import JobOptions, run_job

    folder = tmp / f"photos-{size[0]}x{size[1]}-{n}"
    if not folder.exists():
        make_photos(folder, n, size)
    log_dir = tmp / f"busy-{design.replace(' ', '-')}"
    log_dir.mkdir()
    config = HoldAccelerator(hold_s, str(log_dir))
    t = time.perf_counter()
    resources = {"accelerator": 1} if design == "staged" else None
    job = JobOptions(workers=1, shard_size=SHARD_SIZE, register=False, resources=resources)
    run_job(folder, tmp / f"busy-out-{design.replace(' ', '-')}", config, job)
    wall = time.perf_counter() - t
    of_job, of_window, holds = _busy(log_dir, wall)
    assert holds == n, holds
    return {"what": f"model stage busy ({hold_s * 1e3:.0f} ms hold per image), {design}",
            "images": f"{n} of {size[0]}x{size[1]}", "seconds": f"{wall:.1f} wall",
            "images/s per core": f"{n / wall:.1f} images/s (ideal {1 / hold_s:.0f})",
            "vs loop": f"busy {of_window:.0%} of the stage's window, {of_job:.0%} of the job"}


def pair_rows(design: str, pairs: list, extra: int, half: int, args: argparse.Namespace, loop_wall: float,
              loop_cpu: float, tmp: Path) -> list[dict]:
    """The rows of one design's job pairs: each pair's marginal rates, all pairs pooled, and the
    driver's share of the bytes written by the full run of the first pair."""
    rows = []
    ratios = []
    for r, (p_half, p_full) in enumerate(pairs):
        per_core = extra / (p_full.wall - p_half.wall) / args.workers
        per_cpu = extra / (p_full.cpu_s - p_half.cpu_s)
        ratios.append(per_cpu / loop_cpu)
        split = ", ".join(f"{k} {(p_full.cpu[k] - p_half.cpu[k]) / extra * 1e3:.3f}" for k in p_full.cpu)
        rows.append({"what": f"{design}, {args.workers} workers (marginal), run {r + 1}; CPU ms/image: {split}",
                     "images": f"{half}->{args.images}",
                     "seconds": f"{p_half.wall:.1f}/{p_full.wall:.1f} wall, {p_half.cpu_s:.1f}/{p_full.cpu_s:.1f} CPU",
                     "images/s per core": f"{per_core:.0f} wall, {per_cpu:.0f} CPU",
                     "vs loop": f"{per_core / loop_wall:.2f}x wall, {per_cpu / loop_cpu:.2f}x CPU"})
    ratios.sort()
    pooled = extra * len(pairs) / sum(f.cpu_s - h.cpu_s for h, f in pairs)
    rows.append({"what": f"{design} marginal vs loop, all runs pooled (CPU)", "images": f"{len(ratios)} runs",
                 "seconds": f"loop {1e3 / loop_cpu:.3f} CPU ms/image",
                 "images/s per core": f"{pooled:.0f} CPU", "vs loop": f"{pooled / loop_cpu:.2f}x CPU (median "
                 f"{statistics.median(ratios):.2f}x, runs {ratios[0]:.2f}-{ratios[-1]:.2f}x)"})
    out_bytes = folder_bytes(tmp / f"{design}-full-0")
    io_full = pairs[0][1].io
    rows.append({"what": f"{design}: driver writes / output bytes", "images": args.images,
                 "seconds": f"output {out_bytes / 1e6:.1f} MB",
                 "images/s per core": f"write_bytes {io_full['write_bytes'] / out_bytes:.2%}",
                 "vs loop": f"wchar {io_full['wchar'] / out_bytes:.2%}"})
    return rows


def busy_rows(tmp: Path, args: argparse.Namespace) -> list[dict]:
    """The busy-fraction rows: a cluster with one "accelerator" (a custom resource) and a CPU for
    the actor holding it on top of the machine's cores, which the read and write stages share."""
    import ray

    rows = []
    ray.init(num_cpus=(os.cpu_count() or 1) + 1, resources={"accelerator": 1}, include_dashboard=False,
             log_to_driver=False, logging_level="ERROR")
    try:
        for size in args.busy_sizes.split(","):
            w, h = (int(x) for x in size.split("x"))
            for design in ("one actor", "staged"):
                rows.append(busy_fraction(tmp / f"busy-{size}", args.busy_images, (w, h), args.hold_ms / 1e3, design))
    finally:
        ray.shutdown()
    return rows


def _rate(runs: list[tuple[int, float, float]]) -> tuple[float, float]:
    """(images/s wall of the least disturbed run, images per CPU-second over all runs)."""
    return max(n / wall for n, wall, _ in runs), sum(n for n, _, _ in runs) / sum(cpu for _, _, cpu in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="half/full job pairs (the machine may be shared)")
    ap.add_argument("--rss-small", type=int, default=10_000)
    ap.add_argument("--rss-large", type=int, default=200_000)
    ap.add_argument("--catalog-rows", default="1000000,4000000", help="comma-separated sizes; empty: skip")
    ap.add_argument("--busy-images", type=int, default=1000, help="photos per busy-fraction job; 0: skip")
    ap.add_argument("--busy-sizes", default="320x240,1024x768", help="photo sizes of the busy-fraction jobs")
    ap.add_argument("--hold-ms", type=float, default=20.0, help="the stand-in model's time per image")
    ap.add_argument("--busy-only", action="store_true", help="only the busy-fraction rows")
    ap.add_argument("--designs", default="plan-rows", help=f"comma-separated, of {', '.join(DESIGNS)}")
    args = ap.parse_args()
    os.environ.setdefault("BLIP3_NO_PROGRESS", "1")
    rows: list[dict] = []
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench-datagen-") as d:
        tmp = Path(d)
        if args.busy_images:
            rows += busy_rows(tmp, args)
            if args.busy_only:
                report("datagen-busy", rows, f"model stage busy (load average {load[0]:.1f} before)")
                return
        folder = tmp / "images"
        coco = make_images(folder, args.images)
        # the single-process figures before and after the pipeline: the machine may be shared
        loops = [plain_loop(folder, coco, tmp / "loop-1")]
        inproc = [worker_path(folder, coco, tmp / "inproc-1")]

        import ray

        from blip3.core.ray_session import ray_session

        half = args.images // 2
        designs = args.designs.split(",")
        runs: dict[str, list[tuple[PipelineRun, PipelineRun]]] = {d: [] for d in designs}
        from blip3.datagen.pipeline import JobOptions, _local_cpus

        # the cluster a local job starts: the machine's cores for the read and write stages, plus
        # one per annotation actor
        with ray_session(num_cpus=_local_cpus(JobOptions(workers=args.workers))):
            for design in designs:
                # A first job takes the workers Ray started with the cluster; every later job starts
                # its own: run one, untimed, so the measured jobs all pay the same fixed cost.
                pipeline_run(folder, coco, tmp / f"{design}-warm", args.workers, SHARD_SIZE * args.workers, design)
            for r in range(args.repeat):  # the designs in turn, so the machine's load falls on each alike
                for design in designs:
                    wait_for_actor_exit("ray::MapWorker")
                    p_half = pipeline_run(folder, coco, tmp / f"{design}-half-{r}", args.workers, half, design)
                    wait_for_actor_exit("ray::MapWorker")
                    runs[design].append((p_half, pipeline_run(folder, coco, tmp / f"{design}-full-{r}", args.workers,
                                                              args.images, design)))
            assert ray.is_initialized()
        loops.append(plain_loop(folder, coco, tmp / "loop-2"))
        inproc.append(worker_path(folder, coco, tmp / "inproc-2"))
        load.append(os.getloadavg()[0])

        loop_wall, loop_cpu = _rate(loops)
        rows.append({"what": "plain loop (1 process, no framework)", "images": f"{loops[0][0]} x2",
                     "seconds": ", ".join(f"{w:.1f} wall/{c:.1f} CPU" for _, w, c in loops),
                     "images/s per core": f"{loop_wall:.0f} wall, {loop_cpu:.0f} CPU", "vs loop": "1.00x"})
        in_wall, in_cpu = _rate(inproc)
        rows.append({"what": "worker path in one process (write_shard, no Ray)", "images": f"{inproc[0][0]} x2",
                     "seconds": ", ".join(f"{w:.1f} wall/{c:.1f} CPU" for _, w, c in inproc),
                     "images/s per core": f"{in_wall:.0f} wall, {in_cpu:.0f} CPU",
                     "vs loop": f"{in_wall / loop_wall:.2f}x wall, {in_cpu / loop_cpu:.2f}x CPU"})
        extra = args.images - half
        for design, pairs in runs.items():
            rows += pair_rows(design, pairs, extra, half, args, loop_wall, loop_cpu, tmp)
        (small, _), (large, plan_rate) = planning_rss(tmp, args.rss_small), planning_rss(tmp, args.rss_large)
        rows.append({"what": "driver peak RSS, planning (MB)", "images": f"{args.rss_small:,} / {args.rss_large:,}",
                     "seconds": f"counted + planned in one process: {plan_rate:,.0f} refs/CPU-s",
                     "images/s per core": f"{small:.0f} / {large:.0f}", "vs loop": f"{large / small:.2f}x"})
        report("datagen", rows, f"datagen at scale (load average {load[0]:.1f} before, {load[1]:.1f} after)")
        if args.catalog_rows:
            sizes = [int(s) for s in args.catalog_rows.split(",")]
            report("datagen-catalog", catalog_scale(tmp, sizes), "catalog registration at size")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
