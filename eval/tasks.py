"""Benchmarks read from local files in their published layouts, with their prompts and scoring.

Every task lives in its own folder under the data directory (`--data`, default `./eval-data`),
laid out as the benchmark ships it (see docs/evaluation.md):

    vqav2/    v2_OpenEnded_mscoco_val2014_questions.json  v2_mscoco_val2014_annotations.json  val2014/
              (few-shot: the same names with train2014, and train2014/)
    okvqa/    OpenEnded_mscoco_val2014_questions.json  mscoco_val2014_annotations.json  val2014/ (+ train2014)
    textvqa/  TextVQA_0.5.1_val.json (+ TextVQA_0.5.1_train.json)  train_images/
    vizwiz/   val.json (+ train.json)  val/ (+ train/)   (`openflamingo` protocol)
    coco/     annotations/captions_val2014.json (+ captions_train2014.json)  val2014/ (+ train2014/)
              (`openflamingo` protocol: also dataset_coco.json, the Karpathy split)
    textcaps/ TextCaps_0.1_val.json (+ TextCaps_0.1_train.json)  train_images/
    nocaps/   nocaps_val_4500_captions.json  validation/ (few-shot examples: coco/'s train split)
    pope/     coco_pope_{random,popular,adversarial}.json (JSON lines)  val2014/
    mmbench/  mmbench_dev_en.tsv (VLMEvalKit's MMBench_DEV_EN.tsv: every circular pass a row, images inline)
    ai2d/ AI2D_TEST.tsv   scienceqa/ ScienceQA_TEST.tsv   seedbench/ SEEDBench_IMG.tsv
    chartqa/ ChartQA_TEST.tsv   docvqa/ DocVQA_VAL.tsv   ocrbench/ OCRBench.tsv   mme/ MME.tsv
    mmmu/ MMMU_DEV_VAL.tsv (VLMEvalKit's TSVs)

How a prompt is built and an answer cut is the protocol's (eval/protocols.py). A question that
cannot be asked or scored (no human answers, a duplicate id, a broken MMBench row) is a failed row
with its reason, never silently dropped; a file that cannot be read at all is one line.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from blip3.core.errors import UserError
from blip3.eval import metrics
from blip3.eval.protocols import OFFICIAL, Protocol

#: Text the processor would read as structure: image markers, chunk ends, chat turns. A question or
#: caption from a benchmark file never gets to place images or end a turn.
_MARKUP = re.compile(r"<image>|<\|[a-z_]+\|>")

VQA_INSTRUCTION = "Answer the question using a single word or phrase."

#: The strings pandas reads as a missing cell (its default `na_values`): VLMEvalKit loads MMBench
#: with pandas, so an option cell holding one of these is no option there, nor here.
PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
             "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def clean(text: str) -> str:
    return _MARKUP.sub(" ", str(text)).strip()


@dataclass
class Item:
    """One benchmark question: `target` holds what scoring needs (answers, label, references...).

    `error` set: the question cannot be asked or scored; it becomes a failed row with that reason."""

    id: str
    image: Callable[[], Image.Image]
    question: str = ""
    target: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Prompt:
    text: str
    images: list[Image.Image]
    chat: bool  # wrap in the chat template (instruct benchmarks) or raw few-shot text (base model)


def _no_image() -> Image.Image:
    raise AssertionError("a failed item has no image to load")


def failed(item_id: str, reason: str) -> Item:
    return Item(str(item_id), _no_image, error=reason)


def read_text(path: Path) -> str:
    """A benchmark file's text; one line when it is unreadable or not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 text (byte {e.start}); benchmark files are read as published", file=path) from None
    except OSError as e:
        raise UserError(f"cannot read ({e.strerror or type(e).__name__})", file=path) from None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_json(path: Path) -> Any:
    """Standard JSON only: `NaN`/`Infinity` are refused (an id of Infinity is not an id), and so is
    nesting too deep to parse, each as one line."""
    text = read_text(path)
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise UserError("not a benchmark file (JSON nested too deeply)", file=path) from None
    except ValueError as e:
        raise UserError(f"not a readable JSON file ({type(e).__name__}: {str(e)[:120]})", file=path) from None


def _need(path: Path, what: str) -> Path:
    """`path`, or the one line that says what to put there."""
    if not path.exists():
        raise UserError(f"missing; put {what} here (see docs/evaluation.md)", file=path)
    return path


