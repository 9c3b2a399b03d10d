"""The model path for real: a tiny random Grounding DINO (and a tiny open_clip) saved to disk and
loaded by the code users run, then driven through `blip3 ground` on a local Ray cluster."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from blip3.cli import app
from blip3.core.keys import sanitize_key
from blip3.core.shards import list_shards, read_sidecar
from blip3.datagen.detectors import DetectionLimits
from blip3.datagen.detectors_gdino import ENV_VAR, HFGroundingDino
from blip3.datagen.grounding import make_config
from blip3.datagen.inputs import InputSample
from tests.grounding_fixtures import scenes, tiny_clip, tiny_gdino  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]


def test_tiny_grounding_dino_detects_with_tag_labels(tiny_gdino):  # noqa: F811
    det = HFGroundingDino(tiny_gdino)
    det.load()
    image = Image.new("RGB", (120, 80), (30, 160, 60))
    tags = ["football player", "ball", "green field"]
    objs = det.detect(image, tags, DetectionLimits(box_threshold=0.0, text_threshold=0.0))
    assert len(objs) == 30  # every query passes zero thresholds
    assert {o.label for o in objs} <= set(tags)
    assert all(0.0 <= v <= 1.0 for o in objs for v in o.bbox) and all(o.bbox[0] <= o.bbox[2] for o in objs)
    assert det.detect(image, tags, DetectionLimits(box_threshold=1.0)) == []
    assert det.detect(image, [], DetectionLimits(box_threshold=0.0)) == []


def test_prompt_chunks_are_tokenized_once_per_tag_list(tiny_gdino):  # noqa: F811
    det = HFGroundingDino(tiny_gdino)
    det.load()
    tok = det.processor.tokenizer
    calls: list[str] = []
    real = tok.tokenize
    tok.tokenize = lambda text, **kw: calls.append(text) or real(text, **kw)
    image = Image.new("RGB", (120, 80), (30, 160, 60))
    tags = ["football player", "ball", "green field"]
    first = det.detect(image, tags, DetectionLimits(box_threshold=0.0, text_threshold=0.0))
    assert sorted(calls) == sorted(tags)
    assert det.detect(image, tags, DetectionLimits(box_threshold=0.0, text_threshold=0.0)) == first
    assert sorted(calls) == sorted(tags)  # the second image reuses the chunks


def test_image_is_preprocessed_once_for_all_prompt_chunks(tiny_gdino, monkeypatch):  # noqa: F811
    det = HFGroundingDino(tiny_gdino)
    det.load()
    tags = [f"thing number {i}" for i in range(120)]  # several prompts of <= 250 tokens
    assert len(det._chunk_cached(tags)) > 1
    cls = type(det.processor.image_processor)
    real = cls.__call__
    calls: list[int] = []

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", counting)
    objs = det.detect(Image.new("RGB", (120, 80), (30, 160, 60)), tags, DetectionLimits(box_threshold=0.0, text_threshold=0.0))
    assert len(calls) == 1 and len(objs) == 30 * len(det._chunk_cached(tags))
    assert {o.label for o in objs} <= set(tags)


@pytest.mark.slow
def test_blip3_ground_with_tiny_model_on_ray(scenes, tiny_gdino, tmp_path, ray_local, monkeypatch):  # noqa: F811
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("red circle\nblue square\nsky\n")
    out = tmp_path / "out"
    monkeypatch.setenv(ENV_VAR, str(tiny_gdino))  # found through the env var, as users may set it
    args = ["ground", str(scenes["images"]), str(out), "--tags", "vocab", "--vocab", str(vocab),
            "--box-threshold", "0.0", "--text-threshold", "0.0", "--max-objects", "4",
            "--workers", "2", "--shard-size", "2", "--db", str(tmp_path / "c.duckdb")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    infos = list_shards(out)
    assert len(infos) == 3 and infos[0].generator["model"] == "tiny-grounding-dino"
    samples = [s for i in infos for s in wds.WebDataset(str(i.tar), shardshuffle=False).decode()]
    rows = [row for i in infos for row in read_sidecar(i.parquet).to_pylist()]
    assert sorted(s["__key__"] for s in samples) == sorted(
        ["scene_000", "scene_001", "scene_002", "unlisted_003", sanitize_key("more/été (1)")])
    assert [row["error_message"].split(":")[0] for row in rows if row["status"] == "failed"] == ["decode"]
    for s in samples:
        objs = s["json"]["metadata"]["objects"]
        assert 1 <= len(objs) <= 4
        assert {o["label"] for o in objs} <= {"red circle", "blue square", "sky"}
        assert s["json"]["metadata"]["tags"] == ["red circle", "blue square", "sky"]
        assert {(c["format"], c["style"]) for c in s["json"]["captions"]} == {
            (f, st) for f in ("positional", "textual", "bbox") for st in ("tags", "inline")}
        assert s["txt"] == next(c["text"] for c in s["json"]["captions"]
                                if c["format"] == "positional" and c["style"] == "inline")
    by_key = {row["key"]: row for row in rows}
    for s in samples:
        scores = [o["score"] for o in s["json"]["metadata"]["objects"]]
        assert by_key[s["__key__"]]["n_objects"] == len(scores)
        assert by_key[s["__key__"]]["mean_confidence"] == pytest.approx(sum(scores) / len(scores), abs=1e-3)


def test_missing_weights_is_one_line(scenes, tmp_path):  # noqa: F811
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "blip3.cli", "ground", str(scenes["images"]), str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 2
    err = " ".join(r.stderr.split())
    assert "--model" in err and ENV_VAR in err and "IDEA-Research/grounding-dino-tiny" in err
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def test_clip_tags_feed_the_detector(tiny_clip, tiny_gdino, tmp_path):  # noqa: F811
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("dog\ncat\nfootball player\ntree\nsky\n")
    config = make_config(tags="clip", vocab=vocab, clip_model=tiny_clip, clip_top_k=2, model=tiny_gdino,
                         limits=DetectionLimits(box_threshold=0.0, text_threshold=0.0, max_objects=3))
    annotator = config()
    annotator.load()
    sample = InputSample(key="k", image=b"", ext="png", source_caption="a dog under a tree")
    ann = annotator.annotate(Image.new("RGB", (64, 48), (200, 200, 240)), sample)
    tags = ann.metadata["tags"]
    assert ann.metadata["tag_source"] == "clip" and 1 <= len(tags) <= 2 and set(tags) <= set(config.vocab)
    assert 1 <= ann.n_objects <= 3 and {o["label"] for o in ann.metadata["objects"]} <= set(tags)
    assert annotator.generator_info()["clip_model"] == "tiny-clip"


def test_hf_cache_is_the_last_lookup(tiny_gdino, tmp_path, monkeypatch):  # noqa: F811
    """With no flag and no env var, the model comes from the HF cache (local files only)."""
    import shutil

    from blip3.datagen.detectors_gdino import HF_REPO, resolve_grounding_dino

    hub = tmp_path / "hub"
    repo = hub / ("models--" + HF_REPO.replace("/", "--"))
    commit = "0" * 40
    shutil.copytree(tiny_gdino, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))  # read at call time
    found = resolve_grounding_dino(None)
    assert found == repo / "snapshots" / commit
    det = HFGroundingDino(found)
    det.load()
    assert det.detect(Image.new("RGB", (96, 64)), ["dog"], DetectionLimits(box_threshold=0.0, text_threshold=0.0))
    assert resolve_grounding_dino(tiny_gdino) == tiny_gdino  # the flag wins over the cache


def test_caption_tags_are_grounded_inline(tiny_gdino):  # noqa: F811
    config = make_config(tags="caption", model=tiny_gdino,
                         limits=DetectionLimits(box_threshold=0.0, text_threshold=0.0, max_objects=4))
    annotator = config()
    annotator.load()
    sample = InputSample(key="k", image=b"", ext="png", source_caption="A red circle next to a blue square.")
    ann = annotator.annotate(Image.new("RGB", (120, 80), (250, 250, 250)), sample)
    assert ann.metadata["tags"] == ["red circle", "blue square"]
    labels = {o["label"] for o in ann.metadata["objects"]}
    assert labels and labels <= {"red circle", "blue square"}
    inline = {c["format"]: c["text"] for c in ann.captions if c["style"] == "inline"}
    assert ann.default_caption == inline["positional"]
    for label in labels:
        assert f"{label} (" in inline["positional"] and f"<object>{label}</object><bbox>[" in inline["bbox"]
    assert "also contains" not in inline["positional"]  # every label was found in the caption
