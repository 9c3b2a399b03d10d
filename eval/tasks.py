"""Benchmarks read from local files in their published layouts, with their prompts and scoring.

Every task lives in its own folder under the data directory (`--data`, default `./eval-data`),
laid out as the benchmark ships it (see docs/evaluation.md):

    vqav2/    v2_OpenEnded_mscoco_val2014_questions.json  v2_mscoco_val2014_annotations.json  val2014/
              (few-shot: the same names with train2014, and train2014/)
    okvqa/    OpenEnded_mscoco_val2014_questions.json  mscoco_val2014_annotations.json  val2014/ (+ train2014)
    textvqa/  TextVQA_0.5.1_val.json (+ TextVQA_0.5.1_train.json)  train_images/
    coco/     annotations/captions_val2014.json (+ captions_train2014.json)  val2014/ (+ train2014/)
    pope/     coco_pope_{random,popular,adversarial}.json (JSON lines)  val2014/
    mmbench/  mmbench_dev_en.tsv (images inline, base64)

Prompts follow the released base model's few-shot evaluation (OpenFlamingo's formats:
`<image>Question:{q} Short answer:{a}<|endofchunk|>`, `<image>Output:{caption}<|endofchunk|>`)
and, for the instruct benchmarks (POPE, MMBench), the LLaVA-style chat instructions.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from blip3.core.errors import UserError
from blip3.eval import metrics

#: Text the processor would read as structure: image markers, chunk ends, chat turns. A question or
#: caption from a benchmark file never gets to place images or end a turn.
_MARKUP = re.compile(r"<image>|<\|[a-z_]+\|>")

VQA_INSTRUCTION = "Answer the question using a single word or phrase."
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def clean(text: str) -> str:
    return _MARKUP.sub(" ", str(text)).strip()


@dataclass
class Item:
    """One benchmark question: `target` holds what scoring needs (answers, label, references...)."""

    id: str
    image: Callable[[], Image.Image]
    question: str = ""
    target: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prompt:
    text: str
    images: list[Image.Image]
    chat: bool  # wrap in the chat template (instruct benchmarks) or raw few-shot text (base model)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"not a readable JSON file ({type(e).__name__})", file=path) from None


def _need(path: Path, what: str) -> Path:
    """`path`, or the one line that says what to put there."""
    if not path.exists():
        raise UserError(f"missing; put {what} here (see docs/evaluation.md)", file=path)
    return path


class _ImageFile:
    """A benchmark image on disk, decoded when a prompt needs it. `raw()` is its file's bytes and
    `ref` names it (decontamination in datagen/decontam.py hashes benchmark images through these)."""

    def __init__(self, path: Path):
        self.path = path
        self.ref = str(path)

    def raw(self) -> bytes:
        return self.path.read_bytes()

    def __call__(self) -> Image.Image:
        try:
            with Image.open(self.path) as im:
                return im.convert("RGB")
        except OSError as e:
            raise UserError(f"not a readable image ({type(e).__name__})", file=self.path) from None


def _image_file(path: Path) -> Callable[[], Image.Image]:
    return _ImageFile(path)


class Task:
    """A benchmark: where its files are, how to prompt, how to read an answer, how to score."""

    name: str = ""
    zero_shot_only = False
    metric: str = ""  # the headline metric

    def load(self, root: Path, split: str) -> list[Item]:  # split: "test" or "train"
        raise NotImplementedError

    def prompt(self, item: Item, shots: list[Item]) -> Prompt:
        raise NotImplementedError

    def answer(self, generated: str) -> str:
        return generated.strip()

    def score_item(self, item: Item, answer: str) -> float | None:
        """Per-sample score stored with the prediction (None when only the corpus has one)."""
        return None

    def score(self, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
        raise NotImplementedError


# --- VQA (VQAv2, OK-VQA, TextVQA) --------------------------------------------------------------
class VQATask(Task):
    metric = "accuracy"
    folder = ""
    files: dict[str, tuple[str, str, str]] = {}  # split -> (questions, annotations, image folder)
    image_name = "COCO_{split}2014_{image_id:012d}.jpg"

    def load(self, root: Path, split: str) -> list[Item]:
        qfile, afile, images = self.files[split]
        base = root / self.folder
        questions = _read_json(_need(base / qfile, f"the {self.name} {split} questions ({qfile})"))
        annotations = _read_json(_need(base / afile, f"the {self.name} {split} annotations ({afile})"))
        try:
            answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in annotations["annotations"]}
            items = []
            for q in questions["questions"]:
                name = self.image_name.format(split=images.removesuffix("2014"), image_id=int(q["image_id"]))
                items.append(Item(str(q["question_id"]), _image_file(base / images / name), clean(q["question"]),
                                  {"answers": [str(a) for a in answers[q["question_id"]]]}))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"not in the VQA layout (missing {e})", file=base / qfile) from None
        return items

    def prompt(self, item: Item, shots: list[Item]) -> Prompt:
        demo = "".join(f"<image>Question:{s.question} Short answer:{clean(_majority(s.target['answers']))}"
                       "<|endofchunk|>" for s in shots)
        return Prompt(f"{demo}<image>Question:{item.question} Short answer:",
                      [s.image() for s in shots] + [item.image()], chat=False)

    def answer(self, generated: str) -> str:
        # OpenFlamingo's post-processing: the model may go on to a next "Question:".
        return re.split(r"Question|Answer|Short", generated, maxsplit=1)[0].strip()

    def score_item(self, item: Item, answer: str) -> float:
        return metrics.vqa_accuracy(answer, item.target["answers"])

    def score(self, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
        return {"accuracy": sum(self.score_item(i, answers[i.id]) for i in items) / len(items)}


def _majority(answers: list[str]) -> str:
    """The most common human answer (first on ties): the in-context example's answer."""
    return max(answers, key=lambda a: (answers.count(a), -answers.index(a)))


