"""Existing box annotations (COCO or Visual Genome JSON) as the grounding "detector".

Visual Genome is in the xGen-MM pretraining mixture, and COCO-style files are what most labelled
sets ship, so turning their boxes into grounding captions needs no model at all.

Accepted files (the format is detected from the structure):

- COCO instances: `{"images": [{id, file_name, width?, height?}], "annotations": [{image_id,
  bbox: [x, y, w, h] pixels, category_id, iscrowd?}], "categories": [{id, name}]}`.
  Crowd boxes (`iscrowd: 1`, a region covering many instances) are skipped by default and counted
  in the sample's metadata (`skipped_crowd`); `include_crowd=True` keeps them with their category.
  Images listed with no box give valid samples with no objects.
- Visual Genome `objects.json`: `[{"image_id", "image_url"?, "objects": [{x, y, w, h, names:
  [...] (or name)}]}]`; the first name is the label. VG gives no image size here, so boxes are
  normalised by the decoded image's size.

Boxes are normalised by the annotation's own `width`/`height` when it has them (the frame the boxes
were drawn in), else by the decoded image; boxes are taken to be drawn on the upright image (the
pipeline applies EXIF orientation before annotating). An input image is matched to an annotation entry by
file name, file stem, sanitised stem or numeric id (VG files are named `<image_id>.jpg`); an input
image with no entry fails with reason `annotations` (it was not annotated, which is not the same
as "annotated with no boxes").

The whole file is held in memory once per worker (VG objects.json: a few GB of Python objects).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from blip3.core.errors import UserError
from blip3.core.keys import sanitize_key
from blip3.datagen.caption_text import caption_text
from blip3.datagen.grounding_captions import GroundedObject, normalize_box


@dataclass
class AnnotatedImage:
    """Pixel boxes of one annotated image, before normalisation."""

    boxes: list[tuple[str, float, float, float, float]]  # (label, x, y, w, h) in pixels
    width: float | None = None
    height: float | None = None
    skipped_crowd: int = 0
    error: str | None = None  # set when the file is ambiguous about this image (a repeated id)

    def objects(self, image_width: int, image_height: int) -> list[GroundedObject]:
        """Normalized objects (score 1.0: ground truth)."""
        w = self.width or image_width
        h = self.height or image_height
        out = []
        for label, x, y, bw, bh in self.boxes:
            out.append(GroundedObject(label, normalize_box(x, y, x + bw, y + bh, w, h), 1.0))
        return out


@dataclass
class AnnotationIndex:
    """Annotated images by every name an input image may carry."""

    path: Path
    kind: str  # "coco" | "vg"
    images: list[AnnotatedImage] = field(default_factory=list)
    names: dict[str, int] = field(default_factory=dict)

    def lookup(self, candidates: Iterable[str | None]) -> AnnotatedImage | None:
        for c in candidates:
            if not c:
                continue
            i = self.names.get(str(c))  # the name as given: most lookups end here
            for name in ([] if i is not None else _name_forms(str(c))):
                i = self.names.get(name)
                if i is not None:
                    break
            if i is not None:
                return self.images[i]
        return None

    def _add(self, image: AnnotatedImage, names: Iterable[Any]) -> None:
        self.images.append(image)
        i = len(self.images) - 1
        for n in names:
            if n is None or n == "":
                continue
            for form in _name_forms(str(n)):
                self.names.setdefault(form, i)


def _name_forms(name: str) -> list[str]:
    """`a/b/000001.jpg` -> [`a/b/000001.jpg`, `000001.jpg`, `000001`, sanitised forms, `1`]."""
    base = PurePosixPath(name.replace("\\", "/")).name
    stem = base.rsplit(".", 1)[0] if "." in base else base
    forms = [name, base, stem, sanitize_key(stem), sanitize_key(base)]
    if stem.isdigit():
        forms.append(str(int(stem)))
    return list(dict.fromkeys(forms))


def _fail(msg: str, path: Path, field: str = "--annotations") -> UserError:
    return UserError(msg, field=field, file=path)


def load_annotations(path: str | Path, *, include_crowd: bool = False) -> AnnotationIndex:
    """Read a COCO or VG box file; malformed structure -> one UserError naming the field."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _fail("annotation file not found", p) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(f"not valid JSON ({e})", p) from None
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return _load_coco(data, p, include_crowd)
    if isinstance(data, list) and (not data or (isinstance(data[0], dict) and "objects" in data[0])):
        return _load_vg(data, p)
    raise _fail("neither COCO (images/annotations/categories) nor Visual Genome objects.json", p)


