"""One datagen pipeline for every annotator, on Ray Data: read -> decode -> annotate -> record -> write.

    input (streamed, stable order) --datagen.plans--> shard plans 0..n-1, one at a time
      --skip finished ones--> each plan put into Ray's object store as it is listed (the driver
      keeps the reference) --> a `ray.data.Dataset` (`build_dataset`) whose rows are plans
      (`datagen.plan_source`), each read inside the first stage:
        an annotator with an accelerator (GPUs, or a custom resource) -- three stages:
          decode_shards   CPU tasks: read (a URL list's rows are fetched here), decode + validate
          AnnotateShards  an actor pool (`workers` actors, one annotator each, loaded once; the
                          job's CPUs/GPUs/custom resources per actor): the model's step only
          write_shards    CPU tasks: caption, record, tar + parquet + stats straight into the
                          output, atomically; the shard's stats are the row that comes back
        any other annotator (a CPU engine) -- one stage:
          ProcessShards   an actor pool doing the same steps in each actor, one shard at a time
      --> the driver, as rows stream back: catalog.BatchRegistrar registers them in batches (the
      driver is the only catalog writer), then catalog.add_output at the end for the shards done
      before

Why this shape:
- Rows are whole shards, not images: the framework's cost (Arrow, the object store, scheduling)
  is per shard, and a sample's bytes move between stages once, in its shard's row. Measured
  against one row per image in docs/planning.md.
- Workers write: image bytes never travel back to the driver, which only plans and collects
  counts; so adding nodes adds write throughput, and with `--ray-address` the tars land where the
  output says, not on the client.
- On an accelerator the model's stage only annotates: the decode tasks keep it fed while it runs.
  A CPU engine shares the CPUs with decode and write anyway, so its job is one stage: apart, each
  shard's pixels would be pickled, turned into Arrow and copied between stages, which measured
  tripled the CPU per image of a cheap annotator (docs/planning.md).
- Determinism and resume: shard `i` always holds input samples `i*S .. i*S+S-1` and members are
  written in that order, so the tars are byte-identical across runs however Ray schedules the
  work. A shard counts as done when its stats exist, the tar has the recorded size (the sha256 is
  trusted from the stats, computed while writing; `verify=True` re-reads it) and its stats carry
  the same `input_digest`; a killed run leaves only temporaries, removed on the next start.
- Object stores (`s3://`, `gs://`, any fsspec URL; core.storage): a write task writes its shard to
  a local temporary folder exactly as above, then uploads tar, parquet and, last, the stats
  object; resume reads the stats and sizes from the store. The tars are the bytes of a local run.
- Fault tolerance is Ray Data's: a worker process that dies mid-shard has its actor restarted (or
  its task retried) and the shard's stage run again; a node lost mid-job has its stages' work
  redone elsewhere. A retry writes the same bytes under a fresh temporary name and the shard is
  published once. A stage that fails on a shard (an exception, not a dead process) returns the
  shard with its reason; the driver names it after the others are written.

The steps of one sample (`decode_step`, `annotate_step`, `record_step`) and the shard writer
(`publish_shard`) are also what `blip3.datagen.ray` runs inside a user's own Ray Data pipeline.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain, repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from blip3.core.errors import UserError, describe_exception, environment_error
from blip3.core.logs import get_logger, progress, progress_enabled
from blip3.core.shards import SHARD_DIGITS, SampleRow, ShardWriter, shard_name
from blip3.core.storage import Location, as_location, output_location, storage_environment
from blip3.datagen.annotator import Annotation, AnnotatorConfig, SkipSample
from blip3.datagen.fetch import DownloadOptions, fetch_in_order
from blip3.datagen.images import DecodedImage, ImageLimits, ImageOutput, ImageRejected, decode_image
from blip3.datagen.inputs import InputSample, SampleRef, TarCount, TarSource, check_output_outside_input, load_sample
from blip3.datagen.plans import ShardPlan, TarCounter, count_tars_on_ray, job_plans

if TYPE_CHECKING:
    from blip3.core.catalog import BatchRegistrar
    from blip3.datagen.plan_source import PlanRef

log = get_logger("datagen")
DEFAULT_SHARD_SIZE = 1000

@dataclass
class JobResult:
    """What a job did; `failure_reasons` counts the failed samples of the shards it wrote."""

    output: Location
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
        """One plain line for the engines' commands: shards, outcomes, failures by reason, time and
        throughput (images of the shards written per second of the whole job), source."""
        reasons = ", ".join(f"{k}: {v}" for k, v in self.failure_reasons.items())
        rate = f" ({self.samples / self.duration_s:.1f} images/s)" if self.samples and self.duration_s > 0 else ""
        return (f"{self.shards_written} shard(s) written, {self.shards_skipped} {skipped_as}; "
                f"{self.successes} ok, {self.failed} failed{f' ({reasons})' if reasons else ''}; "
                f"{self.duration_s:.1f}s{rate}" + (f"; catalog source {self.source}" if self.source else ""))


# -- one sample, no Ray: read -> decode + validate | annotate | record -----------------------------
@dataclass
class Processed:
    """One sample on its way through the steps, and its outcome.

    `row` is its sidecar row (failed, with the reason, as soon as a step fails). Between the steps it
    carries what the next one needs: `sample` (the input's metadata, its bytes dropped once decoded)
    and `decoded` (the upright RGB image and the bytes to store) after `decode_step`; `annotation`
    after `annotate_step` (the pixels are dropped then: only the stored bytes travel on); `members`
    (the tar members) after `record_step`."""

    row: SampleRow
    members: dict[str, bytes | str] | None = None
    sample: InputSample | None = None
    decoded: DecodedImage | None = None
    annotation: Annotation | None = None

    @property
    def ok(self) -> bool:
        return self.row.status != "failed"

    def fail(self, error: str) -> "Processed":
        self.row.status, self.row.error_message = "failed", error
        self.sample = self.decoded = self.annotation = self.members = None
        return self


def decode_step(ref: SampleRef, limits: ImageLimits, output: ImageOutput = ImageOutput(),
                sample: InputSample | None = None) -> Processed:
    """Read `ref` (or take its `sample`, already fetched), decode and validate it: CPU work, no model."""
    item = Processed(SampleRow(key=ref.key, uid=ref.uid, url=ref.url, has_source_caption=bool(ref.source_caption)))
    if ref.error:
        return item.fail(ref.error)
    try:
        sample = sample or load_sample(ref)
    except OSError as e:
        return item.fail(f"read: {e}")
    if sample.error:  # a URL that could not be fetched
        return item.fail(sample.error)
    return decode_sample(item, sample, limits, output)


def decode_sample(item: Processed, sample: InputSample, limits: ImageLimits, output: ImageOutput) -> Processed:
    """Decode the bytes of `sample` into `item` (the step's half that does not read)."""
    try:
        decoded = decode_image(sample.image, limits, output)
    except ImageRejected as e:
        return item.fail(e.error)
    row = item.row
    row.original_width, row.original_height = decoded.orig_width, decoded.orig_height
    row.width, row.height = decoded.width, decoded.height
    sample.image = b""  # the stored bytes are `decoded.data`; the input's need not travel on
    item.sample, item.decoded = sample, decoded
    return item


def annotate_step(item: Processed, annotator) -> Processed:
    """The model's step: annotate the decoded image; its pixels are dropped afterwards."""
    if not item.ok:
        return item
    assert item.decoded is not None and item.sample is not None
    try:
        item.annotation = annotator.annotate(item.decoded.image, item.sample)
    except SkipSample as e:
        return item.fail(e.error)
    except Exception as e:  # an engine crash on one image must not stop the job; recorded with reason
        return item.fail(f"annotate: {describe_exception(e)[:200]}")
    item.decoded.image = None  # type: ignore[assignment]  # pixels stay in the model's stage
    return item


def annotate_steps(items: list[Processed], annotator) -> list[Processed]:
    """`annotate_step` over several samples (a shard's): one `annotate_batch` call for the good ones
    when the annotator has it (a VLM batches its `generate`, datagen/annotator.py), else one
    `annotate` each. A batch that raises is redone one sample at a time, so one bad image fails
    alone, with its reason."""
    batch = getattr(annotator, "annotate_batch", None)
    todo = [item for item in items if item.ok]
    if batch is None or not todo:
        return [annotate_step(item, annotator) for item in items]
    try:
        outcomes = batch([item.decoded.image for item in todo],  # type: ignore[union-attr]
                         [item.sample for item in todo])
    except Exception:
        return [annotate_step(item, annotator) for item in items]
    for item, outcome in zip(todo, outcomes, strict=True):
        if isinstance(outcome, SkipSample):
            item.fail(outcome.error)
        else:
            item.annotation = outcome
            item.decoded.image = None  # type: ignore[union-attr,assignment]  # pixels stay in the model's stage
    return items


def record_step(item: Processed, generator: dict[str, Any]) -> Processed:
    """Caption, record and sidecar row of an annotated sample: its tar members (`item.members`).
    `generator` (the annotator's `generator_info()`) goes into the record."""
    if not item.ok:
        return item
    row, sample, decoded, ann = item.row, item.sample, item.decoded, item.annotation
    assert sample is not None and decoded is not None and ann is not None
    record: dict[str, Any] = {
        "key": row.key,
        "uid": row.uid,
        "url": row.url,
        "width": row.width,
        "height": row.height,
        "source_caption": sample.source_caption,
        **({"source_path": sample.meta["path"]} if "path" in sample.meta else {}),  # lineage of folder inputs
        "captions": ann.captions,
        "metadata": ann.metadata,
        **ann.record,
        "generator": generator,
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
    item.members = {decoded.ext: decoded.data, "txt": ann.default_caption,
                    "json": json.dumps(record, ensure_ascii=False)}
    item.sample = item.decoded = item.annotation = None
    return item


def process_ref(ref: SampleRef, annotator, limits: ImageLimits, generator: dict[str, Any] | None = None,
                output: ImageOutput = ImageOutput(), sample: InputSample | None = None) -> Processed:
    """The three steps in one call; a failure comes back as a row with its reason. `generator` goes
    into the record (None: the annotator's `generator_info()`); `output` says how the image member
    is stored; `sample` is the ref's sample when already loaded (a URL fetched ahead)."""
    item = annotate_step(decode_step(ref, limits, output, sample), annotator)
    return record_step(item, generator if generator is not None else annotator.generator_info())


# -- one shard, no Ray: plan -> tar + parquet + stats ------------------------------------------
def decode_plan(plan: ShardPlan, limits: ImageLimits, output: ImageOutput = ImageOutput(),
                download: DownloadOptions = DownloadOptions()) -> list[Processed]:
    """`decode_step` over a plan's refs, in order. The shard's URLs are fetched here,
    `download.threads` at a time (results kept in input order, so the tar's bytes do not depend on
    which answer came first)."""
    urls = any(ref.locator[0] == "url" for ref in plan.refs)
    fetched = (fetch_in_order(plan.refs, lambda ref: _fetch_ahead(ref, download), download.threads) if urls
               else repeat(None))
    return [decode_step(ref, limits, output, sample) for ref, sample in zip(plan.refs, fetched)]


def publish_shard(out: str | Path | Location, index: int, items: Iterable[Processed], generator: dict[str, Any],
                  extra_stats: dict[str, Any] | None = None, digits: int = SHARD_DIGITS) -> dict[str, Any]:
    """Write recorded samples as shard `index` (tar + parquet + stats, atomically; an object-store
    `out` gets it written locally, then uploaded, stats last: `core.shards.ShardWriter` over a
    `core.storage.Location`) and return its stats: all the driver needs. `generator` goes into the
    stats."""
    with ShardWriter(out, index, generator=generator, digits=digits) as w:
        for item in items:
            if item.ok:
                w.add(item.row.key, item.members, item.row)  # type: ignore[arg-type]
            else:
                w.add_failure(item.row)
        info = w.close(extra_stats=extra_stats)
    return {"index": info.index, "count": info.count, "successes": info.successes, "failed": info.failed,
            "failure_reasons": info.failure_reasons, "sha256": info.sha256, "tar_bytes": info.tar_bytes}


def write_shard(out: str | Path | Location, plan: ShardPlan, annotator, limits: ImageLimits, generator: dict[str, Any],
                record_generator: dict[str, Any] | None = None, output: ImageOutput = ImageOutput(),
                digits: int = SHARD_DIGITS, download: DownloadOptions = DownloadOptions()) -> dict[str, Any]:
    """A whole shard in this process, the job's three steps one after the other (what each actor
    of a one-stage job runs, `ProcessShards`; the reference a staged job's bytes are compared
    with): returns its stats. `generator` goes into the
    stats, `record_generator` into each sample's json; `output` is how images are stored, `digits`
    the width of the shard's name."""
    record_generator = record_generator if record_generator is not None else annotator.generator_info()
    items = (record_step(item, record_generator)
             for item in annotate_steps(decode_plan(plan, limits, output, download), annotator))
    return publish_shard(out, plan.index, items, generator, {"input_digest": plan.digest}, digits)


def _fetch_ahead(ref: SampleRef, download: DownloadOptions) -> InputSample | None:
    """A URL ref's sample (fetched on a download thread); other refs are read when processed."""
    return load_sample(ref, download) if ref.locator[0] == "url" and not ref.error else None


# -- resume -----------------------------------------------------------------------------------
def shard_done(out: str | Path | Location, index: int, digest: str, *, verify: bool = False,
               digits: int = SHARD_DIGITS) -> bool:
    """A finished shard of the same inputs and settings; its sha256 is re-read only with `verify`."""
    out, name = as_location(out), shard_name(index, digits)
    stats = out.stats(name)
    return (stats is not None and stats.get("input_digest") == digest
            and out.is_complete(name, verify_checksum=verify, stats=stats))


def _remove_shards(out: str | Path | Location, keep_below: int = 0, digits: int = SHARD_DIGITS) -> list[int]:
    """Delete every published shard whose index is `keep_below` or more, or whose name has another
    width than `digits`; returns the removed indices. Such shards are left over from a run with
    another `--shard-size`, a larger `--limit` or another `--shard-name-width`: kept, they would be
    catalogued and exported twice."""
    return as_location(out).remove_shards(keep_below, digits)


@dataclass(frozen=True)
class JobOptions:
    """How a datagen job runs and writes its shards, whatever its annotator: the one object that
    travels from `blip3 ocr` / `blip3 ground` through `run_ocr` / `ground` to `run_job`, so a
    setting has one name on the way (`db`, `source`) and is declared once."""

    input_format: str | None = None  # folder | webdataset | img2dataset | urls | blip3-ocr (None: detect)
    workers: int = 2  # annotation actors, each loading its annotator once
    ray_address: str | None = None  # join this cluster (None: our own local one)
    shard_size: int = DEFAULT_SHARD_SIZE
    overwrite: bool = False  # redo every shard (else finished ones are skipped)
    db: str | Path | None = None  # catalog file (None: $BLIP3_DB or ./catalog.duckdb)
    source: str | None = None  # catalog source name (None: the output folder's name)
    limit: int | None = None  # only the first N inputs
    register: bool = True  # register the shards in the catalog, batch by batch as they finish
    verify: bool = False  # re-hash finished shards before skipping them
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    resources: dict[str, float] | None = None  # custom Ray resources per annotation actor (e.g. {"TPU": 1})
    limits: ImageLimits = ImageLimits()
    image_output: ImageOutput = ImageOutput()  # how image members are stored (datagen.images)
    shard_name_width: int = SHARD_DIGITS  # digits of shard names (img2dataset's 5)
    download: DownloadOptions = DownloadOptions()  # how shard tasks fetch the rows of a URL list
    storage_options: dict[str, Any] | None = None  # fsspec arguments of an object-store output or URL list


# -- the job ----------------------------------------------------------------------------------
def run_job(
    input: str | Path,
    output: str | Path,
    annotator_factory: AnnotatorConfig,
    job: JobOptions = JobOptions(),
) -> JobResult:
    """Annotate `input` into caption shards in `output`; resumable, see the module docstring.

    `annotator_factory` is the engine's config (datagen.annotator.AnnotatorConfig), which each actor
    calls once to build its annotator; `job`
    says how the job runs and writes (JobOptions). `output` may be any fsspec URL
    (`s3://bucket/prefix`, with `job.storage_options` for its filesystem), catalogued by its URL.
    """
    started = time.time()
    if job.workers < 1:
        raise UserError("must be at least 1", field="--workers")
    out = output_location(output, job.storage_options)
    check_output_outside_input(input, out)
    probe = annotator_factory()  # unloaded: only asked for its name and generator info
    if job.shard_name_width < 1:
        raise UserError("must be at least 1", field="--shard-name-width")
    job.download.check()
    from blip3.core.ray_session import check_reachable

    check_reachable(job.ray_address)  # a dead address is one line now, not minutes of Ray's retries
    # the image settings are part of what made a shard: changing them redoes it (input_digest)
    generator = {"name": probe.name, **probe.generator_info(),
                 "image_format": job.image_output.format, "encode_quality": job.image_output.quality}
    with contextlib.ExitStack() as session:
        def ray_up() -> None:
            """Ray starts when first needed (and stays up for the job): to count a tar input's tars,
            else at the first shard left to write; a job with every shard done never starts it."""
            from blip3.core.ray_session import ray_session

            import ray

            if not ray.is_initialized():
                session.enter_context(ray_session(job.ray_address, num_cpus=_local_cpus(job)))

        def count_tars(tars: Sequence[TarSource], every: int) -> list[TarCount]:
            ray_up()
            return count_tars_on_ray(tars, every)

        # one job writes a folder at a time (core.storage.WriterLock): a second one is refused here
        session.enter_context(out.lock(f"{probe.name} {input}"))
        return _plan_and_run(input, out, annotator_factory, generator, job, started, count_tars, ray_up)


def _local_cpus(job: JobOptions) -> int:
    """CPUs of a local cluster started for the job: those the annotation actors ask for, plus, for
    a staged job, the machine's for the read and write stages. No more: Ray starts a worker process
    per CPU up front, and each idle one costs CPU for as long as the job runs."""
    actors = math.ceil(job.workers * job.cpus_per_worker)
    return actors + (os.cpu_count() or 1) if staged(job) else max(1, actors)


def _plan_and_run(input: str | Path, out: Location, annotator_factory: AnnotatorConfig,
                  generator: dict[str, Any], job: JobOptions, started: float, count_tars: TarCounter,
                  ray_up: Callable[[], None]) -> JobResult:
    plans = job_plans(str(input), job.input_format, job.shard_size, generator, limit=job.limit,
                      storage_options=job.storage_options, count_tars=count_tars)
    first = next(plans, None)
    if first is None:
        raise UserError("no input images found", file=input)
    out.mkdir()
    out.clean_temporaries()
    if job.overwrite:
        _remove_shards(out, digits=job.shard_name_width)
    result = JobResult(out, 0, 0, 0, generator=generator)
    reasons: Counter[str] = Counter()

    # the input is listed, and finished shards re-hashed (--verify), first: each of these long steps
    # has its own bar row; each plan left to write goes into Ray's object store as it is listed (the
    # driver keeps a reference); then Ray Data shows each stage's progress as the shards are written
    blocks: dict[int, PlanRef] = {}  # shard index -> its plan in the object store
    with progress() as bar:
        listed = bar.add_task(f"{Path(str(input)).name}: inputs listed", total=None)
        rehashed = bar.add_task("finished shards re-hashed (--verify)", total=None) if job.verify else None

        def pending() -> Iterator[ShardPlan]:
            for plan in chain([first], plans):
                result.shards_total += 1
                bar.advance(listed, plan.size)  # not len(plan.refs): that would read a tar plan's tars here
                done = shard_done(out, plan.index, plan.digest, verify=job.verify, digits=job.shard_name_width)
                if rehashed is not None:
                    bar.advance(rehashed)
                if done:
                    result.shards_skipped += 1
                else:
                    yield plan

        for plan in pending():
            if not blocks:
                ray_up()
                from blip3.datagen.plan_source import put_plan
            blocks[plan.index] = put_plan(plan)
    if blocks:
        from blip3.core.catalog import BatchRegistrar

        registrar = (BatchRegistrar(job.db, out, source=job.source, digits=job.shard_name_width)
                     if job.register else None)
        _run_plans(blocks, out, annotator_factory, generator, result, reasons, job, registrar)
    result.failure_reasons = dict(sorted(reasons.items()))
    out.clean_temporaries()  # of workers killed mid-shard (their shard was retried and published)
    removed = _remove_shards(out, keep_below=result.shards_total, digits=job.shard_name_width)
    if removed:
        log.info(f"removed {len(removed)} shard(s) left over from an earlier run: indices {removed[0]}..{removed[-1]}")
    log.info(f"{result.shards_total} shard(s): {result.shards_written} written, {result.shards_skipped} done before")
    if job.register:  # the shards done before, and a last partial batch
        from blip3.core.catalog import Catalog

        with Catalog(job.db) as cat:
            result.source = cat.add_output(str(out), source=job.source, kind="caption",
                                           storage_options=job.storage_options).check().source
    result.duration_s = round(time.time() - started, 3)
    return result


@dataclass
class _Shard:
    """One shard between the job's stages (pickled into one row): its samples, or why a stage failed
    on it (`error`; `environment`: a full disk or an unwritable output, which every other shard
    would meet too, so the job stops with that line)."""

    index: int
    digest: str
    items: list[Processed] | None = None
    stats: dict[str, Any] | None = None
    error: str | None = None
    environment: str | None = None

    def failed(self, e: Exception) -> "_Shard":
        full = environment_error(e)
        self.items, self.environment = None, (str(full) if full is not None else None)
        self.error = describe_exception(e)[:200]
        return self


def _rows(shards: Sequence[_Shard]) -> dict[str, Any]:
    """A batch of shard rows: the index, and the pickled shard (one Arrow binary cell: no per-image
    rows or columns, so the framework's cost is per shard, not per image)."""
    import numpy as np

    return {"index": np.array([s.index for s in shards], dtype=np.int64),
            "shard": np.array([pickle.dumps(s, protocol=5) for s in shards], dtype=object)}


def _shards(batch: dict[str, Any]) -> list[_Shard]:
    return [pickle.loads(blob) for blob in batch["shard"]]


def decode_shards(batch: dict[str, Any], limits: ImageLimits, output: ImageOutput,
                  download: DownloadOptions) -> dict[str, Any]:
    """Stage 1 of a staged job (CPU tasks): plan rows -> the shards' samples read (URLs fetched),
    decoded and validated; pixels and stored bytes travel on to the model's stage, failures as rows
    with their reason."""
    shards = []
    for blob in batch["shard"]:
        plan: ShardPlan = pickle.loads(blob)
        shard = _Shard(plan.index, plan.digest)
        try:
            shard.items = decode_plan(plan, limits, output, download)
        except Exception as e:  # an unreadable tar range, a store gone: this shard fails, the job goes on
            shard.failed(e)
        shards.append(shard)
    return _rows(shards)


#: starts of one shard in an engine's actor after which its next start fails it instead (`ShardAttempts`)
MAX_ATTEMPTS = 3


class ShardAttempts:
    """How often the engine's actors have started each shard: one small actor per job (no CPU).

    A process that dies in a shard (a native crash in an engine on one hostile image, an
    out-of-memory kill) is restarted by Ray Data and the shard retried, without end; a lost node's
    shards are retried the same way. After `MAX_ATTEMPTS` starts the next one fails the shard with
    that reason instead, so the job writes the others and then names it."""

    def __init__(self) -> None:
        self.started: Counter[int] = Counter()

    def start(self, index: int) -> int:
        self.started[index] += 1
        return self.started[index]


def _died_in(attempts: Any, index: int) -> str | None:
    """Why shard `index` is not to be started again (None: start it); `attempts` is the job's
    `ShardAttempts` actor (None outside a job: nothing to count)."""
    if attempts is None:
        return None
    import ray

    try:
        started = ray.get(attempts.start.remote(int(index)))
    except ray.exceptions.RayError:  # the counter itself gone (its node lost for good): not counted
        return None
    if started <= MAX_ATTEMPTS:
        return None
    return (f"the annotator's worker process died in this shard {started - 1} times (a crash in the engine "
            "on one of its images, or out of memory)")


class AnnotateShards:
    """Stage 2 (an actor pool: `--workers` actors, each loading its annotator once, with the
    job's CPUs/GPUs per actor): the model's step over each decoded sample of a shard."""

    def __init__(self, factory: AnnotatorConfig, attempts: Any = None):
        self.annotator = factory()
        self.annotator.load()
        self.attempts = attempts

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        shards = _shards(batch)
        for shard in shards:
            died = None if shard.items is None else _died_in(self.attempts, shard.index)
            if died:
                shard.items, shard.error = None, died
            annotate_steps(shard.items or [], self.annotator)
        return _rows(shards)


def write_shards(batch: dict[str, Any], out: str | Location, generator: dict[str, Any],
                 record_generator: dict[str, Any], digits: int) -> dict[str, Any]:
    """Stage 3 of a staged job (CPU tasks): caption and record each sample, write tar + parquet +
    stats straight to the output (atomically; an object store gets them uploaded, stats last); the
    row that goes back to the driver holds only the shard's stats."""
    shards = _shards(batch)
    for shard in shards:
        if shard.items is None:
            continue
        items = (record_step(item, record_generator) for item in shard.items)
        try:
            shard.stats = publish_shard(out, shard.index, items, generator, {"input_digest": shard.digest}, digits)
        except Exception as e:
            shard.failed(e)
        shard.items = None
    return _rows(shards)


class ProcessShards:
    """The one stage of a job whose annotator needs no accelerator (an actor pool: `--workers`
    actors, each loading its annotator once): decode, annotate, record and write each planned
    shard in the actor, so pixels never leave the process that decoded them; the row back to the
    driver holds only the shard's stats."""

    def __init__(self, factory: AnnotatorConfig, limits: ImageLimits, output: ImageOutput, download: DownloadOptions,
                 out: str | Location, generator: dict[str, Any], record_generator: dict[str, Any], digits: int,
                 attempts: Any = None):
        self.annotator = factory()
        self.annotator.load()
        self.limits, self.output, self.download = limits, output, download
        self.out, self.generator, self.record_generator, self.digits = out, generator, record_generator, digits
        self.attempts = attempts

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        shards = []
        for index, blob in zip(batch["index"], batch["shard"]):
            plan: ShardPlan = pickle.loads(blob)
            shard = _Shard(plan.index, plan.digest, error=_died_in(self.attempts, index))
            if shard.error is None:
                try:
                    shard.stats = write_shard(self.out, plan, self.annotator, self.limits, self.generator,
                                              self.record_generator, self.output, self.digits, self.download)
                except Exception as e:  # an unreadable tar range, an output that cannot be written
                    shard.failed(e)
            shards.append(shard)
        return _rows(shards)


def staged(job: JobOptions) -> bool:
    """Whether the job runs as three stages (decode tasks -> the model's actors -> write tasks) or
    one (`ProcessShards`). Apart only when the model's actors hold an accelerator (GPUs, or a custom
    resource standing for one), which the CPU stages then keep fed. A CPU engine shares the CPUs
    with decode and write either way, and apart its shard's pixels would be pickled, converted to
    Arrow and copied between the stages: measured, that tripled the CPU per image
    (docs/planning.md)."""
    return bool(job.gpus_per_worker or job.resources)


def _annotator_actors(job: JobOptions) -> int:
    """Actors of the annotation stage: `--workers`, less as many as the cluster's CPUs cannot hold
    (a staged job also leaves its read and write stages one CPU, else they would wait for ever);
    at least one."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    if job.cpus_per_worker <= 0:
        return job.workers
    fit = max(1, int((cpus - staged(job)) // job.cpus_per_worker))
    if fit < job.workers:
        log.info(f"{fit} annotator actor(s) of {job.workers}: the cluster has {cpus:g} CPUs"
                 + (", and the read and write stages need some" if staged(job) else ""))
    return min(job.workers, fit)


def build_dataset(plans: Sequence[PlanRef], out: Location, factory: AnnotatorConfig,
                  generator: dict[str, Any], job: JobOptions, attempts: Any = None):
    """The job as a `ray.data.Dataset` of one row per shard plan (`plans`, read by `PlanSource`); each
    output row is one finished shard's stats. An annotator holding an accelerator gets three
    stages, decode (CPU tasks) -> annotate (its actor pool) -> write (CPU tasks); any other runs
    decode, annotate and write in one actor pool (`staged`). Rows are shards, not images:
    measured, moving one row per image costs the framework far more (docs/planning.md).
    `attempts`: the job's `ShardAttempts` actor (its caller keeps it alive while the job runs)."""
    import ray.data

    from blip3.datagen.plan_source import PlanSource

    storage_env = storage_environment()  # an object-store output or input: workers reach it as we do
    env = {"runtime_env": {"env_vars": storage_env}} if storage_env else {}
    record_generator = factory().generator_info()
    resources = {"num_cpus": job.cpus_per_worker,
                 **({"num_gpus": job.gpus_per_worker} if job.gpus_per_worker else {}),
                 **({"resources": dict(job.resources)} if job.resources else {}), **env}
    # no more actors than shards: each one loads its engine, and Ray Data warns of idle ones
    actors = {"compute": ray.data.ActorPoolStrategy(size=min(_annotator_actors(job), len(plans))), **resources}
    cpu_task = {"num_cpus": 1, **env}
    # a plan's read asks for what its first stage asks for, and that stage takes whole blocks (one
    # plan each, `batch_size=None`), so Ray Data fuses the read into it: no task of its own, which
    # on a cluster whose CPUs the actors hold would never be scheduled
    split = staged(job)
    first = cpu_task if split else resources
    ds = ray.data.read_datasource(PlanSource(plans), override_num_blocks=len(plans), **first)
    if not split:
        return ds.map_batches(ProcessShards, fn_constructor_args=(
            factory, job.limits, job.image_output, job.download, out, generator, record_generator,
            job.shard_name_width, attempts), batch_size=None, batch_format="numpy", **actors)
    ds = ds.map_batches(decode_shards, fn_kwargs={"limits": job.limits, "output": job.image_output,
                                                  "download": job.download},
                        batch_size=None, batch_format="numpy", **cpu_task)
    ds = ds.map_batches(AnnotateShards, fn_constructor_args=(factory, attempts), batch_size=None, batch_format="numpy", **actors)
    return ds.map_batches(write_shards, fn_kwargs={"out": out,
                                                   "generator": generator, "record_generator": record_generator,
                                                   "digits": job.shard_name_width},
                          batch_size=None, batch_format="numpy", **cpu_task)


@contextlib.contextmanager
def _data_context() -> Iterator[None]:
    """Ray Data's settings for one job, restored after: a shard whose stage keeps failing is
    reported by the driver (which knows every shard it planned) after the others are written,
    rather than stopping the whole dataset; Ray Data's per-stage bars follow ours (off with
    BLIP3_NO_PROGRESS)."""
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    fields = ("max_errored_blocks", "enable_progress_bars", "enable_rich_progress_bars", "use_ray_tqdm")
    saved = {f: getattr(ctx, f) for f in fields}
    ctx.max_errored_blocks = -1
    ctx.enable_progress_bars = ctx.enable_progress_bars and progress_enabled()
    # Ray Data's rich bars: a row per stage (rows in and out, rate, its tasks and actors), on stderr
    ctx.enable_rich_progress_bars, ctx.use_ray_tqdm = True, False
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.WARNING)  # the execution plan and its own start/stop lines
    # with our progress off (BLIP3_NO_PROGRESS, a pipe) Ray Data warns once that its bars are off:
    # that was asked for, not a problem to report
    quiet = logging.getLogger("ray.data._internal.progress")
    quiet_level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(quiet_level)
        for f, value in saved.items():
            setattr(ctx, f, value)
        logger.setLevel(level)


def _run_plans(
    blocks: dict[int, PlanRef], out: Location, factory: AnnotatorConfig, generator: dict[str, Any], result: JobResult,
    reasons: Counter[str], job: JobOptions, registrar: BatchRegistrar | None = None,
) -> None:
    """Run the plans as one Ray Data dataset and collect each finished shard's stats as it streams
    back; `registrar` catalogues them batch by batch."""
    left = set(blocks)
    lost: list[str] = []
    with _data_context():
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # on the driver's node where it can be (a lost node must not take the counts with it), and
        # restarted if it goes all the same (its counts then start again)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        attempts = ray.remote(ShardAttempts).options(num_cpus=0, max_restarts=-1, max_task_retries=-1,
                                                     scheduling_strategy=here).remote()
        for row in build_dataset(list(blocks.values()), out, factory, generator, job, attempts).iter_rows():
            shard: _Shard = pickle.loads(row["shard"])
            left.discard(shard.index)
            if shard.environment:
                raise UserError(shard.environment)
            if shard.stats is None:
                lost.append(f"{shard.index}: {shard.error}")
                continue
            stats = shard.stats
            result.shards_written += 1
            result.samples += int(stats["count"])
            result.successes += int(stats["successes"])
            result.failed += int(stats["failed"])
            reasons.update(stats.get("failure_reasons", {}))
            if registrar is not None:
                registrar.add(shard.index)
    lost += [f"{i}: dropped by Ray Data (its log says why)" for i in sorted(left)]
    if lost:
        raise UserError(f"{len(lost)} shard(s) failed (re-run to retry them); "
                        f"first: shard {sorted(lost, key=lambda t: int(t.split(':')[0]))[0]}")