class VQAv2(VQATask):
    name, folder = "vqav2", "vqav2"
    files = {"test": ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json", "val2014"),
             "train": ("v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json",
                       "train2014")}


class OKVQA(VQATask):
    name, folder = "okvqa", "okvqa"
    files = {"test": ("OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json", "val2014"),
             "train": ("OpenEnded_mscoco_train2014_questions.json", "mscoco_train2014_annotations.json", "train2014")}


class TextVQA(VQATask):
    name, folder = "textvqa", "textvqa"
    split_files = {"test": "TextVQA_0.5.1_val.json", "train": "TextVQA_0.5.1_train.json"}

    def load(self, root: Path, split: str) -> list[Item]:
        base = root / self.folder
        path = _need(base / self.split_files[split], f"the TextVQA {split} file")
        try:
            return [Item(str(d["question_id"]), _image_file(base / "train_images" / f"{Path(str(d['image_id'])).name}.jpg"),
                         clean(d["question"]), {"answers": [str(a) for a in d["answers"]]})
                    for d in _read_json(path)["data"]]
        except (KeyError, TypeError) as e:
            raise UserError(f"not in the TextVQA layout (missing {e})", file=path) from None


# --- captioning ---------------------------------------------------------------------------------
class COCOCaptions(Task):
    name, metric = "coco", "CIDEr"
    files = {"test": ("captions_val2014.json", "val2014"), "train": ("captions_train2014.json", "train2014")}
    meteor: bool | None = None  # None: when Java is installed

    def load(self, root: Path, split: str) -> list[Item]:
        ann_name, images = self.files[split]
        path = _need(root / "coco" / "annotations" / ann_name, f"the COCO {split} captions ({ann_name})")
        data = _read_json(path)
        try:
            refs: dict[int, list[str]] = {}
            for a in data["annotations"]:
                refs.setdefault(a["image_id"], []).append(str(a["caption"]))
            return [Item(str(im["id"]), _image_file(root / "coco" / images / Path(im["file_name"]).name), "",
                         {"references": refs[im["id"]]}) for im in data["images"] if im["id"] in refs]
        except (KeyError, TypeError) as e:
            raise UserError(f"not in the COCO captions layout (missing {e})", file=path) from None

    def prompt(self, item: Item, shots: list[Item]) -> Prompt:
        demo = "".join(f"<image>Output:{clean(s.target['references'][0])}<|endofchunk|>" for s in shots)
        return Prompt(f"{demo}<image>Output:", [s.image() for s in shots] + [item.image()], chat=False)

    def answer(self, generated: str) -> str:
        return generated.split("Output", 1)[0].strip()

    def score(self, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
        return metrics.caption_scores({i.id: i.target["references"] for i in items},
                                      {i.id: answers[i.id] for i in items}, meteor=self.meteor)


# --- POPE -----------------------------------------------------------------------------------------
class POPE(Task):
    name, metric, zero_shot_only = "pope", "f1", True
    splits = ("random", "popular", "adversarial")

    def load(self, root: Path, split: str) -> list[Item]:
        base = root / "pope"
        files = [base / f"coco_pope_{s}.json" for s in self.splits if (base / f"coco_pope_{s}.json").exists()]
        if not files:
            _need(base / "coco_pope_random.json", "the POPE question files (coco_pope_{random,popular,adversarial}.json)")
        items = []
        for path in files:
            split_name = path.stem.removeprefix("coco_pope_")
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    label = str(d["label"]).strip().lower()
                    if label not in ("yes", "no"):
                        raise ValueError(f"label {label!r} is not yes/no")
                    items.append(Item(f"{split_name}/{d['question_id']}", _image_file(base / "val2014" / Path(d["image"]).name),
                                      clean(d["text"]), {"label": label, "split": split_name}))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise UserError(f"line {n}: not a POPE question ({type(e).__name__}: {e})", file=path) from None
        return items

    def prompt(self, item: Item, shots: list[Item]) -> Prompt:
        return Prompt(f"<image>\n{item.question}\n{VQA_INSTRUCTION}", [item.image()], chat=True)

    def score_item(self, item: Item, answer: str) -> float:
        return float(metrics.parse_yes_no(answer) == item.target["label"])

    def score(self, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
        out = metrics.pope_metrics([answers[i.id] for i in items], [i.target["label"] for i in items])
        for split in sorted({i.target["split"] for i in items}):
            part = [i for i in items if i.target["split"] == split]
            sub = metrics.pope_metrics([answers[i.id] for i in part], [i.target["label"] for i in part])
            out.update({f"{split}/{k}": v for k, v in sub.items()})
        return out


# --- MMBench (multiple choice, circular) ---------------------------------------------------------
class MMBench(Task):
    name, metric, zero_shot_only = "mmbench", "circular_accuracy", True
    file = "mmbench_dev_en.tsv"

    def load(self, root: Path, split: str) -> list[Item]:
        path = _need(root / "mmbench" / self.file, "the MMBench tsv (MMBench_DEV_EN.tsv, renamed)")
        csv.field_size_limit(1 << 30)
        items = []
        with path.open(encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.DictReader(f, delimiter="\t"), 2):
                try:
                    options = {k: clean(row[k]) for k in "ABCDEFGHI" if row.get(k) not in (None, "", "nan")}
                    answer = row["answer"].strip()
                    if answer not in options:
                        raise ValueError(f"answer {answer!r} is not one of the options")
                    image = _b64_image(row["image"], path, n)
                    hint = clean(row.get("hint") or "")
                    hint = "" if hint == "nan" else hint
                except (KeyError, ValueError) as e:
                    raise UserError(f"row {n}: not an MMBench question ({e})", file=path) from None
                # Circular evaluation: each rotation of the options is its own prompt.
                letters, texts = list(options), list(options.values())
                for r in range(len(texts)):
                    rotated = dict(zip(letters, texts[r:] + texts[:r]))
                    gold = letters[(letters.index(answer) - r) % len(letters)]
                    items.append(Item(f"{row['index']}/r{r}", image, clean(row["question"]),
                                      {"options": rotated, "answer": gold, "hint": hint, "question_id": row["index"]}))
        return items

    def prompt(self, item: Item, shots: list[Item]) -> Prompt:
        t = item.target
        lines = ([t["hint"]] if t["hint"] else []) + [item.question] + [f"{k}. {v}" for k, v in t["options"].items()]
        return Prompt("<image>\n" + "\n".join(lines) + f"\n{MC_INSTRUCTION}", [item.image()], chat=True)

    def score_item(self, item: Item, answer: str) -> float:
        return float(metrics.parse_choice(answer, item.target["options"]) == item.target["answer"])

    def score(self, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
        return metrics.circular_accuracy((i.target["question_id"], self.score_item(i, answers[i.id]) == 1.0)
                                         for i in items)


class _InlineImage:
    """A base64 image in a row of a benchmark table (MMBench), decoded when needed; `ref` names the row."""

    def __init__(self, data: str, path: Path, row: int):
        self.data, self.path, self.row = data, path, row
        self.ref = f"{path}:{row}"

    def raw(self) -> bytes:
        try:
            return base64.b64decode(self.data, validate=True)
        except ValueError as e:
            raise UserError(f"row {self.row}: the image column is not base64 ({e})", file=self.path) from None

    def __call__(self) -> Image.Image:
        try:
            with Image.open(io.BytesIO(self.raw())) as im:
                return im.convert("RGB")
        except OSError as e:
            raise UserError(f"row {self.row}: the image column is not a base64 image ({type(e).__name__})",
                            file=self.path) from None


def _b64_image(data: str, path: Path, row: int) -> Callable[[], Image.Image]:
    return _InlineImage(data, path, row)


TASKS: dict[str, type[Task]] = {t.name: t for t in (VQAv2, OKVQA, TextVQA, COCOCaptions, POPE, MMBench)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown eval task {name!r}; one of {', '.join(TASKS)}", field="TASK")
    return TASKS[name]()


def draw_shots(train: list[Item], item: Item, k: int, seed: int) -> list[Item]:
    """`k` in-context examples for `item`, drawn from the train split with a per-item seed: the
    same examples whatever the batch size, the order, or how often the run was resumed."""
    if k == 0:
        return []
    if len(train) < k:
        raise UserError(f"{k}-shot needs at least {k} train examples, the train split has {len(train)}", field="--shots")
    return random.Random(f"{seed}:{item.id}").sample(train, k)
