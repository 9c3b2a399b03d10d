"""One datagen pipeline for every annotator: read -> validate -> annotate -> caption -> write.

    refs (driver, stable order) --chunk by shard_size--> shards 0..n-1 (skip complete ones)
      --Ray Data from_items(refs of pending shards)--> map_batches(actor pool: one annotator per
      actor, loaded once; per sample: read bytes, decode+validate, annotate, pack members)
      --rows back to the driver--> ShardWriter per shard (tar + parquet + stats, atomic)
      --> catalog.add_output

Why this shape:
- Determinism and resume: shard `i` always holds input samples `i*S .. i*S+S-1` (in `iter_refs`
  order) and members are written sorted by that position, so the tars are byte-identical across
  runs however Ray schedules the work. A shard counts as done when `core.shards.shard_complete`
  (stats present, tar size and sha256 match) holds and its stats carry the same `input_digest`;
  a killed run leaves only temporaries, removed on the next start.
- Small overhead: refs (not bytes) travel into Ray; each actor reads, decodes and annotates in one
  step, so an image crosses process boundaries once, as the bytes that will be stored.
- The driver writes shards as soon as all their rows are back, in whichever order they finish.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from blip3.core.errors import UserError
from blip3.core.logs import get_logger, progress, progress_enabled
from blip3.core.shards import (
    SHARD_DIGITS,
    SampleRow,
    ShardWriter,
    clean_temporaries,
    read_stats,
    shard_complete,
    shard_paths,
)
from blip3.datagen.annotator import AnnotatorFactory, SkipSample
from blip3.datagen.images import ImageLimits, ImageOutput, ImageRejected, decode_image
from blip3.datagen.inputs import SampleRef, iter_refs, load_sample

log = get_logger("datagen")
DEFAULT_SHARD_SIZE = 1000
DEFAULT_BATCH_SIZE = 4
DOWNLOAD_DIR = ".download"
WINDOW_SAMPLES = 50_000


@dataclass
class JobResult:
    """What a job did; `failure_reasons` counts the failed samples of the shards it wrote."""

    output: Path
    shards_total: int
    shards_written: int
    shards_skipped: int
    samples: int = 0
    successes: int = 0
    failed: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0
    source: str | None = None
    generator: dict[str, Any] = field(default_factory=dict)

    def summary(self, skipped_as: str = "already done") -> str:
        """One plain line for the engines' commands: shards, outcomes, failure reasons, time, source."""
        reasons = ", ".join(f"{k}: {v}" for k, v in self.failure_reasons.items())
        return (f"{self.shards_written} shard(s) written, {self.shards_skipped} {skipped_as}; "
                f"{self.successes} ok, {self.failed} failed{f' ({reasons})' if reasons else ''}; {self.duration_s:.1f}s"
                + (f"; catalog source {self.source}" if self.source else ""))


# -- one sample, no Ray: read -> validate -> annotate -> pack ---------------------------------
def process_ref(ref: SampleRef, annotator, limits: ImageLimits, generator: dict[str, Any] | None = None,
                output: ImageOutput = ImageOutput()) -> dict[str, Any]:
    """Run one sample through the steps; returns a result row (success or failure with reason).

    `generator` (the annotator's `generator_info()`, computed once per actor) goes into the record;
    `output` says how the image member is stored.
    """
    row = SampleRow(key=ref.key, uid=ref.uid, url=ref.url, has_source_caption=bool(ref.source_caption))
    if ref.error:
        row.status, row.error_message = "failed", ref.error
        return _result(row)
    try:
        sample = load_sample(ref)
    except OSError as e:
        row.status, row.error_message = "failed", f"read: {e}"
        return _result(row)
    try:
        decoded = decode_image(sample.image, limits, output)
    except ImageRejected as e:
        row.status, row.error_message = "failed", e.error
        return _result(row)
    row.original_width, row.original_height = decoded.orig_width, decoded.orig_height
    row.width, row.height = decoded.width, decoded.height
    try:
        ann = annotator.annotate(decoded.image, sample)
    except SkipSample as e:
        row.status, row.error_message = "failed", e.error
        return _result(row)
    except Exception as e:  # an engine crash on one image must not stop the job; recorded with reason
        row.status, row.error_message = "failed", f"annotate: {type(e).__name__}: {str(e)[:200]}"
        return _result(row)
    record: dict[str, Any] = {
        "key": ref.key,
        "uid": ref.uid,
        "url": ref.url,
        "width": decoded.width,
        "height": decoded.height,
        "source_caption": sample.source_caption,
        **({"source_path": sample.meta["path"]} if "path" in sample.meta else {}),  # lineage of folder inputs
        "captions": ann.captions,
        "metadata": ann.metadata,
        **ann.record,
        "generator": generator if generator is not None else annotator.generator_info(),
        "status": "success",
    }
    if decoded.conversions:
        record["conversions"] = decoded.conversions
    row.image_bytes = len(decoded.data)
    row.sha256 = hashlib.sha256(decoded.data).hexdigest()
    row.caption = ann.default_caption
    row.caption_length = len(ann.default_caption)
    row.n_captions = len(ann.captions)
    row.n_ocr, row.n_objects = ann.n_ocr, ann.n_objects
    row.mean_confidence = ann.mean_confidence
    return _result(
        row, image=decoded.data, ext=decoded.ext, txt=ann.default_caption,
        record=json.dumps(record, ensure_ascii=False),
    )


