"""Pipeline steps without Ray: one sample through read -> validate -> annotate -> pack; shard reuse rules."""

from __future__ import annotations

import hashlib
import json
import signal
from dataclasses import dataclass

import pytest

from blip3.core.errors import UserError
from blip3.core.shards import SampleRow, ShardWriter
from blip3.datagen.annotator import Annotation, SkipSample
from blip3.datagen.images import ImageLimits, ImageOutput
from blip3.datagen.inputs import SampleRef
from blip3.datagen.pipeline import process_ref, shard_done
from blip3.datagen.plans import input_digest, iter_plans
from blip3.datagen.pipeline import JobOptions
from tests.ocr_fixtures import bad_inputs, png_bytes, text_image


@dataclass
class SizeCaptioner:
    """A deterministic test annotator: captions an image with its size (unit logic only)."""

    name: str = "size"
    fail_on: int = -1

    def load(self) -> None:
        pass

    def generator_info(self) -> dict:
        return {"engine": "size"}

    def annotate(self, image, sample) -> Annotation:
        if image.width == self.fail_on:
            raise SkipSample("too_plain", f"width {image.width}")
        if image.width == 2 * self.fail_on:
            raise ZeroDivisionError("engine bug")
        text = f"{image.width}x{image.height}"
        return Annotation(text, [{"text": text}], {"entries": []}, record={"objects": []})


@dataclass
class CrashingCaptioner(SizeCaptioner):
    """Kills its own process on an image 88 pixels wide, as a native crash in an engine would."""

    def annotate(self, image, sample) -> Annotation:
        if image.width == 88:
            import os

            os._exit(1)
        return super().annotate(image, sample)


def _ref(tmp_path, name: str, data: bytes, **kw) -> SampleRef:
    path = tmp_path / name
    path.write_bytes(data)
    return SampleRef(key=name.replace(".", "_"), ext=name.rsplit(".", 1)[1], locator=["at", str(path)], **kw)


def test_process_ref_success_record(tmp_path):
    ref = _ref(tmp_path, "a.png", png_bytes(text_image(size=(120, 40))), uid="u1", url="http://x/a.png",
               source_caption="alt")
    res = process_ref(ref, SizeCaptioner(), ImageLimits())
    record, row = json.loads(res.members["json"]), res.row
    assert res.ok and res.members["txt"] == "120x40" and set(res.members) == {"jpg", "txt", "json"}  # PNG in: jpg
    assert record["uid"] == "u1" and record["source_caption"] == "alt" and record["objects"] == []
    assert record["generator"] == {"engine": "size"} and record["status"] == "success"
    assert row.width == 120 and row.n_captions == 1 and row.has_source_caption is True
    # img2dataset's sidecar columns: the caption, the stored image's sha256, the original size
    assert row.caption == "120x40" and row.sha256 == hashlib.sha256(res.members["jpg"]).hexdigest()
    assert (row.original_width, row.original_height) == (120, 40)
    kept = process_ref(ref, SizeCaptioner(), ImageLimits(), output=ImageOutput("keep"))
    assert kept.members["png"] == (tmp_path / "a.png").read_bytes()


def test_process_ref_failures_carry_reasons(tmp_path):
    ann = SizeCaptioner(fail_on=120)
    assert process_ref(_ref(tmp_path, "z.jpg", b""), ann, ImageLimits()).row.error_message == "empty: zero-byte file"
    pre = SampleRef(key="k", ext="", locator=["none"], error="download: HTTP Error 404")
    assert process_ref(pre, ann, ImageLimits()).row.error_message == "download: HTTP Error 404"
    skip = process_ref(_ref(tmp_path, "s.png", png_bytes(text_image(size=(120, 40)))), ann, ImageLimits())
    assert not skip.ok and skip.row.error_message == "too_plain: width 120" and skip.row.status == "failed"
    crash = process_ref(_ref(tmp_path, "c.png", png_bytes(text_image(size=(240, 40)))), ann, ImageLimits())
    assert crash.row.error_message == "annotate: ZeroDivisionError: engine bug"
    gone = SampleRef(key="g", ext="png", locator=["at", str(tmp_path / "gone.png")])
    assert process_ref(gone, ann, ImageLimits()).row.error_message.startswith("read:")
    bomb = process_ref(_ref(tmp_path, "b.png", bad_inputs()["bomb.png"]), ann, ImageLimits())
    assert bomb.row.error_message.startswith("too_large:")


