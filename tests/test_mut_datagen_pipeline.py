"""The datagen pipeline's parts that need no Ray: one sample's record and sidecar row, one shard's
stats and files (local, on a store, through the worker class), the removal of left-over shards,
the job's argument checks, and a resumed job whose shards are all done (which starts no Ray).
Each was found unguarded by mutation testing; the job on a real cluster stays covered by the
Ray tests (`test_datagen_pipeline.py`, `test_datagen_scale.py`, ...)."""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from dataclasses import dataclass

import pytest
from PIL import Image

from blip3.core.errors import UserError
from blip3.core.shards import SampleRow, ShardWriter, read_stats, shard_complete, shard_paths
from blip3.core.storage import Location
from blip3.datagen.annotator import Annotation
from blip3.datagen.fetch import DownloadOptions
from blip3.datagen.images import ImageLimits, ImageOutput
from blip3.datagen.inputs import InputSample, SampleRef
from blip3.datagen.pipeline import JobOptions, process_ref, run_job, write_shard
from blip3.datagen import pipeline
from blip3.datagen.plans import iter_plans, job_plans
from tests.core_fixtures import write_caption_shard
from tests.ocr_fixtures import png_bytes, text_image
from tests.test_datagen_pipeline import SizeCaptioner
from tests.test_datagen_urls import _Server


@dataclass
class CountingCaptioner:
    """An annotator whose sidecar counts and confidence are set (SizeCaptioner leaves them 0), and
    that remembers whether it was loaded and how often it was asked for its generator info."""

    name: str = "counting"
    loaded: bool = False
    info_calls: int = 0
    message: str = ""

    def load(self) -> None:
        self.loaded = True

    def generator_info(self) -> dict:
        self.info_calls += 1
        return {"engine": "counting", "loaded": self.loaded}

    def annotate(self, image, sample) -> Annotation:
        if self.message:
            raise RuntimeError(self.message)
        text = f"{image.width}x{image.height}"
        return Annotation(text, [{"text": text}, {"text": "other"}], {}, n_ocr=3, n_objects=2, mean_confidence=0.75)


def _image_ref(tmp_path, name: str, size=(64, 32), mode: str = "RGB", **kw) -> SampleRef:
    path = tmp_path / name
    if mode == "RGB":
        path.write_bytes(png_bytes(text_image(size=size)))
    else:
        Image.new(mode, size, 0).save(path)
    return SampleRef(key=path.stem, ext=name.rsplit(".", 1)[1], locator=["at", str(path)], **kw)


# -- one sample ---------------------------------------------------------------------------------
def test_sidecar_row_counts_the_stored_image_and_the_annotation(tmp_path):
    res = process_ref(_image_ref(tmp_path, "a.png"), CountingCaptioner(), ImageLimits())
    row = res.row
    assert row.status == "success" and row.has_source_caption is False
    assert row.image_bytes == len(res.members["jpg"]) and row.caption_length == len("64x32") == 5
    assert (row.n_captions, row.n_ocr, row.n_objects, row.mean_confidence) == (2, 3, 2, 0.75)


def test_record_takes_the_given_generator_and_asks_the_annotator_only_without_one(tmp_path):
    ref = _image_ref(tmp_path, "a.png")
    ann = CountingCaptioner()
    given = process_ref(ref, ann, ImageLimits(), generator={"engine": "given"})
    assert json.loads(given.members["json"])["generator"] == {"engine": "given"} and ann.info_calls == 0
    asked = process_ref(ref, ann, ImageLimits())
    assert json.loads(asked.members["json"])["generator"] == {"engine": "counting", "loaded": False}


def test_record_keeps_a_folder_inputs_path_and_the_conversions_made(tmp_path):
    rgb = process_ref(_image_ref(tmp_path, "a.png", meta={"path": "sub/a.png"}), SizeCaptioner(), ImageLimits())
    record = json.loads(rgb.members["json"])
    assert record["source_path"] == "sub/a.png" and "conversions" not in record
    plain = json.loads(process_ref(_image_ref(tmp_path, "b.png"), SizeCaptioner(), ImageLimits()).members["json"])
    assert "source_path" not in plain
    grey = process_ref(_image_ref(tmp_path, "c.tif", mode="CMYK"), SizeCaptioner(), ImageLimits())
    assert json.loads(grey.members["json"])["conversions"] == ["CMYK->RGB"]


