"""The caption every peer job writes: one grounding sentence per image from its COCO boxes.

Standard library only (each tool's venv runs it). The text follows the BLIP3-GROUNDING style
(`The image contains a sign at [0.03, 0.08, 0.37, 0.58].`, boxes as fractions of the image, two
decimals); `blip3 ground` builds its full set of variants from the same boxes, the peers and the
plain loop build this one sentence: the caption costs microseconds either way, the comparison is
about read, decode, move and write.
"""

from __future__ import annotations

import json
from pathlib import Path


def load_boxes(coco: Path) -> dict[str, list[tuple[str, list[float]]]]:
    """file name -> [(label, [x, y, w, h]), ...] in the order of the annotation file."""
    data = json.loads(Path(coco).read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {im["id"]: im["file_name"] for im in data["images"]}
    boxes: dict[str, list[tuple[str, list[float]]]] = {name: [] for name in files.values()}
    for ann in data["annotations"]:
        boxes[files[ann["image_id"]]].append((names[ann["category_id"]], ann["bbox"]))
    return boxes


def caption(objects: list[tuple[str, list[float]]], width: int, height: int) -> str:
    """One sentence naming each object and its box as fractions of the decoded image's size."""
    if not objects:
        return "The image contains no annotated objects."
    parts = []
    for label, (x, y, w, h) in objects:
        box = [x / width, y / height, (x + w) / width, (y + h) / height]
        parts.append(f"a {label} at [{', '.join(f'{v:.2f}' for v in box)}]")
    return "The image contains " + ", ".join(parts) + "."
