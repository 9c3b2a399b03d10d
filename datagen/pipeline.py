"""One datagen pipeline for every annotator: read -> validate -> annotate -> caption -> write.

    input (streamed, stable order) --datagen.plans--> shard plans 0..n-1, one at a time
      --skip finished ones--> one actor pool for the whole job (one annotator per actor, loaded
      once), at most IN_FLIGHT_PER_WORKER plans queued per actor (back-pressure)
      --each actor call = one whole shard: read (a URL list's rows are fetched here), decode+validate,
      annotate, caption, write tar + parquet + stats straight to the output, atomically--> the
      shard's stats back to the driver
      --> catalog.BatchRegistrar: registered in batches as they finish (the driver is the only
      catalog writer), then catalog.add_output at the end for the shards done before

Why this shape:
- Workers write: image bytes never travel back to the driver, which only plans and collects
  counts; so adding nodes adds write throughput, and with `--ray-address` the tars land where the
  output says, not on the client. One call per shard keeps the framework's cost per shard, not
  per image.
- Determinism and resume: shard `i` always holds input samples `i*S .. i*S+S-1` and members are
  written in that order, so the tars are byte-identical across runs however Ray schedules the
  work. A shard counts as done when its stats exist, the tar has the recorded size (the sha256 is
  trusted from the stats, computed while writing; `verify=True` re-reads it) and its stats carry
  the same `input_digest`; a killed run leaves only temporaries, removed on the next start.
- Object stores (`s3://`, `gs://`, any fsspec URL; core.storage): a worker writes its shard to a
  local temporary folder exactly as above, then uploads tar, parquet and, last, the stats object;
  resume reads the stats and sizes from the store. The tars are the same bytes as a local run's.
- Fault tolerance: a worker process that dies mid-shard is restarted by Ray and the call retried
  (`max_task_retries`); the retry writes the same bytes under a fresh temporary name and the
  shard is published once. A node lost mid-job: its actors are restarted on other nodes, and the
  shards in flight there, whose calls Ray reports unreachable, are sent again by the driver.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import chain, repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from blip3.core.errors import UserError, describe_exception, environment_error
from blip3.core.logs import get_logger, progress
from blip3.core.shards import SHARD_DIGITS, SampleRow, ShardWriter, shard_name
from blip3.core.storage import Location, as_location, output_location, storage_environment
from blip3.datagen.annotator import AnnotatorConfig, SkipSample
from blip3.datagen.fetch import DownloadOptions, fetch_in_order
from blip3.datagen.images import ImageLimits, ImageOutput, ImageRejected, decode_image
from blip3.datagen.inputs import InputSample, SampleRef, TarCount, TarSource, check_output_outside_input, load_sample
from blip3.datagen.plans import ShardPlan, TarCounter, count_tars_on_ray, job_plans

if TYPE_CHECKING:
    from blip3.core.catalog import BatchRegistrar

log = get_logger("datagen")
DEFAULT_SHARD_SIZE = 1000
#: Plans queued per actor: one running, one waiting, so an actor never idles between shards
#: while the driver never holds more than 2 * workers shards of refs.
IN_FLIGHT_PER_WORKER = 2
#: Retries of a shard whose worker process died (the actor is restarted each time).
SHARD_RETRIES = 3
#: Sends of a shard whose actor could not be reached (its node lost), UNREACHABLE_WAIT_S apart:
#: long enough for Ray to declare the node dead and restart the actor on another one.
UNREACHABLE_RESENDS = 60
UNREACHABLE_WAIT_S = 1.0

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
        """One plain line for the engines' commands: shards, outcomes, failure reasons, time, source."""
        reasons = ", ".join(f"{k}: {v}" for k, v in self.failure_reasons.items())
        return (f"{self.shards_written} shard(s) written, {self.shards_skipped} {skipped_as}; "
                f"{self.successes} ok, {self.failed} failed{f' ({reasons})' if reasons else ''}; {self.duration_s:.1f}s"
                + (f"; catalog source {self.source}" if self.source else ""))


# -- one sample, no Ray: read -> validate -> annotate -> pack ---------------------------------
@dataclass
class Processed:
    """One sample's outcome: its sidecar row, and its tar members when it succeeded."""

    row: SampleRow
    members: dict[str, bytes | str] | None = None

    @property
    def ok(self) -> bool:
        return self.members is not None