def test_shard_reused_only_when_complete_and_for_the_same_inputs(tmp_path):
    refs = [SampleRef(key=f"k{i}", ext="png", locator=["none"]) for i in range(5)]
    shards = list(iter_plans(refs, 2))
    assert [(p.index, len(p.refs)) for p in shards] == [(0, 2), (1, 2), (2, 1)]
    digest = shards[0].digest
    assert digest == input_digest(shards[0].refs)
    with ShardWriter(tmp_path, 0) as w:
        w.add_failure(SampleRow("k0", error_message="x: y"))
        w.close(extra_stats={"input_digest": digest})
    assert shard_done(tmp_path, 0, digest)
    assert not shard_done(tmp_path, 0, shards[1].digest)  # inputs changed: redo
    assert not shard_done(tmp_path, 0, input_digest(shards[0].refs, {"min_confidence": 0.9}))  # settings changed
    assert not shard_done(tmp_path, 1, shards[1].digest)  # never written
    tar = tmp_path / "00000.tar"
    data = bytearray(tar.read_bytes())
    data[100] ^= 0xFF  # same size, other bytes: trusted from the stats unless verified
    tar.write_bytes(bytes(data))
    assert shard_done(tmp_path, 0, digest) and not shard_done(tmp_path, 0, digest, verify=True)
    with open(tar, "ab") as f:  # a tar that no longer matches its stats' size
        f.write(b"\0" * 512)
    assert not shard_done(tmp_path, 0, digest)
    with pytest.raises(UserError, match="--shard-size"):
        list(iter_plans(refs, 0))


def test_plans_are_cut_from_a_stream_without_listing_every_ref():
    """The planner pulls one shard's refs at a time: it never lists the whole input. A stream that
    breaks past the second shard would fail here if all refs were listed up front."""
    pulled = []

    def stream():
        for i in range(10**9):
            if i >= 7:
                raise AssertionError("the planner read past the shards it was asked for")
            pulled.append(i)
            yield SampleRef(key="same" if i in (0, 1) else f"k{i}", ext="png", locator=["none"])

    plans = iter_plans(stream(), 3)
    first = next(plans)
    assert len(pulled) == 3 and [r.key for r in first.refs] == ["same", "same_1", "k2"]
    second = next(plans)
    assert second.index == 1 and len(pulled) == 6
    assert [r.key for r in next(iter_plans(iter([SampleRef(key="same", ext="", locator=["none"])]), 3)).refs] == ["same"]


def test_plans_limit_and_stable_digests():
    def refs():
        return (SampleRef(key=f"k{i}", ext="png", locator=["none"]) for i in range(10))

    a = [(p.index, [r.key for r in p.refs], p.digest) for p in iter_plans(refs(), 4, limit=6)]
    b = [(p.index, [r.key for r in p.refs], p.digest) for p in iter_plans(refs(), 4, limit=6)]
    assert a == b and [len(keys) for _, keys, _ in a] == [4, 2]
    with pytest.raises(UserError, match="--limit"):
        list(iter_plans(refs(), 4, limit=0))