def _result(row: SampleRow, *, image: bytes = b"", ext: str = "", txt: str = "", record: str = "") -> dict[str, Any]:
    return {"ok": row.status == "success", "image": image, "ext": ext, "txt": txt, "json": record,
            "row": json.dumps(asdict(row))}


class AnnotateActor:
    """A Ray Data actor: one annotator, loaded once, processing batches of refs."""

    def __init__(self, factory: AnnotatorFactory, limits: ImageLimits, output: ImageOutput):
        self.annotator = factory()
        self.annotator.load()
        self.limits = limits
        self.output = output
        self.generator = self.annotator.generator_info()

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out: dict[str, list] = defaultdict(list)
        for shard, pos, ref_json in zip(batch["shard"], batch["pos"], batch["ref"]):
            res = process_ref(SampleRef.from_json(str(ref_json)), self.annotator, self.limits, self.generator,
                              self.output)
            out["shard"].append(int(shard))
            out["pos"].append(int(pos))
            for k, v in res.items():
                out[k].append(v)
        return dict(out)


# -- planning ---------------------------------------------------------------------------------
def plan_shards(refs: list[SampleRef], shard_size: int) -> list[list[SampleRef]]:
    if shard_size < 1:
        raise UserError("must be at least 1", field="--shard-size")
    return [refs[i : i + shard_size] for i in range(0, len(refs), shard_size)]


def input_digest(refs: Iterable[SampleRef], generator: dict[str, Any] | None = None) -> str:
    """A fingerprint of a shard's inputs and of the annotator's settings: a finished shard is reused
    only for the same inputs annotated the same way (changing e.g. `--min-confidence` redoes it)."""
    h = hashlib.sha256(json.dumps(generator or {}, sort_keys=True, default=str).encode())
    for r in refs:
        h.update(json.dumps([r.key, r.ext, r.uid, r.url, r.source_caption, r.error]).encode())
    return h.hexdigest()


def shard_done(out: Path, index: int, digest: str, digits: int = SHARD_DIGITS) -> bool:
    stats = read_stats(out, index, digits)
    return stats is not None and stats.get("input_digest") == digest and shard_complete(out, index, digits=digits)


def _remove_shards(out: Path, keep_below: int = 0, digits: int = SHARD_DIGITS) -> list[int]:
    """Delete every published shard (tar, parquet, stats) whose index is `keep_below` or more, or
    whose name has another width than `digits`; returns the removed indices. Such shards are left
    over from a run with another `--shard-size`, a larger `--limit` or another `--shard-name-width`:
    kept, they would be catalogued and exported twice."""
    names = set()
    for suffix in ("_stats.json", ".tar", ".parquet"):
        for p in out.glob(f"*{suffix}"):
            stem = p.name[: -len(suffix)]
            if stem.isdigit() and (int(stem) >= keep_below or len(stem) != digits):
                names.add(stem)
    for name in names:
        for p in shard_paths(out, name)[::-1]:  # stats first: a half-removed shard never looks complete
            p.unlink(missing_ok=True)
    return sorted(int(n) for n in names)


