"""Tiny benchmark files in each benchmark's published layout, and a tiny model directory."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest

from tests.model_fixtures import noise_image


def _jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(40, 32, seed).save(path, format="JPEG")


def _vqa(base: Path, qfile: str, afile: str, split: str, n: int, offset: int) -> None:
    questions, annotations = [], []
    for i in range(n):
        image_id, qid = 100 + offset + i, 1000 + offset + i
        _jpeg(base / f"{split}2014" / f"COCO_{split}2014_{image_id:012d}.jpg", image_id)
        questions.append({"image_id": image_id, "question": f"How many dogs are there {i}?", "question_id": qid})
        answers = ["2"] * 6 + ["two dogs"] * 2 + ["3"] * 2
        annotations.append({"question_id": qid, "image_id": image_id, "answer_type": "number",
                            "multiple_choice_answer": "2",
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                        for k, a in enumerate(answers)]})
    base.mkdir(parents=True, exist_ok=True)
    (base / qfile).write_text(json.dumps({"task_type": "Open-Ended", "data_subtype": f"{split}2014", "questions": questions}))
    (base / afile).write_text(json.dumps({"data_subtype": f"{split}2014", "annotations": annotations}))


def write_mmbench(path: Path, n: int) -> None:
    """VLMEvalKit's MMBench_DEV_EN.tsv layout: question i, then its circular passes as rows
    i + k * 1e6 with the options rotated by k and the image cell naming row i."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category", "split"])
        for i in range(n):
            buf = io.BytesIO()
            noise_image(40, 32, 400 + i).save(buf, format="JPEG")
            texts = ["cat", "dog", "bird"] + ([] if i else ["fish"])
            for k in range(len(texts)):
                rotated = texts[k:] + texts[:k]
                cells = rotated + [""] * (4 - len(rotated))
                answer = "ABCD"[rotated.index("dog")]
                image = base64.b64encode(buf.getvalue()).decode() if k == 0 else str(i)
                w.writerow([i + k * 1_000_000, "What animal is shown?", "nan" if i else "A photo.", *cells, answer,
                            "animals", image, "perception", "dev"])


def write_benchmarks(root: Path, n: int = 3) -> Path:
    """Every supported benchmark, `n` questions each (plus train splits for few-shot)."""
    _vqa(root / "vqav2", "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json", "val", n, 0)
    _vqa(root / "vqav2", "v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json",
         "train", 8, 500)
    _vqa(root / "okvqa", "OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json", "val", n, 0)
    tv = root / "textvqa"
    for split, count, offset in (("val", n, 0), ("train", 8, 50)):
        data = []
        for i in range(count):
            image_id = f"{split}{i:04x}"
            _jpeg(tv / "train_images" / f"{image_id}.jpg", offset + i)
            data.append({"question": "what brand is shown?", "image_id": image_id, "question_id": offset + i,
                         "answers": ["nokia"] * 7 + ["Nokia."] * 3, "image_classes": ["Phone"]})
        (tv / f"TextVQA_0.5.1_{split}.json").write_text(json.dumps({"dataset_name": "textvqa", "data": data}))
    coco = root / "coco"
    images, anns = [], []
    for i in range(n):
        name = f"COCO_val2014_{200 + i:012d}.jpg"
        _jpeg(coco / "val2014" / name, 200 + i)
        images.append({"id": 200 + i, "file_name": name, "width": 40, "height": 32})
        anns += [{"id": 10 * i + k, "image_id": 200 + i, "caption": c}
                 for k, c in enumerate(["A dog runs on the grass.", "A brown dog running outside."])]
    (coco / "annotations").mkdir(parents=True, exist_ok=True)
    (coco / "annotations" / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": anns}))
    tc = root / "textcaps"
    for split, count, offset in (("val", n, 0), ("train", 4, 70)):
        entries = []
        for i in range(count):
            image_id = f"tc{split}{i:03d}"
            _jpeg(tc / "train_images" / f"{image_id}.jpg", 600 + offset + i)
            refs = [f"A sign that says open {i}.", "A red sign with white letters."]
            entries += [{"image_id": image_id, "image_path": f"train/{image_id}.jpg", "caption_id": 10 * i + k,
                         "caption_str": r, "reference_strs": refs, "set_name": split} for k, r in enumerate(refs)]
        (tc / f"TextCaps_0.1_{split}.json").write_text(json.dumps({"dataset_name": "textcaps", "data": entries}))
    nc = root / "nocaps"
    images, anns = [], []
    for i in range(n):
        name, animal = f"{i:016x}.jpg", ["jellyfish", "seal", "turtle", "crab"][i % 4]
        _jpeg(nc / "validation" / name, 700 + i)
        images.append({"id": i, "file_name": name, "domain": ["in-domain", "near-domain", "out-domain"][i % 3]})
        anns += [{"id": 10 * i + k, "image_id": i, "caption": c}
                 for k, c in enumerate([f"A {animal} in blue water.", f"A pale {animal} swimming."])]
    (nc / "nocaps_val_4500_captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    pope = root / "pope"
    for split in ("random", "adversarial"):
        lines = []
        for i in range(n + 1):
            name = f"COCO_val2014_{300 + i:012d}.jpg"
            _jpeg(pope / "val2014" / name, 300 + i)
            lines.append(json.dumps({"question_id": i + 1, "image": name, "text": "Is there a dog in the image?",
                                     "label": "yes" if i % 2 == 0 else "no"}))
        (pope / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
    write_mmbench(root / "mmbench" / "mmbench_dev_en.tsv", n)
    return root


@pytest.fixture(scope="session")
def benchmarks(tmp_path_factory) -> Path:
    """Read-only benchmark files (copy before editing)."""
    return write_benchmarks(tmp_path_factory.mktemp("eval-data"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_config, tiny_processor) -> Path:
    """A tiny model directory as `blip3 model init` writes it (random weights)."""
    from tests.model_fixtures import build_tiny_model

    d = tmp_path_factory.mktemp("tiny-model") / "model"
    build_tiny_model(tiny_config).save_pretrained(d)
    tiny_processor.save_pretrained(d)
    return d