def _id(value: Any, what: str = "question_id") -> str:
    """An id as text: integers and strings only (a float, bool, list or null is a broken file)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
        raise ValueError(f"{what} {json.dumps(value)[:40]} is not an integer or a string")
    return str(value)


def _open_image(data: Callable[[], Any], where: Path, what: str) -> Image.Image:
    try:
        with Image.open(data()) as im:
            return im.convert("RGB")
    except Image.DecompressionBombError:
        raise UserError(f"{what}: refused, more pixels than Pillow's decompression-bomb limit", file=where) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{what}: not a readable image ({type(e).__name__})", file=where) from None


class _ImageFile:
    """A benchmark image on disk, decoded when a prompt needs it. `raw()` is its file's bytes and
    `ref` names it (decontamination in datagen/decontam.py hashes benchmark images through these)."""

    def __init__(self, path: Path):
        self.path = path
        self.ref = str(path)

    def raw(self) -> bytes:
        return self.path.read_bytes()

    def __call__(self) -> Image.Image:
        return _open_image(lambda: self.path, self.path, "image")


def _image_file(path: Path) -> Callable[[], Image.Image]:
    return _ImageFile(path)


class Task:
    """A benchmark: where its files are, how to prompt, how to read an answer, how to score."""

    name: str = ""
    zero_shot_only = False
    protocols: tuple[str, ...] | None = None  # the protocols that define this task (None: any that lists it)
    metric: str = ""  # the headline metric

    def __init__(self, protocol: Protocol = OFFICIAL):
        self.protocol = protocol

    def load(self, root: Path, split: str) -> list[Item]:  # split: "test" or "train"
        raise NotImplementedError

    def prompt(self, item: Item, shots: list[Item], *, text_only_shots: bool = False) -> Prompt:
        raise NotImplementedError

    def answer(self, generated: str) -> str:
        return generated.strip()

    def score_item(self, item: Item, answer: str) -> float | None:
        """Per-sample score stored with the prediction (None when only the corpus has one)."""
        return None

    def score(self, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
        raise NotImplementedError

    def group(self, item: Item) -> str:
        """The question an item belongs to (`--limit` keeps whole questions)."""
        return item.id


def few_shot_context(examples: list[tuple[str, list[Item]]], text_only: bool, separator: str) -> tuple[str, list]:
    """OpenFlamingo-style context: each example's text, `separator` after it; text-only examples
    (Flamingo's 0-shot) lose their `<image>` marker and image."""
    text = "".join(t + separator for t, _ in examples)
    if text_only:
        return text.replace("<image>", ""), []
    return text, [s.image() for _, shots in examples for s in shots]


# --- VQA (VQAv2, OK-VQA, TextVQA) --------------------------------------------------------------
class VQATask(Task):
    metric = "accuracy"
    folder = ""
    files: dict[str, tuple[str, str, str]] = {}  # split -> (questions, annotations, image folder)
    image_name = "COCO_{split}2014_{image_id:012d}.jpg"

    def load(self, root: Path, split: str) -> list[Item]:
        qfile, afile, images = self.files[split]
        base = root / self.folder
        questions = read_json(_need(base / qfile, f"the {self.name} {split} questions ({qfile})"))
        annotations = read_json(_need(base / afile, f"the {self.name} {split} annotations ({afile})"))
        try:
            answers: dict[str, list[str] | None] = {}
            for a in annotations["annotations"]:
                qid = _id(a["question_id"])
                given = [str(x["answer"]) for x in a["answers"]]
                answers[qid] = given if qid not in answers or answers[qid] == given else None  # None: conflicting
            rows = [(_id(q["question_id"]), q) for q in questions["questions"]]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"not in the VQA layout ({type(e).__name__}: {e})", file=base / qfile) from None
        items = []
        for qid, q in rows:
            try:
                name = self.image_name.format(split=images.removesuffix("2014"), image_id=int(_id(q["image_id"], "image_id")))
                items.append(self._item(qid, _image_file(base / images / name), q["question"], answers.get(qid, [])))
            except (KeyError, TypeError, ValueError) as e:
                items.append(failed(qid, f"not a VQA question ({type(e).__name__}: {e})"))
        return items

    @staticmethod
    def _item(qid: str, image, question: Any, answers: list[str] | None) -> Item:
        if answers is None:
            return failed(qid, "the annotations give this question_id twice, with different answers")
        if not answers:
            return failed(qid, "no human answers")
        if len(answers) > metrics.MAX_VQA_ANSWERS:
            return failed(qid, f"{len(answers)} human answers (more than {metrics.MAX_VQA_ANSWERS}); a broken file")
        return Item(qid, image, clean(question), {"answers": answers})

    def _demo_answer(self, answers: list[str]) -> str:
        return answers[0] if self.protocol.demo_answer == "first" else _majority(answers)

    def prompt(self, item: Item, shots: list[Item], *, text_only_shots: bool = False) -> Prompt:
        examples = [(f"<image>Question:{s.question} Short answer:{clean(self._demo_answer(s.target['answers']))}"
                     "<|endofchunk|>", [s]) for s in shots]
        context, images = few_shot_context(examples, text_only_shots, self.protocol.demo_separator)
        return Prompt(f"{context}<image>Question:{item.question} Short answer:", images + [item.image()], chat=False)

    def answer(self, generated: str) -> str:
        # OpenFlamingo's post-processing: the model may go on to a next "Question:"; its protocol
        # also ends the answer at the first ", ".
        answer = re.split(r"Question|Answer|Short", generated, maxsplit=1)[0]
        if self.protocol.vqa_cut_comma:
            answer = re.split(", ", answer, maxsplit=1)[0]
        return answer.strip()

    def score_item(self, item: Item, answer: str) -> float:
        return metrics.vqa_accuracy(answer, item.target["answers"], always_normalise=self.protocol.vqa_always_normalise)

    def score(self, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
        return {"accuracy": sum(self.score_item(i, answers[i.id]) for i in items) / len(items)}


def _majority(answers: list[str]) -> str:
    """The most common human answer (first on ties): the in-context example's answer."""
    counts: dict[str, int] = {}
    for a in answers:
        counts[a] = counts.get(a, 0) + 1
    return max(counts, key=lambda a: counts[a])  # dicts keep first-seen order: ties go to the first


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

    def score_item(self, item: Item, answer: str) -> float:
        if self.protocol.textvqa_m4c:
            return metrics.textvqa_accuracy(answer, item.target["answers"])
        return super().score_item(item, answer)

    def load(self, root: Path, split: str) -> list[Item]:
        base = root / self.folder
        path = _need(base / self.split_files[split], f"the TextVQA {split} file")
        try:
            rows = read_json(path)["data"]
            iter(rows)
        except (KeyError, TypeError) as e:
            raise UserError(f"not in the TextVQA layout (missing {e})", file=path) from None
        items = []
        for n, d in enumerate(rows):
            try:
                qid = _id(d["question_id"])
            except (KeyError, TypeError, ValueError) as e:
                items.append(failed(f"row{n}", f"not a TextVQA question ({type(e).__name__}: {e})"))
                continue
            try:
                image = _image_file(base / "train_images" / f"{Path(_id(d['image_id'], 'image_id')).name}.jpg")
                items.append(self._item(qid, image, d["question"], [str(a) for a in d["answers"]]))
            except (KeyError, TypeError, ValueError) as e:
                items.append(failed(qid, f"not a TextVQA question ({type(e).__name__}: {e})"))
        return items


class VizWiz(VQATask):
    """VizWiz-VQA as published: `val.json` / `train.json` (a list of {image, question, answers:
    [{answer, answer_confidence}], answerable, answer_type}), images in `val/` and `train/`.
    Question ids are positions in the list, as in OpenFlamingo's VQA-format copies of these files.
    Many answers are "unanswerable": scored as any other answer, under OpenFlamingo's leave-out rule
    for records without answer ids (`metrics.vqa_accuracy`'s `confidences`). Defined under the
    `openflamingo` protocol only."""

    name, folder = "vizwiz", "vizwiz"
    protocols = ("openflamingo",)

    def load(self, root: Path, split: str) -> list[Item]:
        part = "val" if split == "test" else "train"
        base = root / self.folder
        path = _need(base / f"{part}.json", f"the VizWiz {part} annotations ({part}.json)")
        rows = read_json(path)
        if not isinstance(rows, list):
            raise UserError("not in the VizWiz layout (a list of questions)", file=path)
        items = []
        for n, d in enumerate(rows):
            try:
                given = d["answers"]
                answers = [str(a["answer"]) for a in given]
                confidences = [str(a.get("answer_confidence", "")) for a in given]
                item = self._item(str(n), _image_file(base / part / Path(str(d["image"])).name), d["question"], answers)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                item = failed(str(n), f"not a VizWiz question ({type(e).__name__}: {e})")
            if item.error is None:
                item.target["confidences"] = confidences
            items.append(item)
        return items

    def score_item(self, item: Item, answer: str) -> float:
        return metrics.vqa_accuracy(answer, item.target["answers"], always_normalise=self.protocol.vqa_always_normalise,
                                    confidences=item.target["confidences"])


# --- captioning ---------------------------------------------------------------------------------
class COCOCaptions(Task):
    name, metric = "coco", "CIDEr"
    files = {"test": ("captions_val2014.json", "val2014"), "train": ("captions_train2014.json", "train2014")}
    karpathy = "dataset_coco.json"
    meteor: bool | None = None  # None: on

    def load(self, root: Path, split: str) -> list[Item]:
        if self.protocol.coco_split == "karpathy":
            return self._load_karpathy(root, split)
        ann_name, images = self.files[split]
        refs, names = self._references(root, ann_name, split)
        return [Item(str(i), _image_file(root / "coco" / images / names[i]), "", {"references": refs[i]})
                for i in names if i in refs]

    def _references(self, root: Path, ann_name: str, split: str) -> tuple[dict[int, list[str]], dict[int, str]]:
        path = _need(root / "coco" / "annotations" / ann_name, f"the COCO {split} captions ({ann_name})")
        data = read_json(path)
        try:
            refs: dict[int, list[str]] = {}
            for a in data["annotations"]:
                refs.setdefault(int(_id(a["image_id"], "image_id")), []).append(str(a["caption"]))
            names = {int(_id(im["id"], "id")): Path(str(im["file_name"])).name for im in data["images"]}
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"not in the COCO captions layout ({type(e).__name__}: {e})", file=path) from None
        return refs, names

    def _load_karpathy(self, root: Path, split: str) -> list[Item]:
        """OpenFlamingo's COCO: the Karpathy split's `test` images (its `train` images for
        examples, first sentence as the caption), scored against captions_val2014.json."""
        path = _need(root / "coco" / self.karpathy, "the Karpathy split (dataset_coco.json)")
        data = read_json(path)
        refs = self._references(root, self.files["test"][0], "test")[0] if split == "test" else {}
        want = "test" if split == "test" else "train"
        items = []
        try:
            for im in data["images"]:
                if im["split"] != want:
                    continue
                cid = _id(im["cocoid"], "cocoid")
                folder = "train2014" if im["filepath"] == "train2014" else "val2014"
                image = _image_file(root / "coco" / folder / Path(str(im["filename"])).name)
                if split == "train":
                    items.append(Item(cid, image, "", {"references": [str(im["sentences"][0]["raw"])]}))
                elif int(cid) in refs:
                    items.append(Item(cid, image, "", {"references": refs[int(cid)]}))
                else:
                    items.append(failed(cid, "a Karpathy test image without captions in captions_val2014.json"))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise UserError(f"not in the Karpathy split layout ({type(e).__name__}: {e})", file=path) from None
        return items

    def prompt(self, item: Item, shots: list[Item], *, text_only_shots: bool = False) -> Prompt:
        examples = [(f"<image>Output:{clean(s.target['references'][0])}<|endofchunk|>", [s]) for s in shots]
        context, images = few_shot_context(examples, text_only_shots, self.protocol.demo_separator)
        return Prompt(f"{context}<image>Output:", images + [item.image()], chat=False)

    def answer(self, generated: str) -> str:
        caption = generated.split("Output", 1)[0]
        return (caption.replace('"', "") if self.protocol.caption_drop_quotes else caption).strip()

    def score(self, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
        return metrics.caption_scores({i.id: i.target["references"] for i in items},
                                      {i.id: answers[i.id] for i in items}, meteor=self.meteor)


class TextCaps(COCOCaptions):
    """TextCaps as published: `TextCaps_0.1_{val,train}.json`, one entry per caption (all of an
    image's captions in each entry's `reference_strs`), images in TextVQA's `train_images/`."""

    name = "textcaps"
    split_files = {"test": "TextCaps_0.1_val.json", "train": "TextCaps_0.1_train.json"}

    def load(self, root: Path, split: str) -> list[Item]:
        base = root / "textcaps"
        path = _need(base / self.split_files[split], f"the TextCaps {split} file")
        data = read_json(path)
        refs: dict[str, list[str]] = {}
        try:
            for d in data["data"]:
                image_id = _id(d["image_id"], "image_id")
                given = d.get("reference_strs") or [d["caption_str"]]
                refs.setdefault(image_id, [str(r) for r in given])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"not in the TextCaps layout ({type(e).__name__}: {e})", file=path) from None
        return [Item(i, _image_file(base / "train_images" / f"{Path(i).name}.jpg"), "", {"references": r})
                for i, r in refs.items()]