# -- Ray ------------------------------------------------------------------------------------
def connect_ray(ray_address: str | None, workers: int) -> bool:
    """Join `ray_address`, or start a quiet local Ray; reuse one already running. True if started here."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if ray_address:
        ray.init(address=ray_address, **kwargs)
    else:
        ray.init(num_cpus=max(workers, os.cpu_count() or 1), **kwargs)
    return True


def _configure_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress_enabled()
    ctx.verbose_progress = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


# -- the job ----------------------------------------------------------------------------------
def run_job(
    input: str | Path,
    output: str | Path,
    annotator_factory: AnnotatorFactory,
    *,
    input_format: str | None = None,
    workers: int = 2,
    ray_address: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    catalog_db: str | Path | None = None,
    source_name: str | None = None,
    limit: int | None = None,
    limits: ImageLimits = ImageLimits(),
    image_output: ImageOutput = ImageOutput(),
    shard_name_width: int = SHARD_DIGITS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    register: bool = True,
) -> JobResult:
    """Annotate `input` into caption shards in `output`; resumable, see the module docstring.

    `annotator_factory` is a picklable zero-argument callable returning an unloaded annotator.
    `image_output` is how image members are stored (datagen.images); `shard_name_width` the digits
    of shard names (img2dataset's 5 by default). `register=False` skips the catalog (the shards are
    complete without it).
    """
    started = time.time()
    if workers < 1:
        raise UserError("must be at least 1", field="--workers")
    out = Path(output)
    probe = annotator_factory()  # unloaded: only asked for its name and generator info
    if shard_name_width < 1:
        raise UserError("must be at least 1", field="--shard-name-width")
    # the image settings are part of what made a shard: changing them redoes it (input_digest)
    generator = {"name": probe.name, **probe.generator_info(),
                 "image_format": image_output.format, "encode_quality": image_output.quality}
    refs = list(iter_refs(input, input_format, work_dir=out / DOWNLOAD_DIR))
    if limit is not None:
        refs = refs[:limit]
    if not refs:
        raise UserError("no input images found", file=input)
    shards = plan_shards(refs, shard_size)
    out.mkdir(parents=True, exist_ok=True)
    clean_temporaries(out)
    removed = _remove_shards(out, keep_below=0 if overwrite else len(shards), digits=shard_name_width)
    if removed:
        why = "--overwrite" if overwrite else "left over from an earlier run"
        log.info(f"removed {len(removed)} shard(s) ({why}): indices {removed[0]}..{removed[-1]}")
    digests = [input_digest(s, generator) for s in shards]
    pending = [i for i in range(len(shards)) if not shard_done(out, i, digests[i], shard_name_width)]
    result = JobResult(out, len(shards), len(pending), len(shards) - len(pending), generator=generator)
    log.info(f"{len(refs)} samples in {len(shards)} shard(s); {len(pending)} to do, {result.shards_skipped} done")

    if pending:
        _run_pending(shards, pending, digests, out, annotator_factory, generator, result,
                     ray_address=ray_address, workers=workers, limits=limits, image_output=image_output,
                     digits=shard_name_width, batch_size=batch_size, cpus_per_worker=cpus_per_worker,
                     gpus_per_worker=gpus_per_worker)
    if register:
        from blip3.core.catalog import Catalog

        with Catalog(catalog_db) as cat:
            result.source = cat.add_output(out, source=source_name, kind="caption").source
    result.duration_s = round(time.time() - started, 3)
    return result


def _run_pending(
    shards: list[list[SampleRef]], pending: list[int], digests: list[str], out: Path,
    factory: AnnotatorFactory, generator: dict[str, Any], result: JobResult, *, ray_address: str | None,
    workers: int, limits: ImageLimits, image_output: ImageOutput, digits: int, batch_size: int,
    cpus_per_worker: float, gpus_per_worker: float,
) -> None:
    import ray.data

    started_here = connect_ray(ray_address, workers)
    try:
        _configure_ray_data()
        reasons: Counter[str] = Counter()
        total = sum(len(shards[i]) for i in pending)
        with progress() as bar:
            task = bar.add_task(f"{generator['name']} -> {out.name}", total=total)
            for window in _windows(pending, shards):
                items = [{"shard": i, "pos": j, "ref": ref.to_json()} for i in window for j, ref in enumerate(shards[i])]
                ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))
                ds = ds.map_batches(
                    AnnotateActor,
                    fn_constructor_kwargs={"factory": factory, "limits": limits, "output": image_output},
                    batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus_per_worker,
                    **({"num_gpus": gpus_per_worker} if gpus_per_worker else {}),
                )
                buffers: dict[int, list[dict[str, Any]]] = defaultdict(list)
                for row in ds.iter_rows():
                    shard = int(row["shard"])
                    buffers[shard].append(row)
                    bar.advance(task)
                    if len(buffers[shard]) == len(shards[shard]):
                        _write_shard(out, shard, buffers.pop(shard), generator, digests[shard], result, reasons,
                                     digits)
                if buffers:  # rows missing: a programming error upstream, never a silent partial shard
                    raise RuntimeError(f"incomplete shards after the run: {sorted(buffers)}")
        result.failure_reasons = dict(sorted(reasons.items()))
    finally:
        if started_here:
            ray.shutdown()


def _windows(pending: list[int], shards: list[list[SampleRef]]) -> Iterator[list[int]]:
    """Pending shards in groups of about WINDOW_SAMPLES inputs: the driver never holds the refs of a
    whole large job in one Ray dataset; each window restarts the actor pool (one model load per window)."""
    window: list[int] = []
    count = 0
    for i in pending:
        window.append(i)
        count += len(shards[i])
        if count >= WINDOW_SAMPLES:
            yield window
            window, count = [], 0
    if window:
        yield window


def _write_shard(out: Path, index: int, rows: list[dict[str, Any]], generator: dict[str, Any], digest: str,
                 result: JobResult, reasons: Counter[str], digits: int = SHARD_DIGITS) -> None:
    rows.sort(key=lambda r: int(r["pos"]))
    with ShardWriter(out, index, generator=generator, digits=digits) as w:
        for r in rows:
            sample_row = SampleRow(**json.loads(r["row"]))
            if r["ok"]:
                members = {str(r["ext"]): bytes(r["image"]), "txt": str(r["txt"]), "json": str(r["json"])}
                w.add(sample_row.key, members, sample_row)
            else:
                w.add_failure(sample_row)
        info = w.close(extra_stats={"input_digest": digest})
    result.samples += info.count
    result.successes += info.successes
    result.failed += info.failed
    reasons.update(info.failure_reasons)