def process_ref(ref: SampleRef, annotator, limits: ImageLimits, generator: dict[str, Any] | None = None,
                output: ImageOutput = ImageOutput(), sample: InputSample | None = None) -> Processed:
    """Run one sample through the steps; a failure comes back as a row with its reason.

    `generator` (the annotator's `generator_info()`, computed once per actor) goes into the record;
    `output` says how the image member is stored; `sample` is the ref's sample when already loaded
    (a URL fetched ahead, see `write_shard`).
    """
    row = SampleRow(key=ref.key, uid=ref.uid, url=ref.url, has_source_caption=bool(ref.source_caption))

    def failed(error: str) -> Processed:
        row.status, row.error_message = "failed", error
        return Processed(row)

    if ref.error:
        return failed(ref.error)
    try:
        sample = sample or load_sample(ref)
    except OSError as e:
        return failed(f"read: {e}")
    if sample.error:  # a URL that could not be fetched
        return failed(sample.error)
    try:
        decoded = decode_image(sample.image, limits, output)
    except ImageRejected as e:
        return failed(e.error)
    row.original_width, row.original_height = decoded.orig_width, decoded.orig_height
    row.width, row.height = decoded.width, decoded.height
    try:
        ann = annotator.annotate(decoded.image, sample)
    except SkipSample as e:
        return failed(e.error)
    except Exception as e:  # an engine crash on one image must not stop the job; recorded with reason
        return failed(f"annotate: {describe_exception(e)[:200]}")
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
    return Processed(row, {decoded.ext: decoded.data, "txt": ann.default_caption,
                           "json": json.dumps(record, ensure_ascii=False)})


# -- one shard, no Ray: plan -> tar + parquet + stats ------------------------------------------
def write_shard(out: str | Path | Location, plan: ShardPlan, annotator, limits: ImageLimits, generator: dict[str, Any],
                record_generator: dict[str, Any] | None = None, output: ImageOutput = ImageOutput(),
                digits: int = SHARD_DIGITS, download: DownloadOptions = DownloadOptions()) -> dict[str, Any]:
    """Process every sample of `plan` in order and publish the shard; returns its stats (counts,
    sha256, failure reasons), all the driver needs. `generator` goes into the stats,
    `record_generator` into each sample's json; `output` is how images are stored, `digits` the
    width of the shard's name. The shard's URLs are fetched here, `download.threads` at a time
    ahead of the annotator (results kept in input order, so the tar's bytes do not depend on
    which answer came first). An object-store `out` gets the shard written locally, then uploaded
    (`core.shards.ShardWriter` over a `core.storage.Location`)."""
    urls = any(ref.locator[0] == "url" for ref in plan.refs)
    fetched = (fetch_in_order(plan.refs, lambda ref: _fetch_ahead(ref, download), download.threads) if urls
               else repeat(None))
    with ShardWriter(out, plan.index, generator=generator, digits=digits) as w:
        for ref, sample in zip(plan.refs, fetched):
            res = process_ref(ref, annotator, limits, record_generator, output, sample)
            if res.ok:
                w.add(res.row.key, res.members, res.row)
            else:
                w.add_failure(res.row)
        info = w.close(extra_stats={"input_digest": plan.digest})
    return {"index": info.index, "count": info.count, "successes": info.successes, "failed": info.failed,
            "failure_reasons": info.failure_reasons, "sha256": info.sha256, "tar_bytes": info.tar_bytes}


def _fetch_ahead(ref: SampleRef, download: DownloadOptions) -> InputSample | None:
    """A URL ref's sample (fetched on a download thread); other refs are read when processed."""
    return load_sample(ref, download) if ref.locator[0] == "url" and not ref.error else None


class ShardWorker:
    """A Ray actor: one annotator, loaded once, writing whole shards."""

    def __init__(self, factory: AnnotatorConfig, limits: ImageLimits, output: ImageOutput = ImageOutput(),
                 digits: int = SHARD_DIGITS, download: DownloadOptions = DownloadOptions()):
        self.annotator = factory()
        self.annotator.load()
        self.limits = limits
        self.output = output
        self.digits = digits
        self.download = download
        self.record_generator = self.annotator.generator_info()

    def write(self, out: Location, plan: ShardPlan, generator: dict[str, Any]) -> dict[str, Any]:
        return write_shard(out, plan, self.annotator, self.limits, generator, self.record_generator, self.output,
                           self.digits, self.download)


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
    workers: int = 2  # actors, each loading its annotator once
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
    # the image settings are part of what made a shard: changing them redoes it (input_digest)
    generator = {"name": probe.name, **probe.generator_info(),
                 "image_format": job.image_output.format, "encode_quality": job.image_output.quality}
    with contextlib.ExitStack() as session:
        def count_tars(tars: Sequence[TarSource], every: int) -> list[TarCount]:
            """Tars are counted by tasks on the cluster, so Ray starts here for a tar input (and stays
            up for the shards); any other input is planned before Ray starts."""
            from blip3.core.ray_session import ray_session

            session.enter_context(ray_session(job.ray_address, num_cpus=_local_cpus(job)))
            return count_tars_on_ray(tars, every)

        # one job writes a folder at a time (core.storage.WriterLock): a second one is refused here
        session.enter_context(out.lock(f"{probe.name} {input}"))
        return _plan_and_run(input, out, annotator_factory, generator, job, started, count_tars)


def _local_cpus(job: JobOptions) -> int:
    """CPUs of a local cluster started for the job: the machine's, or more if the workers ask for more."""
    return max(math.ceil(job.workers * job.cpus_per_worker), os.cpu_count() or 1)