class NoCaps(COCOCaptions):
    """NoCaps validation as published: `nocaps_val_4500_captions.json` (COCO format, each image
    with its `domain`), the Open Images files under `validation/`. Scored overall and per domain
    (in-domain, near-domain, out-domain); in-context examples come from COCO's train captions."""

    name = "nocaps"
    file = "nocaps_val_4500_captions.json"

    def load(self, root: Path, split: str) -> list[Item]:
        if split == "train":  # NoCaps has no train split: its examples are COCO's
            return COCOCaptions(self.protocol).load(root, "train")
        path = _need(root / "nocaps" / self.file, f"the NoCaps validation captions ({self.file})")
        data = read_json(path)
        try:
            refs: dict[str, list[str]] = {}
            for a in data["annotations"]:
                refs.setdefault(_id(a["image_id"], "image_id"), []).append(str(a["caption"]))
            items = []
            for im in data["images"]:
                image_id = _id(im["id"], "id")
                if image_id not in refs:
                    items.append(failed(image_id, "an image without captions"))
                    continue
                image = _image_file(root / "nocaps" / "validation" / Path(str(im["file_name"])).name)
                items.append(Item(image_id, image, "", {"references": refs[image_id],
                                                        "domain": str(im.get("domain", "all"))}))
            return items
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"not in the NoCaps layout ({type(e).__name__}: {e})", file=path) from None

    def score(self, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
        out = super().score(items, answers)
        for domain in sorted({i.target["domain"] for i in items}):
            part = [i for i in items if i.target["domain"] == domain]
            sub = metrics.caption_scores({i.id: i.target["references"] for i in part},
                                         {i.id: answers[i.id] for i in part}, meteor=False)
            out[f"{domain}/CIDEr"] = sub["CIDEr"]
        return out


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
            for n, line in enumerate(read_text(path).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line, parse_constant=_reject_constant)
                    label = str(d["label"]).strip().lower()
                    if label not in ("yes", "no"):
                        raise ValueError(f"label {label!r} is not yes/no")
                    items.append(Item(f"{split_name}/{_id(d['question_id'])}",
                                      _image_file(base / "val2014" / Path(str(d["image"])).name),
                                      clean(d["text"]), {"label": label, "split": split_name}))
                except (KeyError, TypeError, ValueError, RecursionError) as e:
                    raise UserError(f"line {n}: not a POPE question ({type(e).__name__}: {str(e)[:120]})",
                                    file=path) from None
        return items

    def prompt(self, item: Item, shots: list[Item], *, text_only_shots: bool = False) -> Prompt:
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


# --- VLMEvalKit's TSV layout ---------------------------------------------------------------------
class VLMEvalKitTSV(Task):
    """A benchmark as VLMEvalKit publishes it: one TSV, a row per question (`index`, `question`,
    `answer`, `image` as base64 or the index of the row holding it, more columns per kind)."""

    zero_shot_only = True
    folder = file = what = ""
    required = ("index", "question", "answer", "image")

    def load(self, root: Path, split: str) -> list[Item]:
        path = _need(root / self.folder / self.file, self.what)
        csv.field_size_limit(1 << 30)
        try:
            reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t")
            header = next(reader, None)
            rows = list(enumerate(reader, 2))
        except csv.Error as e:
            raise UserError(f"not a TSV file ({e})", file=path) from None
        missing = [c for c in self.required if header is None or c not in header]
        if missing:
            raise UserError(f"not VLMEvalKit's TSV layout: no {', '.join(missing)} column", file=path)
        cells: list[tuple[int, dict[str, str]]] = []
        items: list[Item] = []
        images: dict[str, str] = {}
        for n, row in rows:
            if len(row) != len(header):
                items.append(failed(f"row{n}", f"row {n} has {len(row)} cells, the header {len(header)}"))
                continue
            d = dict(zip(header, row))
            cells.append((n, d))
            images[d["index"].strip()] = d["image"]
        for n, d in cells:
            raw = d["index"].strip()
            try:
                index = int(raw)
            except ValueError:
                items.append(failed(raw or f"row{n}", f"row {n}: index {raw[:40]!r} is not an integer"))
                continue
            data = d["image"]
            if 0 < len(data) <= 64:  # VLMEvalKit's space saving: the index of the row holding the image
                data = images.get(data.strip(), "")
            if len(data) <= 64:
                items.append(failed(raw, f"row {n}: no image (neither base64 data nor the index of a row with one)"))
                continue
            loaders = _b64_images(data, path, n)
            item = self._item(n, index, d, loaders[0])
            if item.error is None:
                item.target["images"] = loaders
            items.append(item)
        return items

    def _item(self, n: int, index: int, d: dict[str, str], image: Callable[[], Image.Image]) -> Item:
        raise NotImplementedError


# --- open answers in VLMEvalKit's TSV layout (ChartQA, DocVQA) --------------------------------------
class VLMEvalKitVQA(VLMEvalKitTSV):
    """ImageVQADataset: the question, then "Answer the question using a single word or phrase.";
    `answer` is one string or a Python list literal of them (read with `ast.literal_eval`, never
    run as code as VLMEvalKit's `eval` would)."""

    metric = "accuracy"

    def _item(self, n: int, index: int, d: dict[str, str], image: Callable[[], Image.Image]) -> Item:
        import ast

        raw = d["answer"]
        answers: Any = [raw]
        if raw.strip().startswith("["):
            try:
                answers = ast.literal_eval(raw)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                answers = [raw]
        if not isinstance(answers, list) or not answers:
            return failed(str(index), f"row {n}: no answers")
        return Item(str(index), image, clean(d["question"]), {"answers": [str(a) for a in answers]})

    def prompt(self, item: Item, shots: list[Item], *, text_only_shots: bool = False) -> Prompt:
        return Prompt(f"<image>\n{item.question}\n{VQA_INSTRUCTION}", [item.image()], chat=True)

    def score(self, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
        return {self.metric: sum(self.score_item(i, answers[i.id]) for i in items) / len(items)}


class ChartQA(VLMEvalKitVQA):
    """ChartQA_TEST.tsv; relaxed accuracy (pix2struct's: numbers within 5%, else the same text),
    the best over the answers."""

    name, metric = "chartqa", "relaxed_accuracy"
    folder, file, what = "chartqa", "ChartQA_TEST.tsv", "VLMEvalKit's ChartQA_TEST.tsv"

    def score_item(self, item: Item, answer: str) -> float:
        from blip3.eval.vlmevalkit_matching import relaxed_correctness

        return float(max(relaxed_correctness(a, answer.strip()) for a in item.target["answers"]))


class DocVQA(VLMEvalKitVQA):
    """DocVQA_VAL.tsv; ANLS: 1 - the smallest normalised Levenshtein distance to an answer, 0
    when that is under 0.5."""

    name, metric = "docvqa", "anls"
    folder, file, what = "docvqa", "DocVQA_VAL.tsv", "VLMEvalKit's DocVQA_VAL.tsv"

    def score_item(self, item: Item, answer: str) -> float:
        from blip3.eval.vlmevalkit_matching import anls_compute

        best = 1 - min(anls_compute(a, answer) for a in item.target["answers"])
        return 0.0 if best < 0.5 else best


class OCRBench(VLMEvalKitVQA):
    """OCRBench.tsv (VLMEvalKit's); the question alone as the prompt (OCRBench keeps the base
    `build_prompt`). A question is right when one of its answers is inside the prediction,
    ignoring case; for handwritten formulas, ignoring spaces instead. `final_score` is the count
    right (out of 1,000 on the full set), as OCRBench reports it."""

    name, metric = "ocrbench", "final_score"
    folder, file, what = "ocrbench", "OCRBench.tsv", "VLMEvalKit's OCRBench.tsv"
    formulas = "Handwritten Mathematical Expression Recognition"

    def _item(self, n: int, index: int, d: dict[str, str], image: Callable[[], Image.Image]) -> Item:
        item = super()._item(n, index, d, image)
        item.target["category"] = d.get("category", "")
        return item

    def prompt(self, item: Item, shots: list[Item], *, text_only_shots: bool = False) -> Prompt:
        return Prompt(f"<image>\n{item.question}", [item.image()], chat=True)

    def score_item(self, item: Item, answer: str) -> float:
        if item.target["category"] == self.formulas:
            def norm(t: str) -> str:
                return t.strip().replace("\n", " ").replace(" ", "")
        else:
            def norm(t: str) -> str:
                return t.lower().strip().replace("\n", " ")
        return float(any(norm(a) in norm(answer) for a in item.target["answers"]))

    def score(self, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
        hits = [self.score_item(i, answers[i.id]) for i in items]
        return {"final_score": sum(hits), "accuracy": sum(hits) / len(hits)}


class MME(VLMEvalKitTSV):
    """MME.tsv (VLMEvalKit's): yes/no questions, two per image. The answer is read with
    `YOrN_Extraction` (yes without no, or no without yes; else unknown, which is wrong). Per
    category: accuracy + accuracy+ (both questions of an image right), times 100; `perception`
    and `reasoning` sum their categories (`MME_rating`)."""

    name, metric = "mme", "perception"
    folder, file, what = "mme", "MME.tsv", "VLMEvalKit's MME.tsv"
    required = ("index", "question", "answer", "image", "category", "image_path")
    PERCEPTION = ("OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position", "posters",
                  "scene")
    REASONING = ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation")

    def _item(self, n: int, index: int, d: dict[str, str], image: Callable[[], Image.Image]) -> Item:
        answer = d["answer"].strip()
        if answer not in ("Yes", "No"):
            return failed(str(index), f"row {n}: answer {answer[:20]!r} is not Yes or No")
        return Item(str(index), image, clean(d["question"]),
                    {"answer": answer, "category": d["category"], "pair": d["image_path"]})

    def prompt(self, item: Item, shots: list[Item], *, text_only_shots: bool = False) -> Prompt:
        return Prompt(f"<image>\n{item.question}", [item.image()], chat=True)

    def score_item(self, item: Item, answer: str) -> float:
        from blip3.eval.vlmevalkit_matching import YOrN_Extraction

        return float(YOrN_Extraction(answer) == item.target["answer"])

    def score(self, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
        by_cat: dict[str, dict[str, list[float]]] = {}
        for i in items:
            by_cat.setdefault(i.target["category"], {}).setdefault(i.target["pair"], []).append(
                self.score_item(i, answers[i.id]))
        out: dict[str, float] = {}
        for cat, pairs in by_cat.items():
            flat = [s for ss in pairs.values() for s in ss]
            plus = [float(all(ss)) for ss in pairs.values()]
            out[cat] = 100 * sum(flat) / len(flat) + 100 * sum(plus) / len(plus)
        out["perception"] = sum(out.get(c, 0.0) for c in self.PERCEPTION)
        out["reasoning"] = sum(out.get(c, 0.0) for c in self.REASONING)
        return out


# --- multiple choice in VLMEvalKit's TSV layout (MMBench circular; AI2D, ScienceQA, SEED) -------
class VLMEvalKitMCQ(VLMEvalKitTSV):
    """A multiple-choice benchmark as VLMEvalKit publishes and scores it: options `A`... and a
    `hint` column beside the common ones, its prompt (`ImageMCQDataset.build_prompt`), and its
    exact-matching answer extraction (eval/vlmevalkit_matching.py); `accuracy` over the rows
    (`mcq_vanilla_eval`)."""

    metric = "accuracy"
    circular = False
    judge: Callable[[Item, str], str | None] | None = None  # an LLM judge for answers exact matching cannot read

    def load(self, root: Path, split: str) -> list[Item]:
        items = super().load(root, split)
        if not self.circular:
            return items
        # A question counts only with every pass: one broken pass fails its whole group, and passes
        # whose main row (index < 1e6) is absent form no question (VLMEvalKit scores main rows only).
        mains = {it.id for it in items if it.error is None and it.target["group"] == it.id}
        broken = {_group_of(it.id): it.error for it in items if it.error is not None and _group_of(it.id)}
        out = []
        for it in items:
            if it.error is None and it.target["group"] not in mains:
                it = failed(it.id, f"a circular pass of question {it.target['group']}, which has no row of its own")
            elif it.error is None and it.target["group"] in broken:
                it = failed(it.id, f"another pass of question {it.target['group']} failed: {broken[it.target['group']]}")
            out.append(it)
        return out

    def _item(self, n: int, index: int, d: dict[str, str], image: Callable[[], Image.Image]) -> Item:
        raw = str(index)
        options = {k: clean(d[k]) for k in string.ascii_uppercase if k in d and d[k] not in PANDAS_NA}
        answer = d["answer"].strip()
        if not options:
            return failed(raw, f"row {n}: no options")
        if answer not in options:
            return failed(raw, f"row {n}: answer {answer[:20]!r} is not one of the options {''.join(options)}")
        hint = d.get("hint", "")
        return Item(raw, image, clean(d["question"]),
                    {"options": options, "answer": answer, "hint": "" if hint in PANDAS_NA else clean(hint),
                     "group": str(index % 1_000_000) if self.circular else raw})

    def group(self, item: Item) -> str:
        return item.target.get("group", item.id) if item.error is None else item.id

    def prompt(self, item: Item, shots: list[Item], *, text_only_shots: bool = False) -> Prompt:
        """VLMEvalKit's ImageMCQDataset.build_prompt: Hint, Question, Options, then its request."""
        t = item.target
        text = f"Hint: {t['hint']}\n" if t["hint"] else ""
        text += f"Question: {item.question}\n"
        text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in t["options"].items())
        text += "Please select the correct answer from the options above. \n"
        return Prompt("<image>\n" + text, [item.image()], chat=True)

    def choice(self, item: Item, answer: str) -> str | None:
        """The letter VLMEvalKit reads from an answer (exact matching, then the judge if any)."""
        from blip3.eval.vlmevalkit_matching import can_infer

        letter = can_infer(answer, dict(item.target["options"]))
        if not letter and self.judge is not None:
            letter = self.judge(item, answer)
        return letter or None

    def score_item(self, item: Item, answer: str) -> float:
        return float(self.choice(item, answer) == item.target["answer"])

    def score(self, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
        if self.circular:
            return metrics.circular_accuracy((i.target["group"], self.score_item(i, answers[i.id]) == 1.0)
                                             for i in items)
        return {"accuracy": sum(self.score_item(i, answers[i.id]) for i in items) / len(items)}


class MMBench(VLMEvalKitMCQ):
    """MMBench: `MMBench_DEV_EN.tsv` holds every circular pass as its own row: pass k of question
    i has index i + k * 1e6 and its options rotated. A question counts when every pass is answered
    right (VLMEvalKit groups by index % 1e6, `mcq_circular_eval`); `accuracy` is over all passes."""

    name, metric, circular = "mmbench", "circular_accuracy", True
    folder, file, what = "mmbench", "mmbench_dev_en.tsv", "the MMBench tsv (VLMEvalKit's MMBench_DEV_EN.tsv, renamed)"


class AI2D(VLMEvalKitMCQ):
    name, folder, file, what = "ai2d", "ai2d", "AI2D_TEST.tsv", "VLMEvalKit's AI2D_TEST.tsv"


class ScienceQA(VLMEvalKitMCQ):
    """ScienceQA-img: VLMEvalKit's ScienceQA_TEST.tsv holds the test questions with an image."""

    name, folder, file, what = "scienceqa", "scienceqa", "ScienceQA_TEST.tsv", "VLMEvalKit's ScienceQA_TEST.tsv"


class SEEDBench(VLMEvalKitMCQ):
    name, folder, file, what = "seedbench", "seedbench", "SEEDBench_IMG.tsv", "VLMEvalKit's SEEDBench_IMG.tsv"


class MMMU(VLMEvalKitMCQ):
    """MMMU_DEV_VAL.tsv (VLMEvalKit's): several images per question, placed where the text says
    `<image k>` (`MMMUDataset.split_MMMU`); open questions are asked without options and scored as
    VLMEvalKit's `MMMU_preproc` makes them: option A the answer, B "Other Answers". A gold answer
    that is not an option letter counts as A, as there. `accuracy` is MMMU-val (the `validation`
    split); each split also has its own."""

    name = "mmmu"
    folder, file, what = "mmmu", "MMMU_DEV_VAL.tsv", "VLMEvalKit's MMMU_DEV_VAL.tsv"

    def _item(self, n: int, index: int, d: dict[str, str], image: Callable[[], Image.Image]) -> Item:
        raw = str(index)
        shown = {k: clean(d[k]) for k in string.ascii_uppercase if k in d and d[k] not in PANDAS_NA}
        answer = d["answer"].strip()
        scored = dict(shown) if "A" in shown else {**shown, "A": clean(d["answer"]), "B": "Other Answers"}
        hint = d.get("hint", "")
        return Item(raw, image, clean(d["question"]),
                    {"options": scored, "shown": shown, "answer": answer if answer in string.ascii_uppercase and
                     len(answer) == 1 else "A", "hint": "" if hint in PANDAS_NA else clean(hint), "group": raw,
                     "split": d.get("split", "")})

    def prompt(self, item: Item, shots: list[Item], *, text_only_shots: bool = False) -> Prompt:
        t = item.target
        text = f"Hint: {t['hint']}\n" if t["hint"] else ""
        text += f"Question: {item.question}\n"
        if t["shown"]:
            text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in t["shown"].items())
            text += "Please select the correct answer from the options above. \n"
        loaders = t["images"]
        parts = re.split(r"<image (\d+)>", text)
        if len(parts) == 1:  # no markers: the images first, as VLMEvalKit sends them
            return Prompt("<image>" * len(loaders) + "\n" + text, [f() for f in loaders], chat=True)
        images, out = [], parts[0]
        for k in range(1, len(parts), 2):
            number = int(parts[k])
            if not 1 <= number <= len(loaders):
                raise UserError(f"question {item.id}: <image {number}> but {len(loaders)} images")
            images.append(loaders[number - 1]())
            out += "<image>" + parts[k + 1]
        return Prompt(out, images, chat=True)

    def score(self, items: list[Item], answers: dict[str, str]) -> dict[str, float]:
        out = {}
        for split in sorted({i.target["split"] for i in items}):
            part = [i for i in items if i.target["split"] == split]
            out[f"{split or 'all'}/accuracy"] = sum(self.score_item(i, answers[i.id]) for i in part) / len(part)
        out["accuracy"] = out.get("validation/accuracy", sum(self.score_item(i, answers[i.id]) for i in items) / len(items))
        return out


def _group_of(index: str) -> str | None:
    try:
        return str(int(index) % 1_000_000)
    except ValueError:
        return None


def _b64_images(data: str, path: Path, row: int) -> list[Callable[[], Image.Image]]:
    """One loader per image of a cell: base64 data, or a list literal of several (MMMU)."""
    import ast

    if data.startswith("[") and data.endswith("]"):
        try:
            several = ast.literal_eval(data)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            several = None
        if isinstance(several, list) and several and all(isinstance(x, str) for x in several):
            return [_b64_image(x, path, row) for x in several]
    return [_b64_image(data, path, row)]


class _InlineImage:
    """A base64 image in a row of a benchmark table (VLMEvalKit's TSVs), decoded when needed; `ref`
    names the row, `raw()` is the decoded bytes (decontamination hashes them)."""

    def __init__(self, data: str, path: Path, row: int):
        self.data, self.path, self.row = data, path, row
        self.ref = f"{path}:{row}"

    def _decoded(self) -> bytes:
        try:
            return base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError("not base64") from e

    def raw(self) -> bytes:
        try:
            return self._decoded()
        except ValueError:
            raise UserError(f"row {self.row}: the image column is not base64", file=self.path) from None

    def __call__(self) -> Image.Image:
        return _open_image(lambda: io.BytesIO(self._decoded()), self.path, f"row {self.row}: the image column")


def _b64_image(data: str, path: Path, row: int) -> Callable[[], Image.Image]:
    return _InlineImage(data, path, row)


TASKS: dict[str, type[Task]] = {t.name: t for t in (VQAv2, OKVQA, TextVQA, VizWiz, COCOCaptions, TextCaps, NoCaps, POPE,
                                                    MMBench, AI2D, ScienceQA, SEEDBench, ChartQA, DocVQA,
                                                    OCRBench, MME, MMMU)}


def get_task(name: str, protocol: Protocol = OFFICIAL) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown eval task {name!r}; one of {', '.join(TASKS)}", field="TASK")
    return TASKS[name](protocol)


def mark_duplicates(items: list[Item]) -> list[Item]:
    """A second item with an id already seen is a failed row: answers and resumption are keyed by
    id, so two questions sharing one would both be scored with one of them."""
    seen: set[str] = set()
    out = []
    for it in items:
        if it.id in seen and it.error is None:
            it = failed(it.id, f"duplicate id {it.id!r}: an earlier question has it (that one is scored)")
        seen.add(it.id)
        out.append(it)
    return out


def query_set(train: list[Item], size: int | None, seed: int, n_test: int) -> list[Item]:
    """The pool in-context examples are drawn from. With a size, OpenFlamingo's: numpy seeded
    with `seed` first draws the evaluation order of the test split (`prepare_eval_samples`), then
    `size` train items without replacement (`get_query_set`)."""
    if size is not None and size < len(train):
        import numpy as np

        rng = np.random.RandomState(seed)  # what np.random.seed(seed) sets up
        rng.choice(n_test, n_test, replace=False)
        train = [train[i] for i in rng.choice(len(train), size, replace=False)]
    return [t for t in train if t.error is None]


def draw_shots(train: list[Item], item: Item, k: int, seed: int) -> list[Item]:
    """`k` in-context examples for `item`, drawn from the train pool with a per-item seed: the
    same examples whatever the batch size, the order, or how often the run was resumed."""
    if k == 0:
        return []
    if len(train) < k:
        raise UserError(f"{k}-shot needs at least {k} train examples, the train split has {len(train)}", field="--shots")
    return random.Random(f"{seed}:{item.id}").sample(train, k)
