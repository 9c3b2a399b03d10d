"""Pipeline steps without Ray: one sample through read -> validate -> annotate -> pack; shard reuse rules."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pytest

from blip3.core.errors import UserError
from blip3.core.shards import SampleRow, ShardWriter
from blip3.datagen.annotator import Annotation, SkipSample
from blip3.datagen.images import ImageLimits, ImageOutput
from blip3.datagen.inputs import SampleRef
from blip3.datagen.pipeline import input_digest, plan_shards, process_ref, shard_done
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


def _ref(tmp_path, name: str, data: bytes, **kw) -> SampleRef:
    path = tmp_path / name
    path.write_bytes(data)
    return SampleRef(key=name.replace(".", "_"), ext=name.rsplit(".", 1)[1], locator=["file", str(path)], **kw)


def test_process_ref_success_record(tmp_path):
    ref = _ref(tmp_path, "a.png", png_bytes(text_image(size=(120, 40))), uid="u1", url="http://x/a.png",
               source_caption="alt")
    res = process_ref(ref, SizeCaptioner(), ImageLimits())
    record, row = json.loads(res["json"]), json.loads(res["row"])
    assert res["ok"] and res["txt"] == "120x40" and res["ext"] == "jpg"  # PNG input, one member type: jpg
    assert record["uid"] == "u1" and record["source_caption"] == "alt" and record["objects"] == []
    assert record["generator"] == {"engine": "size"} and record["status"] == "success"
    assert row["width"] == 120 and row["n_captions"] == 1 and row["has_source_caption"] is True
    # img2dataset's sidecar columns: the caption, the stored image's sha256, the original size
    assert row["caption"] == "120x40" and row["sha256"] == hashlib.sha256(res["image"]).hexdigest()
    assert (row["original_width"], row["original_height"]) == (120, 40)
    kept = process_ref(ref, SizeCaptioner(), ImageLimits(), output=ImageOutput("keep"))
    assert kept["ext"] == "png" and kept["image"] == (tmp_path / "a.png").read_bytes()


def test_process_ref_failures_carry_reasons(tmp_path):
    ann = SizeCaptioner(fail_on=120)
    assert json.loads(process_ref(_ref(tmp_path, "z.jpg", b""), ann, ImageLimits())["row"])["error_message"] == "empty: zero-byte file"
    pre = SampleRef(key="k", ext="", locator=["none"], error="download: HTTP Error 404")
    assert json.loads(process_ref(pre, ann, ImageLimits())["row"])["error_message"] == "download: HTTP Error 404"
    skip = process_ref(_ref(tmp_path, "s.png", png_bytes(text_image(size=(120, 40)))), ann, ImageLimits())
    assert not skip["ok"] and json.loads(skip["row"])["error_message"] == "too_plain: width 120"
    crash = process_ref(_ref(tmp_path, "c.png", png_bytes(text_image(size=(240, 40)))), ann, ImageLimits())
    assert json.loads(crash["row"])["error_message"] == "annotate: ZeroDivisionError: engine bug"
    gone = SampleRef(key="g", ext="png", locator=["file", str(tmp_path / "gone.png")])
    assert json.loads(process_ref(gone, ann, ImageLimits())["row"])["error_message"].startswith("read:")
    bomb = process_ref(_ref(tmp_path, "b.png", bad_inputs()["bomb.png"]), ann, ImageLimits())
    assert json.loads(bomb["row"])["error_message"].startswith("too_large:")


def test_shard_reused_only_when_complete_and_for_the_same_inputs(tmp_path):
    refs = [SampleRef(key=f"k{i}", ext="png", locator=["none"]) for i in range(5)]
    shards = plan_shards(refs, 2)
    assert [len(s) for s in shards] == [2, 2, 1]
    digest = input_digest(shards[0])
    with ShardWriter(tmp_path, 0) as w:
        w.add_failure(SampleRow("k0", error_message="x: y"))
        w.close(extra_stats={"input_digest": digest})
    assert shard_done(tmp_path, 0, digest)
    assert not shard_done(tmp_path, 0, input_digest(shards[1]))  # inputs changed: redo
    assert not shard_done(tmp_path, 0, input_digest(shards[0], {"min_confidence": 0.9}))  # settings changed
    assert not shard_done(tmp_path, 1, input_digest(shards[1]))  # never written
    with open(tmp_path / "00000.tar", "ab") as f:  # a tar that no longer matches its stats
        f.write(b"\0" * 512)
    assert not shard_done(tmp_path, 0, digest)
    with pytest.raises(UserError, match="--shard-size"):
        plan_shards(refs, 0)


def test_rerun_with_fewer_shards_removes_leftover_shards(ray_local, tmp_path):
    """A re-run planning fewer shards (bigger --shard-size) drops the earlier run's higher shards."""
    from blip3.core.shards import list_shards
    from blip3.datagen.pipeline import run_job

    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        (src / f"img{i}.png").write_bytes(png_bytes(text_image(f"N {i}", size=(80 + 8 * i, 40))))
    out = tmp_path / "out"
    first = run_job(src, out, SizeCaptioner, workers=1, shard_size=1, register=False)
    assert first.shards_total == 6 and len(list_shards(out)) == 6
    second = run_job(src, out, SizeCaptioner, workers=1, shard_size=3, register=False)
    assert second.shards_total == 2
    shards = list_shards(out)
    assert len(shards) == 2 and sum(s.count for s in shards) == 6
    assert sorted(p.name for p in out.glob("0*")) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar", "00001_stats.json"]


def test_job_summary_line(tmp_path):
    from blip3.datagen.pipeline import JobResult

    r = JobResult(tmp_path, 3, 2, 1, successes=5, failed=2, failure_reasons={"decode": 1, "too_small": 1},
                  duration_s=1.25, source="scans")
    assert r.summary() == ("2 shard(s) written, 1 already done; 5 ok, 2 failed (decode: 1, too_small: 1); 1.2s; "
                           "catalog source scans")
    assert JobResult(tmp_path, 1, 0, 1).summary(skipped_as="skipped") == "0 shard(s) written, 1 skipped; 0 ok, 0 failed; 0.0s"
