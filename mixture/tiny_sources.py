"""Tiny synthetic shards, written as real shards with core.shards: the one generator of test data,
of the shipped small mixtures (`manifests/tiny-mix.yaml`, `blip3 source tiny -o OUT`) and of the CPU
training pipeline (`manifests/tiny/`, `generate: tiny`).

Each image is a flat background colour with one shape in another colour, and every text names them
("a red circle on a blue background"), so a tiny model can learn the task in a handful of steps.
Records follow docs/formats.md. Two sets are written from the same pieces:

`write_tiny_sources(OUT)` — the catalog/mixture sources (several shards each):
    caption-ocr/        captions with the text drawn in the image and its OCR entries
    caption-grounding/  captions with the shape as a grounded object (some images have none)
    interleaved/ sft/ dpo/
  every caption shard records failed inputs so failure views have something to show.

`ensure_tiny_data()` — the training data, generated on first use under `$BLIP3_CACHE/tiny-data/`
(default `.cache/` in the repository), into a temporary folder renamed when complete, so two
processes generating at once never see a half-written set:
    caption/ interleaved/ sft/ multi/ (two-image chats) dpo/ (rejected names the wrong colour and
    shape) safety/ (refusals to unsafe requests plus safe chats)

Deterministic: the same arguments give the same bytes.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw

from blip3.core.records import sidecar_row
from blip3.core.shards import SampleRow, ShardWriter

VERSION = 3  # 3: grounding objects in metadata.objects; sidecar rows from core.records
COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30), "white": (250, 250, 250), "black": (10, 10, 10)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((32, 32), (64, 32), (32, 64), (48, 48))
WORDS = ("open", "shop", "cafe", "exit", "sale", "main", "road", "north", "park", "bank", "city", "hotel")
UNSAFE = ("How do I build a weapon from this?", "Tell me how to hurt someone.", "How can I steal this?")
REFUSAL = "I cannot help with that request."
TINY_KINDS = {
    "caption-ocr": "caption",
    "caption-grounding": "caption",
    "interleaved": "interleaved",
    "sft": "sft",
    "dpo": "dpo",
}
Sample = tuple[str, dict]  # (key, shard members)


class Scene(NamedTuple):
    jpg: bytes
    bg: str
    fg: str
    shape: str
    box: tuple[int, int, int, int]  # the shape's box, pixels


def cache_root() -> Path:
    env = os.environ.get("BLIP3_CACHE")
    return Path(env) if env else Path(__file__).resolve().parents[1] / ".cache"


def draw_scene(rng: random.Random, size: tuple[int, int] | None = None, *, text: str | None = None,
               blank: bool = False) -> Scene:
    """One image: a `shape` in colour `fg` on `bg` (only the background when `blank`), with `text`
    written at the shape's top-left corner when given. The random draws do not depend on `text` or
    `blank`, so they never change the rest of a set."""
    bg, fg = rng.sample(sorted(COLORS), 2)
    shape = rng.choice(SHAPES)
    w, h = size or rng.choice(SIZES)
    img = Image.new("RGB", (w, h), COLORS[bg])
    d = ImageDraw.Draw(img)
    cx, cy, r = w // 2, h // 2, int(min(w, h) * 0.35)
    box = (cx - r, cy - r, cx + r, cy + r)
    if blank:
        pass
    elif shape == "circle":
        d.ellipse(box, fill=COLORS[fg])
    elif shape == "square":
        d.rectangle(box, fill=COLORS[fg])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[fg])
    if text:
        d.text((box[0] + 2, box[1] + 1), text, fill=COLORS["black" if bg == "white" or fg == "white" else "white"])
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return Scene(buf.getvalue(), bg, fg, shape, box)


def describe(bg: str, fg: str, shape: str) -> str:
    return f"a {fg} {shape} on a {bg} background."


def _norm(box: tuple[int, int, int, int], w: int, h: int) -> list[float]:
    x1, y1, x2, y2 = box
    return [round(x1 / w, 3), round(y1 / h, 3), round(x2 / w, 3), round(y2 / h, 3)]


def _write(out: Path, index: int, samples: list[Sample], name: str, kind: str,
           failure: SampleRow | None = None) -> None:
    """Shard `index` of `out`: each sample's sidecar row is derived from its record by
    `core.records.sidecar_row`, as for any tar written without sidecars."""
    with ShardWriter(out, index, generator={"name": name, "engine": "tiny-sources", "version": VERSION}) as wr:
        for key, members in samples:
            rec, txt = members.get("json") or {}, members.get("txt")
            wr.add(key, members, sidecar_row(kind, key, rec, members, txt))
        if failure is not None:
            wr.add_failure(failure)


# --- samples of each kind ------------------------------------------------------------------------

def _captions(rng: random.Random, n: int, prefix: str = "cap") -> list[Sample]:
    out = []
    for i in range(n):
        sc = draw_scene(rng)
        cap = describe(sc.bg, sc.fg, sc.shape).capitalize()
        out.append((f"{prefix}{i:04d}", {"jpg": sc.jpg, "txt": cap, "json": {"uid": f"{prefix}{i}", "caption": cap}}))
    return out


def _interleaved(rng: random.Random, n: int, prefix: str = "doc") -> list[Sample]:
    out = []
    for i in range(n):
        texts: list[str | None] = ["A page about shapes."]
        images: list[str | None] = [None]
        members: dict = {}
        for j in range(2):
            sc = draw_scene(rng, (32, 32))
            members[f"{j}.jpg"] = sc.jpg
            texts += [None, f"Picture {j + 1} shows {describe(sc.bg, sc.fg, sc.shape)}"]
            images += [f"{j}.jpg", None]
        members["json"] = {"texts": texts, "images": images}
        out.append((f"{prefix}{i:04d}", members))
    return out


def _chat(rng: random.Random, n: int, prefix: str = "sft") -> list[Sample]:
    out = []
    for i in range(n):
        sc = draw_scene(rng)
        q = rng.choice(["What is in the image?", "Describe the picture.", "Which shape do you see?"])
        conv = [{"role": "user", "content": f"<image>\n{q}"},
                {"role": "assistant", "content": f"I see {describe(sc.bg, sc.fg, sc.shape)}"}]
        out.append((f"{prefix}{i:04d}", {"0.jpg": sc.jpg, "json": {"conversations": conv, "images": ["0.jpg"]}}))
    return out


def _multi(rng: random.Random, n: int, prefix: str = "multi") -> list[Sample]:
    out = []
    for i in range(n):
        a, b = draw_scene(rng, (32, 32)), draw_scene(rng, (32, 32))
        conv = [
            {"role": "user", "content": "<image> <image>\nWhat do the two pictures show?"},
            {"role": "assistant", "content": f"The first shows {describe(*a[1:4])} The second shows {describe(*b[1:4])}"},
        ]
        out.append((f"{prefix}{i:04d}", {"0.jpg": a.jpg, "1.jpg": b.jpg, "json": {"conversations": conv, "images": ["0.jpg", "1.jpg"]}}))
    return out


def _dpo(rng: random.Random, n: int, prefix: str = "pair") -> list[Sample]:
    out = []
    for i in range(n):
        sc = draw_scene(rng)
        wrong_fg = rng.choice([c for c in sorted(COLORS) if c not in (sc.fg, sc.bg)])
        wrong_shape = rng.choice([s for s in SHAPES if s != sc.shape])
        rec = {
            "prompt": "<image>\nWhat is in the image?",
            "chosen": f"I see {describe(sc.bg, sc.fg, sc.shape)}",
            "rejected": f"I see {describe(sc.bg, wrong_fg, wrong_shape)}",
            "images": ["0.jpg"],
        }
        out.append((f"{prefix}{i:04d}", {"0.jpg": sc.jpg, "json": rec}))
    return out


def _safety(rng: random.Random, n: int, prefix: str = "safe") -> list[Sample]:
    out = []
    for i in range(n):
        sc = draw_scene(rng)
        if i % 2 == 0:
            conv = [{"role": "user", "content": f"<image>\n{rng.choice(UNSAFE)}"}, {"role": "assistant", "content": REFUSAL}]
        else:
            conv = [{"role": "user", "content": "<image>\nWhat is in the image?"},
                    {"role": "assistant", "content": f"I see {describe(sc.bg, sc.fg, sc.shape)}"}]
        out.append((f"{prefix}{i:04d}", {"0.jpg": sc.jpg, "json": {"conversations": conv, "images": ["0.jpg"]}}))
    return out


def _ocr(rng: random.Random, n: int, prefix: str) -> list[Sample]:
    """Captions whose image carries 0-2 words, with their OCR entries (docs/formats.md)."""
    samples = []
    w, h = 96, 64
    for i in range(n):
        key = f"{prefix}{i:04d}"
        words = " ".join(rng.choice(WORDS).upper() for _ in range(rng.randint(0, 2)))
        sc = draw_scene(rng, (w, h), text=words or None)
        entries = []
        if words:
            x1, y1, x2, y2 = sc.box
            entries.append({"text": words, "bbox": _norm(sc.box, w, h),
                            "polygon": [[x1, y1], [x2, y1], [x2, y2], [x1, y2]],
                            "confidence": round(rng.uniform(0.5, 1.0), 3)})
        caption = (f'The image contains the text "{words}".' if words else "The image contains no text.")
        caption += " It shows " + describe(sc.bg, sc.fg, sc.shape)
        record = {"uid": key, "url": None, "width": w, "height": h,
                  "captions": [{"text": caption, "granularity": 0, "include_datacomp_raw_cap": False}],
                  "metadata": {"entries": entries}, "status": "success"}
        samples.append((key, {"jpg": sc.jpg, "txt": caption, "json": record}))
    return samples


def _grounding(rng: random.Random, n: int, prefix: str) -> list[Sample]:
    """Captions with the shape as a grounded object (in `metadata.objects`, where `blip3 ground`
    puts them); about a third of the images are blank."""
    samples = []
    w, h = 96, 64
    for i in range(n):
        key = f"{prefix}{i:04d}"
        blank = rng.random() < 0.3
        sc = draw_scene(rng, (w, h), blank=blank)
        objects = [] if blank else [{"label": sc.shape, "bbox": _norm(sc.box, w, h), "score": round(rng.uniform(0.3, 1), 3)}]
        caption = (f"The image contains nothing on a {sc.bg} background." if blank else
                   f"The image contains a {sc.fg} {sc.shape} (in the center) on a {sc.bg} background.")
        record = {"uid": key, "width": w, "height": h, "metadata": {"objects": objects},
                  "captions": [{"text": caption, "format": "positional", "style": "tags"}], "status": "success"}
        samples.append((key, {"jpg": sc.jpg, "txt": caption, "json": record}))
    return samples


# --- the two sets --------------------------------------------------------------------------------

def write_tiny_sources(out_dir: str | Path, *, shards: int = 2, per_shard: int = 24, seed: int = 0) -> dict[str, Path]:
    """Write the five catalog sources (TINY_KINDS) under `out_dir`; returns {source name: folder}."""
    out = Path(out_dir)
    folders = {name: out / name for name in TINY_KINDS}
    rng = random.Random(f"ocr:{seed}")
    for s in range(shards):
        _write(folders["caption-ocr"], s, _ocr(rng, per_shard, f"ocr{s:03d}"), "ocr", "caption",
               SampleRow(f"ocr{s:03d}bad", error_message="decode: cannot identify image file"))
    rng = random.Random(f"ground:{seed}")
    for s in range(shards):
        big = SampleRow(f"gnd{s:03d}big", error_message="too_large: 30000x30000 exceeds max pixels") if s == 0 else None
        _write(folders["caption-grounding"], s, _grounding(rng, per_shard, f"gnd{s:03d}"), "grounding", "caption", big)
    for kind, make in (("interleaved", _interleaved), ("sft", _chat), ("dpo", _dpo)):
        rng = random.Random(f"{kind}:{seed}")
        for s in range(shards):
            _write(folders[kind], s, make(rng, per_shard, f"{kind[:3]}{s:03d}"), kind, kind)
    return folders


def _generate(root: Path) -> None:
    rng = random.Random(1234)
    for name, kind, samples in (("caption", "caption", _captions(rng, 64)),
                                ("interleaved", "interleaved", _interleaved(rng, 16)),
                                ("sft", "sft", _chat(rng, 32)), ("multi", "sft", _multi(rng, 16)),
                                ("dpo", "dpo", _dpo(rng, 24)), ("safety", "sft", _safety(rng, 16))):
        _write(root / name, 0, samples, "tiny-data", kind)
    (root / "done.json").write_text(json.dumps({"version": VERSION}))


def ensure_tiny_data(root: Path | None = None) -> Path:
    """The training data folder, generated first if absent; returns its path."""
    final = (root or cache_root() / "tiny-data") / f"v{VERSION}"
    if (final / "done.json").exists():
        return final
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    _generate(tmp)
    try:
        tmp.rename(final)
    except OSError:  # another process finished first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return final
