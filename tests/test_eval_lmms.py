"""lmms-eval's own evaluator on a blip3 model directory (`--model blip3`, eval/lmms_eval.py).

Local lmms-eval tasks (YAML + utils.py + a parquet of images, all written here) are run by
`lmms_eval.evaluator.simple_evaluate` and by the `lmms-eval` command, which resolve `blip3`
through the installed entry point, load the tiny model directory, ask it and compute the task's
metric. generate_until: the targets are the model's own answers (asked directly through
`eval.runner.Generator`, the path `blip3 eval` uses) for all questions but one, so the metric is
3/4 only when every answer reaches its question. multiple_choice: every choice's value must be
the model's own training loss on it, and the gold choices make the accuracy 3/4 the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

lmms_eval = pytest.importorskip(
    "lmms_eval", reason="lmms-eval is not installed (make setup installs requirements-lmms.lock)")

from blip3.core.errors import UserError  # noqa: E402
from blip3.eval.runner import Generator  # noqa: E402
from blip3.eval.tasks import Prompt  # noqa: E402
from tests.eval_fixtures import tiny_model_dir  # noqa: E402,F401  (fixture)
from tests.model_fixtures import noise_image, tiny_config, tiny_processor  # noqa: E402,F401  (fixtures)

TASK = "blip3_local_vqa"
QUESTIONS = ["What color is the sky?", "How many dogs are there in the picture on the left side?",
             "Is it raining?", "What is written on the red sign near the door of the small house?"]
MAX_NEW = 6


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub: datasets and huggingface_hub offline, lmms-eval's datasets cache in tmp_path."""
    import datasets.config
    import huggingface_hub.constants

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
        monkeypatch.setattr(datasets.config, name, True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _write_task(root: Path, targets: list[str], until: str) -> Path:
    """An lmms-eval task folder: a generate_until task over a local parquet (image, question,
    answer) scored by exact_match."""
    import datasets

    images = [noise_image(40, 32, 900 + i) for i in range(len(QUESTIONS))]
    ds = datasets.Dataset.from_dict({"question": QUESTIONS, "answer": targets, "image": images})
    ds.cast_column("image", datasets.Image()).to_parquet(str(root / "test.parquet"))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(
        "def doc_to_visual(doc):\n    return [doc['image'].convert('RGB')]\n\n"
        "def doc_to_text(doc):\n    return doc['question']\n")
    (tasks / f"{TASK}.yaml").write_text(f"""\
task: {TASK}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {root / 'test.parquet'}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  until: [{json.dumps(until)}]
  max_new_tokens: {MAX_NEW}
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return tasks


def _direct_answers(model_dir: Path) -> list[str]:
    """What the model says to each question, asked as `blip3 eval` asks (base-model text: the
    image first, then the question)."""
    gen = Generator(model_dir)
    prompts = [Prompt("<image>\n" + q, [noise_image(40, 32, 900 + i)], chat=False) for i, q in enumerate(QUESTIONS)]
    return gen(prompts, MAX_NEW)


def _evaluate(tasks: Path, model_args: str) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    return simple_evaluate(model="blip3", model_args=model_args, tasks=[TASK], log_samples=True,
                           task_manager=TaskManager(include_path=str(tasks), include_defaults=False))


def test_blip3_is_in_lmms_evals_registry():
    """`--model blip3` resolves through the installed `lmms_eval.models` entry point."""
    from lmms_eval.models import get_model

    from blip3.eval.lmms_eval import Blip3

    assert get_model("blip3") is Blip3


@pytest.fixture(scope="module")
def local_task(tiny_model_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    """The task folder, and the answers the evaluator must collect: the model's own, cut at the
    task's stop string, which is taken from inside the first answer so that it does cut."""
    raw = _direct_answers(tiny_model_dir)
    assert len(set(raw)) == len(raw), "the tiny model must answer each question differently"
    assert len(raw[0]) > 4
    until = raw[0][2:4]
    expected = [r.split(until, 1)[0] for r in raw]
    assert expected[0] != raw[0]
    return _write_task(tmp_path_factory.mktemp("lmms-task"), expected[:3] + ["no model says this"], until), expected


def test_lmms_evaluator_scores_the_models_answers(tiny_model_dir, local_task, offline):
    tasks, expected = local_task
    out = _evaluate(tasks, f"pretrained={tiny_model_dir},batch_size=2,chat=false")

    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in samples] == expected
    assert out["results"][TASK]["exact_match,none"] == pytest.approx(0.75)


def test_lmms_eval_command_runs_blip3(tiny_model_dir, local_task, offline, tmp_path):
    """The command users run, in a process of its own: `--model blip3` found through the entry point."""
    tasks, _ = local_task
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "blip3", "--model_args",
           f"pretrained={tiny_model_dir},chat=false", "--tasks", TASK, "--include_path", str(tasks),
           "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (results,) = (tmp_path / "out").rglob("*_results.json")
    assert json.loads(results.read_text())["results"][TASK]["exact_match,none"] == pytest.approx(0.75)


def test_sampling_and_unknown_args_are_one_line_errors(tiny_model_dir, tmp_path, offline):
    from blip3.eval.lmms_eval import Blip3

    with pytest.raises(UserError, match="unknown model_args"):
        Blip3(pretrained=str(tiny_model_dir), temprature="0")
    model = Blip3(pretrained=str(tiny_model_dir))
    with pytest.raises(UserError, match="asks for sampling"):
        model._settings({"temperature": 0.7, "max_new_tokens": 4}, "some_task")
    with pytest.raises(NotImplementedError, match="multi-round"):
        model.generate_until_multi_round([])
    with pytest.raises(UserError, match="gives a str visual; blip3 reads images only"):
        model._prompt("What happens?", ["/videos/clip.mp4"], "some_video_task")


def test_context_markers_place_images_only_when_they_match(tiny_model_dir):
    """One `<image>` per image: the task placed them. Otherwise the markers are plain text and the
    images go first; chat-token spellings in the context never reach the tokenizer as tokens."""
    from blip3.eval.lmms_eval import Blip3

    model = Blip3(pretrained=str(tiny_model_dir), chat="false")
    image = noise_image(40, 32, 3)
    assert model._prompt("Look: <image> What is it?", [image], "t").text == "Look: <image> What is it?"
    assert model._prompt("<image><image> Two?", [image], "t").text == "<image>\n\u2039image\u203a\u2039image\u203a Two?"
    assert model._prompt("Hi<|end|><|assistant|>", [], "t").text == "Hi\u2039|end|\u203a\u2039|assistant|\u203a"


CHOICES = ["red", "green", "blue", "yellow"]


def _reference_losses(model_dir: Path) -> list[list[float]]:
    """The mean loss of " choice" after image + question (what lmms-eval's models return and its
    multiple_choice scoring takes the argmin of), by the model's own loss: transformers'
    cross-entropy over the labelled tokens, as training computes it. The continuation's tokens
    are those that follow the context's (lm-eval's split)."""
    import torch

    from blip3.model.config import IGNORE_INDEX
    from blip3.model.directory import load_model_dir

    model, proc = load_model_dir(model_dir)
    out = []
    for i, q in enumerate(QUESTIONS):
        text, image, row = "<image>\n" + q, noise_image(40, 32, 900 + i), []
        n_context = len(proc.encode_prompt(text, [image]))
        for choice in CHOICES:
            whole = proc.encode_prompt(text + " " + choice, [image])
            whole.labels = [IGNORE_INDEX] * n_context + whole.input_ids[n_context:]
            batch = proc.collate([whole])
            with torch.no_grad():
                loss = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                             pixel_values=batch["pixel_values"], image_sizes=batch.get("image_sizes")).loss
            row.append(float(loss))
        out.append(row)
    return out


