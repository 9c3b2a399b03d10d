"""`blip3 recaption` without Ray: tiny real models (tests/recaption_fixtures.py) through the
annotator, the prompts as docs/captions.md shows them, batch invariance, missing weights and
backends as one line, the settings file, and the quality signals."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from blip3.core.errors import MissingWeightsError, UserError
from blip3.datagen.annotator import Annotation, SkipSample
from blip3.datagen.inputs import InputSample
from blip3.datagen.recaption import make_config, read_settings
from blip3.datagen.recaption_models import LLM_ENV, VLM_ENV, GenerationSettings, HFText, HFVision, model_revision
from blip3.datagen.recaption_prompts import (DEFAULT_MERGE_PROMPT, DEFAULT_VLM_PROMPT, check_merge_prompt,
                                             clean_slot, fill_merge_prompt)
from blip3.datagen.recaption_quality import caption_scores, is_refusal, named_entities, repetition
from tests.recaption_fixtures import ALT_TEXTS, LLAVA_TEMPLATE, tiny_llama, tiny_llava, write_images  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
GREEDY = GenerationSettings(max_new_tokens=6, batch_size=1)


def _doc_blocks() -> dict[str, str]:
    """The ```text blocks of docs/captions.md marked `<!-- recaption:NAME -->`, and its tables."""
    text = (REPO / "docs" / "captions.md").read_text()
    blocks = {m.group(1): m.group(2) for m in re.finditer(r"<!-- recaption:([\w-]+) -->\n```text\n(.*?)\n```", text, re.S)}
    table = re.search(r"<!-- recaption:example-scores -->\n((?:\|.*\n)+)", text).group(1)
    blocks["scores"] = table
    return blocks


def _inputs(tmp_path: Path, n: int = 6) -> tuple[list[Image.Image], list[InputSample]]:
    root = write_images(tmp_path / "imgs", n)
    images = [Image.open(root / f"img_{i:02d}.png").convert("RGB") for i in range(n)]
    samples = [InputSample(key=f"img_{i:02d}", image=b"", ext="png", source_caption=ALT_TEXTS[i % len(ALT_TEXTS)])
               for i in range(n)]
    return images, samples


def _annotator(vlm, llm, vlm_gen=GREEDY, llm_gen=GREEDY, **kw):
    a = make_config(vlm=vlm, llm=llm, vlm_generation=vlm_gen, llm_generation=llm_gen, **kw)()
    a.load()
    return a


def _outcome(r: Annotation | SkipSample) -> tuple:
    return (r.error,) if isinstance(r, SkipSample) else (r.default_caption, r.captions, r.metadata)


# -- prompts ----------------------------------------------------------------------------------
def test_default_prompts_and_worked_example_are_as_documented():
    docs = _doc_blocks()
    assert docs["vlm-prompt"] == DEFAULT_VLM_PROMPT
    assert docs["merge-prompt"] == DEFAULT_MERGE_PROMPT
    assert fill_merge_prompt(DEFAULT_MERGE_PROMPT, docs["example-dense"], docs["example-alt-text"]) == docs["example-prompt"]
    scores = caption_scores(docs["example-merged"], docs["example-alt-text"], merged=True, refusal=False, empty=False)
    rows = dict(re.findall(r"^\| (\w+) \| ([\d.]+) \|$", docs["scores"], re.M))
    assert {k: float(v) for k, v in rows.items()} == {k: float(v) for k, v in scores.items()}


def test_models_are_given_exactly_the_documented_prompts(tiny_llava, tiny_llama, tmp_path, monkeypatch):  # noqa: F811
    images, samples = _inputs(tmp_path, 3)
    samples[0].source_caption = "Eiffel Tower at night,<|endoftext|> Paris"  # a special token in the data is removed
    a = _annotator(tiny_llava, tiny_llama)
    seen_vlm: list[str] = []
    seen_llm: list[str] = []
    proc, tok = a.vision.processor, a.text.tokenizer
    real_proc, real_tok = type(proc).__call__, type(tok).__call__
    monkeypatch.setattr(type(proc), "__call__", lambda self, *args, **kw: seen_vlm.extend(kw["text"]) or real_proc(self, *args, **kw))
    monkeypatch.setattr(type(tok), "__call__", lambda self, text, **kw: (self is tok and seen_llm.extend(text)) or real_tok(self, text, **kw))
    out = a.annotate_batch(images, samples)
    # the VLM: the documented prompt in the LLaVA chat template, one user turn, the image first
    assert seen_vlm == [f"user: <image>\n{DEFAULT_VLM_PROMPT}\nassistant:"] * 3
    # the LLM: samples with alt-text only (1 has none), the documented prompt in its chat template
    merged = [i for i in range(3) if ALT_TEXTS[i]]
    expected = [fill_merge_prompt(DEFAULT_MERGE_PROMPT, out[i].metadata["dense_caption"], ALT_TEXTS[i]) for i in merged]
    assert seen_llm == [f"<|user|>\n{e}<|end|>\n<|assistant|>\n" for e in expected]
    assert [o.metadata["merge"] for o in out] == ["merged", "no_alt_text", "merged"]
    assert out[1].default_caption == out[1].metadata["dense_caption"] and len(out[1].captions) == 1
    assert out[0].default_caption == out[0].captions[1]["text"] != out[0].metadata["dense_caption"]


def test_data_cannot_reach_into_the_prompt():
    specials = ["<|endoftext|>", "<image>"]
    alt = "Nice <|endoftext|><image> {dense_caption}  end"
    assert clean_slot(alt, specials) == "Nice {dense_caption} end"
    filled = fill_merge_prompt("D: {dense_caption} A: {alt_text}", "a {alt_text} b", clean_slot(alt, specials))
    assert filled == "D: a {alt_text} b A: Nice {dense_caption} end"  # one pass: slot names in data stay text
    assert len(clean_slot("x" * 10_000)) == 2000
    with pytest.raises(UserError, match=r"--merge-prompt: the merge prompt must contain \{alt_text\}"):
        check_merge_prompt("only {dense_caption}")


# -- batches, determinism ---------------------------------------------------------------------
def test_greedy_output_does_not_depend_on_the_batch(tiny_llava, tiny_llama, tmp_path):  # noqa: F811
    images, samples = _inputs(tmp_path, 6)
    one = _annotator(tiny_llava, tiny_llama)
    reference = [_outcome(one.annotate(im, s)) for im, s in zip(images, samples)]
    assert len({r[0] for r in reference}) > 1  # the images do get different captions
    for vb, lb in ((4, 3), (6, 6)):
        many = _annotator(tiny_llava, tiny_llama, replace(GREEDY, batch_size=vb), replace(GREEDY, batch_size=lb))
        assert [_outcome(r) for r in many.annotate_batch(images, samples)] == reference, (vb, lb)
    assert "batch_size" not in str(one.generator_info())  # greedy: a batch size redoes no shard


def test_sampling_is_seeded_per_batch(tiny_llava, tmp_path):  # noqa: F811
    images, samples = _inputs(tmp_path, 2)
    sampled = replace(GREEDY, do_sample=True, batch_size=2, seed=3)
    first = _annotator(tiny_llava, None, sampled, use_llm=False).annotate_batch(images, samples)
    again = _annotator(tiny_llava, None, sampled, use_llm=False).annotate_batch(images, samples)
    assert [_outcome(r) for r in first] == [_outcome(r) for r in again]
    other = _annotator(tiny_llava, None, replace(sampled, seed=4), use_llm=False).annotate_batch(images, samples)
    assert [_outcome(r) for r in other] != [_outcome(r) for r in first]
    info = _annotator(tiny_llava, None, sampled, use_llm=False).generator_info()
    assert info["vlm"]["batch_size"] == 2 and info["vlm"]["seed"] == 3 and info["llm"] is None


def test_generator_info_traces_models_prompts_and_settings(tiny_llava, tiny_llama):  # noqa: F811
    c = make_config(vlm=tiny_llava, llm=tiny_llama, vlm_generation=GREEDY)
    info = c().generator_info()  # unloaded: the driver asks it too
    assert info["vlm"] == {"model": "tiny-llava", "model_kind": "hf", "revision": model_revision(tiny_llava),
                           "prompt": DEFAULT_VLM_PROMPT, "format": "chat", "max_new_tokens": 6, "do_sample": False}
    assert info["llm"]["prompt"] == DEFAULT_MERGE_PROMPT and info["llm"]["model"] == "tiny-llama"
    assert info["llm"]["revision"].startswith("sha256:") and info["llm"]["revision"] != info["vlm"]["revision"]


def test_revision_is_the_hub_commit_of_a_cache_snapshot(tmp_path, tiny_llama):  # noqa: F811
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "models--org--m" / "snapshots" / commit
    snap.parent.mkdir(parents=True)
    snap.symlink_to(tiny_llama)
    assert model_revision(snap) == commit
    assert model_revision(tiny_llama) == model_revision(tiny_llama)


# -- what the user gets wrong -------------------------------------------------------------------
def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in (VLM_ENV, LLM_ENV)}
    return subprocess.run([sys.executable, "-m", "blip3.cli", "recaption", *args], capture_output=True, text=True,
                          env={**environ, "BLIP3_NO_PROGRESS": "1", **(env or {})}, timeout=300)


def _one_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_missing_weights_is_one_line_naming_what_to_set(tmp_path, tiny_llava, monkeypatch):  # noqa: F811
    monkeypatch.delenv(VLM_ENV, raising=False)
    with pytest.raises(MissingWeightsError, match=r"no captioning VLM given: pass --vlm DIR or set \$BLIP3_RECAPTION_VLM=DIR"):
        make_config()
    imgs = write_images(tmp_path / "imgs", 1)
    line = _one_line(_cli(str(imgs), "-o", str(tmp_path / "out")))
    assert "pass --vlm DIR or set $BLIP3_RECAPTION_VLM=DIR" in line
    line = _one_line(_cli(str(imgs), "-o", str(tmp_path / "out"), env={VLM_ENV: str(tiny_llava)}))
    assert "pass --llm DIR or set $BLIP3_RECAPTION_LLM=DIR" in line
    line = _one_line(_cli(str(imgs), "-o", str(tmp_path / "out"), "--vlm", str(tmp_path / "nowhere"), "--no-llm"))
    assert "--vlm=" in line and "config.json missing" in line
    assert not (tmp_path / "out").exists()


def test_vllm_backend_missing_is_one_line(tmp_path, tiny_llava):  # noqa: F811
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    imgs = write_images(tmp_path / "imgs", 1)
    line = _one_line(_cli(str(imgs), "-o", str(tmp_path / "out"), "--vlm", str(tiny_llava), "--no-llm",
                          "--backend", "vllm"))
    assert "--backend: the vllm backend needs the `vllm` package" in line


def test_settings_file_is_checked_and_options_win(tmp_path, tiny_llava, tiny_llama):  # noqa: F811
    f = tmp_path / "kale.yaml"
    f.write_text(f"vlm: {{model: {tiny_llava}, max_new_tokens: 5, batch_size: 2}}\n"
                 f"llm: {{model: {tiny_llama}, prompt: 'A {{alt_text}} B {{dense_caption}}', do_sample: true}}\n")
    s = read_settings(f)
    assert s["vlm"]["max_new_tokens"] == 5 and s["llm"]["do_sample"] is True
    for bad, says in (("vlm: {max_tokens: 5}", "vlm.max_tokens: unknown field"),
                      ("vlm: {batch_size: two}", "vlm.batch_size: expected a int"),
                      ("llm: [1]", "llm: expected a mapping"), ("models: {}", "models: unknown field")):
        f2 = tmp_path / "bad.yaml"
        f2.write_text(bad + "\n")
        with pytest.raises(UserError, match=re.escape(says)):
            read_settings(f2)
    imgs = write_images(tmp_path / "imgs", 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("vlm: {batch_size: 0}\n")
    assert "--batch-size: must be at least 1" in _one_line(_cli(str(imgs), "-o", str(tmp_path / "o"), "--config",
                                                                str(bad), "--vlm", str(tiny_llava), "--no-llm"))
    # the option given on the command line wins over the file: the job gets past the settings
    # (to the empty input, the next check)
    (tmp_path / "none").mkdir()
    line = _one_line(_cli(str(tmp_path / "none"), "-o", str(tmp_path / "o"), "--config", str(bad), "--vlm",
                          str(tiny_llava), "--no-llm", "--batch-size", "2"))
    assert "no input images found" in line


# -- quality signals ----------------------------------------------------------------------------
def test_named_entities_and_their_survival():
    assert named_entities("A photo of Barack Obama and Angela Merkel in Berlin, 2013") == [
        "Barack Obama", "Angela Merkel", "Berlin", "2013"]
    assert named_entities("new iPhone 15 Pro by Apple | Stock Photo") == ["iPhone 15 Pro", "Apple"]
    assert named_entities("a cat on a mat") == []
    s = caption_scores("barack obama speaks; Angela  Merkel listens.", "Barack Obama meets Angela Merkel in Berlin",
                       merged=True, refusal=False, empty=False)
    assert (s["alt_entities"], s["entities_kept"], s["entity_survival"]) == (3, 2, 0.6667)
    assert "entity_survival" not in caption_scores("x", "a cat", merged=False, refusal=False, empty=False)
    assert caption_scores("Berliner Dom", "Berlin", merged=True, refusal=False, empty=False)["entities_kept"] == 0


def test_repetition_and_refusals():
    assert repetition("a red car a red car a red car a red car") == 0.7
    assert repetition("one two three four five") == 0.0 and repetition("one two") == 0.0
    assert is_refusal("  I'm sorry, but I can't describe people.") and is_refusal("As an AI model ...")
    assert not is_refusal("A sorry-looking dog.")


def test_blip3_model_batches_are_left_padded(tmp_path):
    """Our own model directory with any-res crops: images of other shapes give prompts of other
    lengths, so a batch is padded; greedy captions must not depend on it."""
    from blip3.model.config import get_config
    from blip3.model.processor import XGenMMProcessor
    from tests.model_fixtures import build_tiny_model, noise_image

    cfg = get_config("tiny")
    build_tiny_model(cfg, seed=3).save_pretrained(tmp_path / "m")
    XGenMMProcessor.from_config(cfg, anyres=True).save_pretrained(tmp_path / "m")
    sizes = [(32, 32), (96, 32), (32, 96), (64, 64), (40, 90)]
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    samples = [InputSample(key=f"k{i}", image=b"", ext="png") for i in range(len(images))]
    single = _annotator(tmp_path / "m", None, GenerationSettings(max_new_tokens=5, batch_size=1), use_llm=False)
    batched = _annotator(tmp_path / "m", None, GenerationSettings(max_new_tokens=5, batch_size=5), use_llm=False)
    assert single.vision.ref.kind == "blip3" and single.generator_info()["vlm"]["format"] == "caption"
    lengths = {len(single.vision._encode(im, None).input_ids) for im in images}
    assert len(lengths) > 1  # the batch really is padded
    expected = [_outcome(single.annotate(im, s)) for im, s in zip(images, samples)]
    assert [_outcome(r) for r in batched.annotate_batch(images, samples)] == expected


def test_a_mixture_can_train_on_the_dense_caption():
    from blip3.mixture.caption_choice import chosen_caption, validate_caption_choice

    record = {"captions": [{"text": "dense words", "style": "dense", "model": "v"},
                           {"text": "merged words", "style": "knowledge", "model": "l"}]}
    for style, text in (("dense", "dense words"), ("knowledge", "merged words")):
        assert chosen_caption(record, validate_caption_choice({"style": style}, field="caption"), key="k") == text


# -- the pipeline hands a shard's images to the annotator at once --------------------------------
def test_a_shard_is_captioned_in_batches(tiny_llava, tmp_path, monkeypatch):  # noqa: F811
    from blip3.core.shards import read_sidecar
    from blip3.datagen.images import ImageLimits
    from blip3.datagen.plans import job_plans
    from blip3.datagen.pipeline import write_shard

    src = write_images(tmp_path / "imgs", 6)
    (plan,) = job_plans(str(src), None, shard_size=6)
    calls: list[int] = []
    real = HFVision.generate
    monkeypatch.setattr(HFVision, "generate", lambda self, images, prompt: calls.append(len(images)) or real(self, images, prompt))
    a = _annotator(tiny_llava, None, replace(GREEDY, batch_size=4), use_llm=False)
    stats = write_shard(tmp_path / "out", plan, a, ImageLimits(), {"name": "recaption"})
    assert calls == [4, 2] and stats["successes"] == 6
    assert read_sidecar(tmp_path / "out" / "00000.parquet").column("status").to_pylist() == ["success"] * 6

    # the scores reach the catalog once per shard version: a second pass reads no tar
    from blip3.core.catalog import Catalog
    from blip3.core.sql import run_query
    from blip3.datagen.recaption_scores import register_scores

    db = tmp_path / "c.duckdb"
    with Catalog(db) as cat:
        cat.add_output(str(tmp_path / "out"), source="kale")
    assert register_scores(db, "kale") == 1 and register_scores(db, "kale") == 0
    rows = run_query("SELECT key, length_chars, merged FROM v_recaption_scores ORDER BY key", db).to_pylist()
    assert [r["key"] for r in rows] == [f"img_{i:02d}" for i in range(6)] and all(r["merged"] == 0 for r in rows)


def test_a_batch_that_raises_is_redone_image_by_image(tmp_path):
    """Unit logic of `annotate_steps` with a stand-in annotator: one image that breaks the batch
    fails alone, with its reason; the others are annotated."""
    from blip3.datagen.images import ImageLimits
    from blip3.datagen.plans import job_plans
    from blip3.datagen.pipeline import annotate_steps, decode_plan

    class Picky:
        name = "picky"

        def annotate_batch(self, images, samples):
            raise RuntimeError("batch broke")

        def annotate(self, image, sample):
            if sample.key == "img_01":
                raise ValueError("bad image")
            return Annotation(sample.key, [], {})

    (plan,) = job_plans(str(write_images(tmp_path / "imgs", 3)), None, shard_size=3)
    items = annotate_steps(decode_plan(plan, ImageLimits()), Picky())
    assert [(i.row.status, i.row.error_message) for i in items] == [
        ("success", None), ("failed", "annotate: ValueError: bad image"), ("success", None)]
    assert items[0].annotation.default_caption == "img_00"


def test_vllm_backend_is_fed_the_transformers_prompts(tiny_llava, tiny_llama, tmp_path, monkeypatch):  # noqa: F811
    """Unit logic of the vLLM backend with a stand-in `vllm` module (vllm itself needs a GPU node):
    the same rendered prompts as the transformers backend, greedy as temperature 0, one image per
    request."""
    import importlib.machinery
    import types

    requests: list = []

    class LLM:
        def __init__(self, model, seed, **kw):
            self.model, self.kw = model, kw

        def generate(self, reqs, params, use_tqdm=False):
            requests.append((self.model, reqs, params))
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f" out{i} ")]) for i in range(len(reqs))]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, lambda **kw: kw
    fake.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # what find_spec answers for it
    monkeypatch.setitem(sys.modules, "vllm", fake)
    images, samples = _inputs(tmp_path, 2)
    hf = _annotator(tiny_llava, tiny_llama)
    v = _annotator(tiny_llava, tiny_llama, replace(GREEDY, batch_size=2), backend="vllm")
    out = v.annotate_batch(images, samples)
    (vlm_model, vlm_reqs, vlm_params), (llm_model, llm_reqs, llm_params) = requests
    assert vlm_model == str(tiny_llava) and [r["prompt"] for r in vlm_reqs] == [hf.vision.render(DEFAULT_VLM_PROMPT)] * 2
    assert [r["multi_modal_data"]["image"] for r in vlm_reqs] == images
    assert vlm_params["temperature"] == 0.0 and vlm_params["max_tokens"] == 6
    assert llm_reqs == [hf.text.render(fill_merge_prompt(DEFAULT_MERGE_PROMPT, "out0", ALT_TEXTS[0]))]  # 1 has no alt
    assert [o.default_caption for o in out] == ["out0", "out1"] and v.generator_info()["backend"] == "vllm"