def test_rerun_with_fewer_shards_removes_leftover_shards(ray_local, tmp_path):
    """A re-run planning fewer shards (bigger --shard-size) drops the earlier run's higher shards."""
    from blip3.core.shards import list_shards
    from blip3.datagen.pipeline import run_job

    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        (src / f"img{i}.png").write_bytes(png_bytes(text_image(f"N {i}", size=(80 + 8 * i, 40))))
    (src / "img5.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    first = run_job(src, out, SizeCaptioner, JobOptions(workers=1, shard_size=1, register=False))
    assert first.shards_total == 6 and len(list_shards(out)) == 6
    # the driver sums the shards' stats
    assert (first.shards_written, first.shards_skipped, first.samples, first.successes, first.failed) == (6, 0, 6, 5, 1)
    assert first.failure_reasons == {"decode": 1}
    second = run_job(src, out, SizeCaptioner, JobOptions(workers=1, shard_size=3, register=False))
    assert (second.shards_total, second.shards_written, second.shards_skipped) == (2, 2, 0)
    shards = list_shards(out)
    assert len(shards) == 2 and sum(s.count for s in shards) == 6
    assert sorted(p.name for p in out.glob("0*")) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json"]


def test_staged_and_one_stage_jobs_write_the_same_shards(ray_local, tmp_path, monkeypatch):
    """An annotator holding an accelerator (here the test cluster's custom `accelerator`) runs as
    decode tasks -> its actors -> write tasks; any other as one actor stage. Either way each plan's
    read is fused into the first stage (a read task of its own would wait for ever on a cluster
    whose CPUs the actors hold), and the shards are the same bytes."""
    from blip3.datagen import pipeline
    from blip3.datagen.pipeline import run_job

    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        (src / f"img{i}.png").write_bytes(png_bytes(text_image(f"N {i}", size=(80 + 8 * i, 40))))
    (src / "img5.png").write_bytes(b"not an image")
    datasets = []
    build = pipeline.build_dataset
    monkeypatch.setattr(pipeline, "build_dataset", lambda *a, **k: datasets.append(build(*a, **k)) or datasets[-1])
    one = run_job(src, tmp_path / "one", SizeCaptioner, JobOptions(workers=2, shard_size=2, register=False,
                                                                  cpus_per_worker=0.5))
    staged = run_job(src, tmp_path / "staged", SizeCaptioner,
                     JobOptions(workers=1, shard_size=2, register=False, cpus_per_worker=0,
                                resources={"accelerator": 1}))
    ops = [[line.split(":")[0].split(" ", 2)[2] for line in ds.stats().splitlines() if line.startswith("Operator ")]
           for ds in datasets]
    assert ops == [["ReadShardPlans->MapBatches(ProcessShards)"],
                   ["ReadShardPlans->MapBatches(decode_shards)", "MapBatches(AnnotateShards)", "MapBatches(write_shards)"]]
    assert (one.shards_written, one.successes, one.failed) == (staged.shards_written, staged.successes, staged.failed) == (3, 5, 1)
    for name in ("00000.tar", "00001.tar", "00002.tar", "00002.parquet"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "staged" / name).read_bytes()


def test_no_more_annotator_actors_than_shards(ray_local, tmp_path, recwarn):
    """A one-shard job with `--workers 2` starts one actor (each loads its engine), so Ray Data has
    no idle actor to warn about on the user's terminal."""
    from blip3.datagen.pipeline import run_job

    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        (src / f"img{i}.png").write_bytes(png_bytes(text_image(f"N {i}", size=(80 + 8 * i, 40))))
    assert run_job(src, tmp_path / "out", SizeCaptioner, JobOptions(workers=2, shard_size=2, register=False)).successes == 2
    assert not [w for w in recwarn if "concurrent actors" in str(w.message)]


def test_a_shard_whose_worker_keeps_dying_fails_alone(ray_local, tmp_path):
    """Ray Data restarts a dead actor and retries its shard without end; after MAX_ATTEMPTS starts
    the shard fails with the reason, the job writes the others and then names it."""
    from blip3.datagen.pipeline import MAX_ATTEMPTS, run_job

    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):  # widths 80, 88 (shard 0 crashes), 96, 104, 112
        (src / f"img{i}.png").write_bytes(png_bytes(text_image(f"N {i}", size=(80 + 8 * i, 40))))
    out = tmp_path / "out"

    def endless(*_):
        raise TimeoutError("the job is still retrying the shard whose worker dies")

    before = signal.signal(signal.SIGALRM, endless)
    signal.alarm(120)  # a job without the limit never ends: fail instead of hanging the suite
    try:
        with pytest.raises(UserError, match=rf"1 shard\(s\) failed \(re-run to retry them\); first: shard 0: the "
                                            rf"annotator's worker process died in this shard {MAX_ATTEMPTS} times"):
            run_job(src, out, CrashingCaptioner, JobOptions(workers=1, shard_size=2, register=False))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
    assert sorted(p.name for p in out.glob("*_stats.json")) == ["00001_stats.json", "00002_stats.json"]


def test_job_summary_line(tmp_path):
    from blip3.datagen.pipeline import JobResult

    r = JobResult(tmp_path, 3, 2, 1, samples=7, successes=5, failed=2, failure_reasons={"decode": 1, "too_small": 1},
                  duration_s=1.25, source="scans")
    assert r.summary() == ("2 shard(s) written, 1 already done; 5 ok, 2 failed (decode: 1, too_small: 1); "
                           "1.2s (5.6 images/s); catalog source scans")
    assert JobResult(tmp_path, 1, 0, 1).summary(skipped_as="skipped") == "0 shard(s) written, 1 skipped; 0 ok, 0 failed; 0.0s"