def test_an_engine_crash_reason_is_cut_to_200_characters(tmp_path):
    res = process_ref(_image_ref(tmp_path, "a.png"), CountingCaptioner(message="x" * 500), ImageLimits())
    assert res.row.error_message == "annotate: " + ("RuntimeError: " + "x" * 500)[:200]


def test_a_sample_fetched_ahead_is_used_and_its_download_error_recorded(tmp_path):
    """`write_shard` hands `process_ref` the samples its download threads fetched: the ref is not
    read again, and a failed download is the row's reason."""
    ref = SampleRef(key="u", ext="png", locator=["at", str(tmp_path / "not-there.png")], url="http://x/u.png")
    data = png_bytes(text_image(size=(48, 24)))
    ok = process_ref(ref, SizeCaptioner(), ImageLimits(), sample=InputSample("u", data, "png"))
    assert ok.ok and ok.members["txt"] == "48x24"
    failed = process_ref(ref, SizeCaptioner(), ImageLimits(), sample=InputSample("u", b"", "png", error="download: HTTP 500"))
    assert not failed.ok and failed.row.error_message == "download: HTTP 500"


# -- one shard ----------------------------------------------------------------------------------
def _plan(tmp_path, n_ok: int = 2, n_bad: int = 1):
    refs = [_image_ref(tmp_path, f"i{i}.png", size=(40 + i, 20)) for i in range(n_ok)]
    for j in range(n_bad):
        (tmp_path / f"bad{j}.png").write_bytes(b"not an image")
        refs.append(SampleRef(key=f"bad{j}", ext="png", locator=["at", str(tmp_path / f"bad{j}.png")]))
    return next(iter_plans(refs, len(refs), {"engine": "size"}))