def _num(v: Any, where: str, p: Path, *, minimum: float | None = None, strict: bool = False) -> float:
    """A finite number (JSON allows NaN/Infinity; a box made of them would poison every caption),
    at least `minimum` (above it when `strict`): bad values fail the whole file at load time,
    not image by image in the middle of a job."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(f"expected a number, got {v!r}", p, where)
    x = float(v)
    if not math.isfinite(x):
        raise _fail(f"expected a finite number, got {v!r}", p, where)
    if minimum is not None and (x <= minimum if strict else x < minimum):
        raise _fail(f"expected a number {'>' if strict else '>='} {minimum:g}, got {v!r}", p, where)
    return x


def _label(name: Any, p: Path, where: str) -> str:
    """A category or object name, whitespace collapsed; one with nothing to write is refused here,
    at load time (see `caption_text`: an empty label would read `<object></object>`)."""
    label = " ".join(str(name).split())
    if not caption_text(label):
        raise _fail(f"name is empty ({name!r}); every object needs a name", p, where)
    return label


def _size(v: Any, where: str, p: Path) -> float | None:
    """An image's optional width/height: absent, or a number above zero."""
    return None if v is None else _num(v, where, p, minimum=0, strict=True)


def _box(values: list[Any], wheres: list[str], p: Path) -> tuple[float, float, float, float]:
    """(x, y, w, h) in pixels: finite, with a width and height that are not negative."""
    x, y = (_num(v, where, p) for v, where in zip(values[:2], wheres[:2]))
    w, h = (_num(v, where, p, minimum=0) for v, where in zip(values[2:], wheres[2:]))
    return x, y, w, h


def _list(data: dict, key: str, p: Path, *, required: bool = True) -> list:
    value = data.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise _fail(f"must be a list, got {type(value).__name__}", p, key)
    return value


def _load_coco(data: dict, p: Path, include_crowd: bool) -> AnnotationIndex:
    idx = AnnotationIndex(p, "coco")
    cats = {}
    for j, c in enumerate(_list(data, "categories", p, required=False)):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise _fail("each category needs id and name", p, f"categories[{j}]")
        cats[c["id"]] = _label(c["name"], p, f"categories[{j}].name")
    by_id: dict[Any, AnnotatedImage] = {}
    first_seen: dict[Any, int] = {}
    for j, im in enumerate(_list(data, "images", p)):
        if not isinstance(im, dict) or "id" not in im:
            raise _fail("each image needs an id", p, f"images[{j}]")
        entry = AnnotatedImage([], _size(im.get("width"), f"images[{j}].width", p),
                               _size(im.get("height"), f"images[{j}].height", p))
        if im["id"] in by_id:
            # Which entry the boxes belong to is unknowable: both images fail with this reason.
            entry.error = by_id[im["id"]].error = (
                f"image id {im['id']!r} is listed twice in {p.name} (images[{first_seen[im['id']]}] and images[{j}])")
        else:
            by_id[im["id"]], first_seen[im["id"]] = entry, j
        idx._add(entry, [im.get("file_name"), im["id"], im.get("coco_url"), im.get("flickr_url")])
    for j, a in enumerate(_list(data, "annotations", p)):
        where = f"annotations[{j}]"
        if not isinstance(a, dict) or "image_id" not in a or "bbox" not in a:
            raise _fail("each annotation needs image_id and bbox", p, where)
        entry = by_id.get(a["image_id"])
        if entry is None:
            raise _fail(f"image_id {a['image_id']!r} is not in images", p, f"{where}.image_id")
        if a.get("iscrowd") and not include_crowd:
            entry.skipped_crowd += 1
            continue
        bbox = a["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise _fail("bbox must be [x, y, width, height]", p, f"{where}.bbox")
        x, y, w, h = _box(bbox, [f"{where}.bbox"] * 4, p)
        label = cats.get(a.get("category_id"))
        if label is None:
            raise _fail(f"category_id {a.get('category_id')!r} is not in categories", p, f"{where}.category_id")
        entry.boxes.append((label, x, y, w, h))
    return idx


def _load_vg(data: list, p: Path) -> AnnotationIndex:
    idx = AnnotationIndex(p, "vg")
    for j, im in enumerate(data):
        if not isinstance(im, dict) or "image_id" not in im or not isinstance(im.get("objects"), list):
            raise _fail("each entry needs image_id and an objects list", p, f"[{j}]")
        entry = AnnotatedImage([], _size(im.get("width"), f"[{j}].width", p), _size(im.get("height"), f"[{j}].height", p))
        for k, o in enumerate(im["objects"]):
            where = f"[{j}].objects[{k}]"
            if not isinstance(o, dict):
                raise _fail(f"each object must be a JSON object, got {type(o).__name__}", p, where)
            names = o.get("names") or ([o["name"]] if o.get("name") else [])
            if not isinstance(names, list) or not names:
                raise _fail("object has no names/name", p, where)
            x, y, w, h = _box([o.get(c) for c in "xywh"], [f"{where}.{c}" for c in "xywh"], p)
            entry.boxes.append((_label(names[0], p, f"{where}.names[0]").lower(), x, y, w, h))
        url = im.get("image_url") or im.get("url")
        idx._add(entry, [im["image_id"], url])
    return idx
