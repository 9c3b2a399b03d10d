"""The BLIP3-KALE distillation loop in the tiny pipeline, end to end on CPU: stage-1 recaptions
(tiny LLaVA + tiny Llama) -> `blip3 train manifests/tiny/distill.yaml` on them -> `blip3 recaption
--model <that stage>` captions the rest. The captions are nonsense at this size; the test checks
the plumbing: the trainer read exactly the stage-1 shards, and each stage-2 caption is what the
trained model itself generates for the image."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image
from typer.testing import CliRunner

from blip3.cli import app
from blip3.core.shards import file_sha256
from blip3.datagen.inputs import InputSample
from blip3.datagen.recaption import make_config
from blip3.datagen.recaption_models import GenerationSettings, model_revision
from tests.recaption_fixtures import tiny_llama, tiny_llava, write_images  # noqa: F401

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_distillation_loop_in_the_tiny_pipeline(ray_local, tmp_path, tiny_llava, tiny_llama, monkeypatch):  # noqa: F811
    images = write_images(tmp_path / "all", 10)
    part1, part2 = tmp_path / "part1", tmp_path / "part2"
    for i, part in ((i, part1 if i < 6 else part2) for i in range(10)):
        part.mkdir(exist_ok=True)
        for f in images.glob(f"img_{i:02d}.*"):
            shutil.copy(f, part / f.name)
    db = tmp_path / "c.duckdb"
    common = ["--db", str(db), "--workers", "1", "--max-new-tokens", "8"]

    # stage 1: the large models caption the first part
    stage1 = tmp_path / "kale-stage1"
    r = CliRunner().invoke(app, ["recaption", str(part1), "-o", str(stage1), "--vlm", str(tiny_llava),
                                 "--llm", str(tiny_llama), "--merge-max-new-tokens", "8", *common])
    assert r.exit_code == 0, r.output

    # distillation: the shipped stage file trains our tiny model on exactly those shards
    monkeypatch.setenv("BLIP3_KALE_CAPTIONS", str(stage1))
    monkeypatch.chdir(tmp_path)  # runs/ lands here
    r = CliRunner().invoke(app, ["train", str(REPO / "manifests/tiny/distill.yaml"), "--out", str(tmp_path / "runs"),
                                 "--db", str(db)])
    assert r.exit_code == 0, r.output
    student = tmp_path / "runs" / "distill"
    manifest = yaml.safe_load((student / "mixture.yaml").read_text())
    (source,) = manifest["sources"]
    shards = {Path(s["path"]).name: s["sha256"] for s in source["shards"]}
    assert shards == {p.name: file_sha256(p) for p in stage1.glob("*.tar")}

    # stage 2: the student captions the rest, traced to its directory and revision
    stage2 = tmp_path / "kale-stage2"
    r = CliRunner().invoke(app, ["recaption", str(part2), "-o", str(stage2), "--model", str(student), "--no-llm",
                                 *common])
    assert r.exit_code == 0, r.output
    gen = json.loads((stage2 / "00000_stats.json").read_text())["generator"]
    final = student / "final"
    assert gen["vlm"] == {"model": "final", "model_kind": "blip3", "revision": model_revision(final), "prompt": None,
                          "format": "caption", "max_new_tokens": 8, "do_sample": False}
    assert gen["llm"] is None
    got = {s["__key__"]: s["txt"].decode() for s in wds.WebDataset(str(stage2 / "00000.tar"), shardshuffle=False)}
    assert sorted(got) == [f"img_{i:02d}" for i in range(6, 10)]

    # plumbing exact: each caption is the student's own greedy continuation of `<s><image>`
    from blip3.model.config import IMAGE_TOKEN
    from blip3.train.builders import load_model_dir

    model, proc = load_model_dir(student)
    for key, caption in got.items():
        image = Image.open(part2 / f"{key}.png").convert("RGB")
        enc = proc.collate([proc.encode_prompt(IMAGE_TOKEN, [image])])
        new = model.eval().generate(enc["input_ids"], enc["attention_mask"], enc.get("pixel_values"),
                                    enc.get("image_sizes"), max_new_tokens=8, do_sample=False,
                                    eos_token_id=[proc.tokenizer.eos_token_id, proc.end_of_chunk_id],
                                    pad_token_id=proc.pad_id)
        assert caption == proc.decode(new[0]).strip(), key

    # and a batch of the student's captions is the same as one at a time (left padding)
    one = make_config(vlm=student, use_llm=False, vlm_generation=GenerationSettings(max_new_tokens=8, batch_size=1))()
    four = make_config(vlm=student, use_llm=False, vlm_generation=GenerationSettings(max_new_tokens=8, batch_size=4))()
    one.load()
    four.load()
    imgs = [Image.open(part2 / f"{k}.png").convert("RGB") for k in sorted(got)]
    samples = [InputSample(key=k, image=b"", ext="png") for k in sorted(got)]
    with torch.no_grad():
        assert ([a.default_caption for a in four.annotate_batch(imgs, samples)]
                == [one.annotate(im, s).default_caption for im, s in zip(imgs, samples)] == [got[k] for k in sorted(got)])