def test_write_shard_returns_the_published_shards_stats(tmp_path):
    plan = _plan(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    stats = write_shard(out, plan, SizeCaptioner(), ImageLimits(), {"name": "size"}, {"engine": "rec"}, digits=3)
    tar, parquet, stats_path = shard_paths(out, 0, digits=3)
    assert tar.name == "000.tar" and parquet.exists() and stats_path.exists()
    on_disk = read_stats(out, 0, 3)
    assert stats == {"index": 0, "count": 3, "successes": 2, "failed": 1, "failure_reasons": {"decode": 1},
                     "sha256": hashlib.sha256(tar.read_bytes()).hexdigest(), "tar_bytes": tar.stat().st_size}
    assert on_disk["input_digest"] == plan.digest and on_disk["generator"] == {"name": "size"}
    with tarfile.open(tar) as t:
        names = t.getnames()
        assert names == ["i0.jpg", "i0.txt", "i0.json", "i1.jpg", "i1.txt", "i1.json"]
        assert json.loads(t.extractfile("i1.json").read())["generator"] == {"engine": "rec"}


def test_write_shard_to_a_store_publishes_the_same_shard(tmp_path):
    plan = _plan(tmp_path)
    local = tmp_path / "local"
    local.mkdir()
    (tmp_path / "bucket").mkdir()
    store = Location(f"file://{tmp_path / 'bucket'}")
    a = write_shard(local, plan, SizeCaptioner(), ImageLimits(), {"name": "size"})
    b = write_shard(store, plan, SizeCaptioner(), ImageLimits(), {"name": "size"})
    assert a == b and shard_complete(store, 0)
    assert sorted(store.names()) == ["00000.parquet", "00000.tar", "00000_stats.json"]
    assert (tmp_path / "bucket" / "00000.tar").read_bytes() == (local / "00000.tar").read_bytes()


def test_stages_load_the_annotator_once_and_write_with_the_jobs_settings(tmp_path):
    """The job's three stages called as Ray Data calls them (a batch of one pickled shard row each):
    the annotation stage loads its annotator once and asks its generator info never per sample;
    the write stage publishes the shard with the job's settings and returns only its stats."""
    import pickle

    plan = _plan(tmp_path, n_ok=1, n_bad=0)
    rows = {"index": [0], "shard": [pickle.dumps(plan)]}
    decoded = pipeline.decode_shards(rows, ImageLimits(), ImageOutput("keep"), DownloadOptions())
    stage = pipeline.AnnotateShards(CountingCaptioner)
    assert stage.annotator.loaded and stage.annotator.info_calls == 0
    annotated = stage(decoded)
    written = pipeline.write_shards(annotated, str(tmp_path / "out"), {"name": "counting"},
                                    {"engine": "counting", "loaded": True}, 2)
    (shard,) = pipeline._shards(written)
    assert shard.items is None and shard.stats["successes"] == 1 and stage.annotator.info_calls == 0
    assert read_stats(tmp_path / "out", 0, 2)["input_digest"] == plan.digest
    with tarfile.open(tmp_path / "out" / "00.tar") as t:
        assert t.getnames() == ["i0.png", "i0.txt", "i0.json"]
        assert json.loads(t.extractfile("i0.json").read())["generator"] == {"engine": "counting", "loaded": True}


def test_the_one_stage_decodes_annotates_and_writes_in_its_actor(tmp_path):
    """`ProcessShards` (a job without an accelerator) as Ray Data calls it: the annotator loaded
    once, each plan row written as its shard with the job's settings, only the stats coming back;
    an output it cannot write comes back marked so (the job stops with that line)."""
    import pickle

    plan = _plan(tmp_path, n_ok=1, n_bad=0)
    stage = pipeline.ProcessShards(CountingCaptioner, ImageLimits(), ImageOutput("keep"), DownloadOptions(),
                                   str(tmp_path / "out"), {"name": "counting"}, {"engine": "counting"}, 2)
    assert stage.annotator.loaded and stage.annotator.info_calls == 0
    (shard,) = pipeline._shards(stage({"index": [0], "shard": [pickle.dumps(plan)]}))
    assert shard.items is None and shard.stats["successes"] == 1 and stage.annotator.info_calls == 0
    assert read_stats(tmp_path / "out", 0, 2)["input_digest"] == plan.digest
    with tarfile.open(tmp_path / "out" / "00.tar") as t:
        assert t.getnames() == ["i0.png", "i0.txt", "i0.json"]
    (tmp_path / "file").write_text("not a folder")
    blocked = pipeline.ProcessShards(CountingCaptioner, ImageLimits(), ImageOutput(), DownloadOptions(),
                                     str(tmp_path / "file" / "out"), {}, {}, 2)
    (failed,) = pipeline._shards(blocked({"index": [0], "shard": [pickle.dumps(plan)]}))
    assert failed.stats is None and failed.environment.endswith("a part of this path is a file, not a folder")


def test_a_stage_failing_on_one_shard_reports_it_and_a_full_disk_stops_the_job(tmp_path):
    """A shard whose stage raises comes back as a row with the reason (the job goes on, then names
    it); an output that cannot be written (a full disk, a file in the way) comes back marked as such:
    every shard would meet it, so the job stops with that line."""
    import errno
    import pickle

    plan = _plan(tmp_path, n_ok=1, n_bad=0)
    annotated = pipeline.AnnotateShards(SizeCaptioner)(
        pipeline.decode_shards({"shard": [pickle.dumps(plan)]}, ImageLimits(), ImageOutput(), DownloadOptions()))
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    (shard,) = pipeline._shards(pipeline.write_shards(annotated, str(blocked / "out"), {}, {}, 5))
    assert shard.stats is None and shard.error.startswith("NotADirectoryError")
    assert shard.environment.endswith("a part of this path is a file, not a folder")
    full = pipeline._Shard(0, "").failed(OSError(errno.ENOSPC, "No space left on device", str(tmp_path)))
    assert "no space left" in full.environment and full.error.startswith("OSError")
    other = pipeline._Shard(1, "").failed(ValueError("bad tar"))
    assert other.environment is None and other.error == "ValueError: bad tar"


@pytest.fixture
def web(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    for name in ("a.png", "flaky.png"):
        (www / name).write_bytes(png_bytes(text_image("X", size=(56, 28))))
    server = _Server(www)
    yield server
    server.close()


def test_urls_are_fetched_with_the_shards_download_settings(tmp_path, web):
    """The download threads fetch with the job's settings: a URL failing once with a 500 is lost
    with no retry and fetched with one; a ref that failed before (its error set) is never asked."""
    def plan():
        refs = [SampleRef(key="a", ext="png", locator=["url", f"{web.url}/a.png"]),
                SampleRef(key="flaky", ext="png", locator=["url", f"{web.url}/flaky.png"]),
                SampleRef(key="pre", ext="png", locator=["url", f"{web.url}/pre.png"], error="download: listed bad")]
        return next(iter_plans(refs, 3))

    out = tmp_path / "out"
    out.mkdir()
    no_retry = write_shard(out, plan(), SizeCaptioner(), ImageLimits(), {}, download=DownloadOptions(retries=0))
    assert no_retry["successes"] == 1 and web.hits["/flaky.png"] == 1 and web.hits["/pre.png"] == 0
    web.hits.clear()
    retried = write_shard(out, plan(), SizeCaptioner(), ImageLimits(), {}, download=DownloadOptions(retries=1))
    assert retried["successes"] == 1 + 1 and web.hits["/flaky.png"] == 2 and web.hits["/pre.png"] == 0


# -- left-over shards ---------------------------------------------------------------------------
def test_remove_shards_drops_high_and_other_width_shards_whole(tmp_path):
    for i in range(4):
        write_caption_shard(tmp_path, i, 1)
    with ShardWriter(tmp_path, 7, generator={}, digits=3) as w:
        w.add_failure(SampleRow("x", error_message="x: y"))
    (tmp_path / "notes.tar").write_bytes(b"")
    (tmp_path / "00009.tar").write_bytes(b"")  # a part without its parquet and stats
    assert pipeline._remove_shards(tmp_path, keep_below=2) == [2, 3, 7, 9]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json", "notes.tar"]
    assert pipeline._remove_shards(tmp_path) == [0, 1]
    assert [p.name for p in tmp_path.iterdir()] == ["notes.tar"]


# -- the job's checks and a job with nothing left to do --------------------------------------------
@pytest.mark.parametrize("command", ["blip3.datagen.ocr_commands:ocr", "blip3.datagen.ground_commands:ground"])
def test_job_defaults_are_the_commands_defaults(command):
    """A job started from Python cuts and runs like `blip3 ocr` / `blip3 ground` without options."""
    import importlib
    import inspect

    module, name = command.split(":")
    params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    job = JobOptions()
    for option in ("shard_size", "workers", "overwrite", "limit", "shard_name_width", "input_format", "ray_address"):
        if option in params:
            assert getattr(job, option) == params[option].default.default, option
    assert job.shard_size == 1000 and job.workers == 2


def test_the_job_options_are_declared_once_for_both_commands():
    """Every option `blip3 ocr` and `blip3 ground` share is the one declaration in
    datagen/cli_options.py (same default, same help), bar the annotator's own `--drop-empty`."""
    import inspect

    from blip3.datagen.ground_commands import ground
    from blip3.datagen.ocr_commands import ocr

    a, b = inspect.signature(ocr).parameters, inspect.signature(ground).parameters
    shared = [n for n in a if n in b and n not in ("input", "output", "out", "drop_empty")]
    assert len(shared) == 16 and all(a[n].default is b[n].default for n in shared), shared


def test_job_checks_workers_and_shard_name_width_before_anything_else(tmp_path):
    empty = tmp_path / "in"
    empty.mkdir()
    out = tmp_path / "out"
    with pytest.raises(UserError, match="--workers"):
        run_job(empty, out, SizeCaptioner, JobOptions(workers=0))
    with pytest.raises(UserError, match="--shard-name-width"):
        run_job(empty, out, SizeCaptioner, JobOptions(shard_name_width=0))
    with pytest.raises(UserError, match="--download-threads"):
        run_job(empty, out, SizeCaptioner, JobOptions(download=DownloadOptions(threads=0)))
    # the least allowed values pass the checks; the empty input is the next thing refused
    with pytest.raises(UserError, match="no input images found"):
        run_job(empty, out, SizeCaptioner, JobOptions(workers=1, shard_name_width=1))
    assert not out.exists()


def test_local_cluster_cpus_cover_the_workers_request_and_a_staged_jobs_cpu_stages(monkeypatch):
    """A local cluster has the actors' CPUs, plus the machine's cores for the read and write stages
    of a staged job (an accelerator annotator); no more (Ray starts a worker per CPU)."""
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert pipeline._local_cpus(JobOptions(workers=10_000, cpus_per_worker=1.5)) == 15_000
    assert pipeline._local_cpus(JobOptions(workers=3, cpus_per_worker=1.5, gpus_per_worker=1)) == 7
    assert pipeline._local_cpus(JobOptions(workers=2, cpus_per_worker=0, resources={"TPU": 1})) == 2
    assert pipeline._local_cpus(JobOptions(workers=2, cpus_per_worker=0)) == 1  # never a cluster of 0 CPUs
    monkeypatch.setattr("os.cpu_count", lambda: None)  # os.cpu_count() may not know
    assert pipeline._local_cpus(JobOptions(workers=1, cpus_per_worker=0.5, gpus_per_worker=1)) == 2
    assert pipeline._local_cpus(JobOptions(workers=1, cpus_per_worker=0.5)) == 1


def test_only_an_accelerator_annotator_is_staged():
    """GPUs or a custom resource per actor: decode, annotate and write apart; otherwise one stage."""
    assert not pipeline.staged(JobOptions(workers=4, cpus_per_worker=2))
    assert pipeline.staged(JobOptions(gpus_per_worker=0.5))
    assert pipeline.staged(JobOptions(resources={"accelerator": 1}))


@pytest.fixture
def done_job(tmp_path, monkeypatch):
    """An input folder of 5 images whose 3 shards (size 2, 3-digit names) were all written before,
    plus two left-over shards and a killed writer's temporary; Ray must not start."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        (src / f"img{i}.png").write_bytes(png_bytes(text_image(f"N {i}", size=(60 + 4 * i, 30))))
    out = tmp_path / "out"
    out.mkdir()
    generator = {"name": "size", "engine": "size", "image_format": "jpg", "encode_quality": ImageOutput().quality}
    for plan in job_plans(str(src), None, 2, generator):
        write_shard(out, plan, SizeCaptioner(), ImageLimits(), generator, digits=3)
    for i in (3, 4):  # left over from a run with a smaller --shard-size
        write_caption_shard(tmp_path / "other", i, 1)
        for p in shard_paths(tmp_path / "other", i):
            p.rename(out / p.name.replace(f"0000{i}", f"00{i}"))
    (out / ".004.tar.tmp-dead").write_bytes(b"half")

    def no_ray(*a, **k):
        raise AssertionError("a job with every shard done started Ray")

    monkeypatch.setattr("blip3.core.ray_session.ray_session", no_ray)
    return src, out, generator


def test_job_with_every_shard_done_skips_them_without_ray(done_job, tmp_path, caplog):
    src, out, generator = done_job
    before = {p.name: p.read_bytes() for p in out.glob("00[012]*")}
    with caplog.at_level(logging.INFO, logger="blip3"):
        r = run_job(src, out, SizeCaptioner, JobOptions(shard_size=2, shard_name_width=3, register=False, verify=True))
    assert [m for m in caplog.messages if "shard(s)" in m] == ["removed 2 shard(s) left over from an earlier run: indices 3..4",
                               "3 shard(s): 0 written, 3 done before"]
    assert (r.shards_total, r.shards_written, r.shards_skipped) == (3, 0, 3)
    assert (r.samples, r.successes, r.failed, r.failure_reasons, r.source) == (0, 0, 0, {}, None)
    assert r.generator == generator and 0 <= r.duration_s < 3600
    assert {p.name: p.read_bytes() for p in out.glob("00[012]*")} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # left-over shards 3, 4 and the temporary gone
    assert not (tmp_path / "catalog.duckdb").exists()


def test_job_with_every_shard_done_registers_them(done_job, tmp_path):
    from blip3.core.catalog import Catalog

    src, out, _ = done_job
    tar = out / "000.tar"
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF  # same size, other bytes: by default a finished shard's hash is trusted, not re-read
    tar.write_bytes(bytes(data))
    db = tmp_path / "cat.duckdb"
    r = run_job(src, out, SizeCaptioner, JobOptions(shard_size=2, shard_name_width=3, db=db, source="scans"))
    assert r.source == "scans" and r.shards_skipped == 3
    with Catalog(db) as cat:
        assert cat.con.execute("SELECT count(*) FROM samples WHERE source = ?", ["scans"]).fetchone()[0] == 5