def _plan_and_run(input: str | Path, out: Location, annotator_factory: AnnotatorConfig,
                  generator: dict[str, Any], job: JobOptions, started: float, count_tars: TarCounter) -> JobResult:
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

    # the input is listed, and finished shards re-hashed (--verify), as the shards are dispatched:
    # each of these long steps has its own bar row, next to the job's
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

        todo = pending()
        nxt = next(todo, None)
        if nxt is not None:
            from blip3.core.catalog import BatchRegistrar

            registrar = (BatchRegistrar(job.db, out, source=job.source, digits=job.shard_name_width)
                         if job.register else None)
            _run_plans(chain([nxt], todo), out, annotator_factory, generator, result, reasons, job, registrar)
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


class _Resends:
    """Sends of each shard whose actor could not be reached: a lost node has UNREACHABLE_RESENDS
    sends of each of its shards (UNREACHABLE_WAIT_S apart) to be replaced, then the shard is lost."""

    def __init__(self) -> None:
        self.sent: Counter[int] = Counter()

    def again(self, index: int) -> bool:
        """Shard `index` was unreachable once more: True while it may be sent again."""
        self.sent[index] += 1
        return self.sent[index] <= UNREACHABLE_RESENDS


def _failure_detail(e: BaseException) -> str:
    """What the job's error line says of a lost shard: the worker's own exception when Ray carries
    it (`cause`), else the first line of Ray's message (the rest is a traceback or actor details)."""
    cause = getattr(e, "cause", None)  # the worker's own exception, not Ray's header
    detail = describe_exception(cause) if cause is not None else str(e).strip().splitlines()[0]
    return detail[:200]


def _run_plans(
    plans: Iterator[ShardPlan], out: Location, factory: AnnotatorConfig, generator: dict[str, Any], result: JobResult,
    reasons: Counter[str], job: JobOptions, registrar: BatchRegistrar | None = None,
) -> None:
    """Send plans to one actor pool, at most IN_FLIGHT_PER_WORKER per actor, and collect stats;
    `registrar` catalogues the finished shards batch by batch."""
    import ray

    from blip3.core.ray_session import ray_session

    with ray_session(job.ray_address, num_cpus=_local_cpus(job)), progress() as bar:
        task = bar.add_task(f"{generator['name']} -> {out.name} (shards)", total=None)
        # samples fetched (URL lists: downloaded in the shard tasks) and annotated, a shard at a time
        samples = bar.add_task(f"{generator['name']} -> {out.name} (samples)", total=None)
        storage_env = storage_environment()  # an object-store output or input: workers reach it as we do
        actor_cls = ray.remote(ShardWorker).options(
            num_cpus=job.cpus_per_worker, max_restarts=-1, max_task_retries=SHARD_RETRIES,
            **({"runtime_env": {"env_vars": storage_env}} if storage_env else {}),
            **({"num_gpus": job.gpus_per_worker} if job.gpus_per_worker else {}),
        )
        actors = [actor_cls.remote(factory, job.limits, job.image_output, job.shard_name_width, job.download)
                  for _ in range(job.workers)]
        free = deque(a for _ in range(IN_FLIGHT_PER_WORKER) for a in actors)
        in_flight: dict[Any, tuple[Any, ShardPlan]] = {}
        lost: list[str] = []
        resend: deque[ShardPlan] = deque()
        unreachable = _Resends()

        def collect() -> None:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in done:
                actor, plan = in_flight.pop(ref)
                index = plan.index
                free.append(actor)
                try:
                    stats = ray.get(ref)
                except ray.exceptions.ActorUnavailableError as e:
                    # its node is gone or out of reach: Ray spends the call's retries before it has
                    # noticed, so the plan is sent again, to an actor restarted elsewhere (same bytes)
                    if unreachable.again(index):
                        time.sleep(UNREACHABLE_WAIT_S)
                        resend.append(plan)
                    else:
                        lost.append(f"{index}: {_failure_detail(e)}")
                    continue
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                    full = environment_error(e)
                    if full is not None:  # a full disk or unwritable output: every other shard fails alike
                        raise full from None
                    lost.append(f"{index}: {_failure_detail(e)}")
                    continue
                result.shards_written += 1
                result.samples += int(stats["count"])
                result.successes += int(stats["successes"])
                result.failed += int(stats["failed"])
                reasons.update(stats.get("failure_reasons", {}))
                if registrar is not None:
                    registrar.add(index)
                bar.advance(task)
                bar.advance(samples, int(stats["count"]))

        def send(plan: ShardPlan) -> None:
            while not free:
                collect()
            actor = free.popleft()
            in_flight[actor.write.remote(out, plan, generator)] = (actor, plan)

        for plan in plans:
            while resend:
                send(resend.popleft())
            send(plan)
        while in_flight or resend:
            if resend:
                send(resend.popleft())
            else:
                collect()
        for actor in actors:
            ray.kill(actor)
    if lost:
        raise UserError(f"{len(lost)} shard(s) failed after {SHARD_RETRIES} retries (re-run to retry them); "
                        f"first: shard {lost[0]}")