def test_lmms_multiple_choice_scores_by_the_models_likelihood(tiny_model_dir, tmp_path, offline):
    import datasets

    losses = _reference_losses(tiny_model_dir)
    best = [min(range(len(CHOICES)), key=row.__getitem__) for row in losses]
    worst = [max(range(len(CHOICES)), key=row.__getitem__) for row in losses]
    labels = best[:3] + worst[3:]  # the model is right on 3 of 4
    images = [noise_image(40, 32, 900 + i) for i in range(len(QUESTIONS))]
    ds = datasets.Dataset.from_dict({"question": QUESTIONS, "label": labels, "image": images})
    ds.cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "mc.parquet"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text("def doc_to_visual(doc):\n    return [doc['image'].convert('RGB')]\n")
    (tasks / "blip3_local_mc.yaml").write_text(f"""\
task: blip3_local_mc
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {tmp_path / 'mc.parquet'}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: "{{{{question}}}}"
doc_to_choice: {json.dumps(CHOICES)}
doc_to_target: label
metric_list:
  - metric: acc
""")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    out = simple_evaluate(model="blip3", model_args=f"pretrained={tiny_model_dir},batch_size=3,chat=false",
                          tasks=["blip3_local_mc"], log_samples=True,
                          task_manager=TaskManager(include_path=str(tasks), include_defaults=False))

    samples = sorted(out["samples"]["blip3_local_mc"], key=lambda s: s["doc_id"])
    got = [[resp[0][0] for resp in s["resps"]] for s in samples]
    assert got == [pytest.approx(row, abs=1e-4) for row in losses]
    assert out["results"]["blip3_local_mc"]["acc,none"] == pytest.approx(0.75)


def test_chat_loglikelihood_scores_the_assistant_turn_only(tiny_model_dir):
    """Chat: the scored tokens are the continuation's, the `<|end|>` after it left out."""
    from blip3.eval.lmms_eval import Blip3
    from blip3.model.config import IGNORE_INDEX

    model = Blip3(pretrained=str(tiny_model_dir), chat="true")
    enc = model._scored(Prompt("<image>\nWhat color?", [noise_image(40, 32, 1)], chat=True), " dark blue")
    scored = [t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX]
    assert model.generator.proc.decode(scored, skip_special_tokens=False) == "dark blue"
