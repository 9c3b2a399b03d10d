"""Tiny synthetic shards for the CPU pipeline (`manifests/tiny/`), generated on first use.

Each image is a flat background colour with one shape in another colour; every text names them
("a red circle on a blue background"), so a tiny model can learn the task in a handful of steps
and the pretrain loss visibly falls. Sources (formats.md shapes, written with core.shards):

    caption/      caption shards: `<key>.jpg`, `<key>.txt`, `<key>.json`
    interleaved/  documents `{"texts", "images"}` with image members `<key>.<name>`
    sft/          single-image chats `{"conversations", "images"}`
    multi/        two-image chats (interleaved SFT)
    dpo/          preference pairs `{"prompt", "chosen", "rejected", "images"}` (rejected names
                  the wrong colour and shape)
    safety/       refusals to unsafe requests plus safe single-image chats

Deterministic (fixed seed, deterministic JPEG and tars). Written under `$BLIP3_CACHE/tiny-data/`
(default `.cache/` in the repository), into a temporary folder renamed when complete, so two
processes generating at once never see a half-written set.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

from core.shards import SampleRow, ShardWriter

VERSION = 1
COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30), "white": (250, 250, 250), "black": (10, 10, 10)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((32, 32), (64, 32), (32, 64), (48, 48))
UNSAFE = ("How do I build a weapon from this?", "Tell me how to hurt someone.", "How can I steal this?")
REFUSAL = "I cannot help with that request."
GENERATOR = {"name": "tiny-data", "version": VERSION}


def cache_root() -> Path:
    env = os.environ.get("BLIP3_CACHE")
    return Path(env) if env else Path(__file__).resolve().parents[1] / ".cache"


def _scene(rng: random.Random, size: tuple[int, int] | None = None) -> tuple[bytes, str, str, str]:
    """One image: JPEG bytes, background colour, shape colour, shape."""
    bg, fg = rng.sample(sorted(COLORS), 2)
    shape = rng.choice(SHAPES)
    w, h = size or rng.choice(SIZES)
    img = Image.new("RGB", (w, h), COLORS[bg])
    d = ImageDraw.Draw(img)
    s = min(w, h)
    cx, cy, r = w // 2, h // 2, int(s * 0.35)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=COLORS[fg])
    elif shape == "square":
        d.rectangle(box, fill=COLORS[fg])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[fg])
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue(), bg, fg, shape


def _describe(bg: str, fg: str, shape: str) -> str:
    return f"a {fg} {shape} on a {bg} background."


def _write(out: Path, samples: list[tuple[str, dict]]) -> None:
    with ShardWriter(out, 0, generator=GENERATOR) as w:
        for key, members in samples:
            jpg = next((v for k, v in members.items() if k.endswith("jpg")), b"")
            txt = members.get("txt")
            w.add(key, members, SampleRow(key, image_bytes=len(jpg), caption_length=len(txt) if txt else None))


def _captions(rng: random.Random, n: int) -> list[tuple[str, dict]]:
    out = []
    for i in range(n):
        jpg, bg, fg, shape = _scene(rng)
        cap = _describe(bg, fg, shape).capitalize()
        out.append((f"cap{i:04d}", {"jpg": jpg, "txt": cap, "json": {"uid": f"cap{i}", "caption": cap}}))
    return out


def _interleaved(rng: random.Random, n: int) -> list[tuple[str, dict]]:
    out = []
    for i in range(n):
        texts: list[str | None] = ["A page about shapes."]
        images: list[str | None] = [None]
        members: dict = {}
        for j in range(2):
            jpg, bg, fg, shape = _scene(rng, (32, 32))
            members[f"{j}.jpg"] = jpg
            texts += [None, f"Picture {j + 1} shows {_describe(bg, fg, shape)}"]
            images += [f"{j}.jpg", None]
        members["json"] = {"texts": texts, "images": images}
        out.append((f"doc{i:04d}", members))
    return out


def _chat(rng: random.Random, n: int, prefix: str) -> list[tuple[str, dict]]:
    out = []
    for i in range(n):
        jpg, bg, fg, shape = _scene(rng)
        q = rng.choice(["What is in the image?", "Describe the picture.", "Which shape do you see?"])
        conv = [{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": f"I see {_describe(bg, fg, shape)}"}]
        out.append((f"{prefix}{i:04d}", {"0.jpg": jpg, "json": {"conversations": conv, "images": ["0.jpg"]}}))
    return out


def _multi(rng: random.Random, n: int) -> list[tuple[str, dict]]:
    out = []
    for i in range(n):
        a, b = _scene(rng, (32, 32)), _scene(rng, (32, 32))
        conv = [
            {"role": "user", "content": "<image> <image>\nWhat do the two pictures show?"},
            {"role": "assistant", "content": f"The first shows {_describe(*a[1:])} The second shows {_describe(*b[1:])}"},
        ]
        out.append((f"multi{i:04d}", {"0.jpg": a[0], "1.jpg": b[0], "json": {"conversations": conv, "images": ["0.jpg", "1.jpg"]}}))
    return out


def _dpo(rng: random.Random, n: int) -> list[tuple[str, dict]]:
    out = []
    for i in range(n):
        jpg, bg, fg, shape = _scene(rng)
        wrong_fg = rng.choice([c for c in sorted(COLORS) if c not in (fg, bg)])
        wrong_shape = rng.choice([s for s in SHAPES if s != shape])
        rec = {
            "prompt": "<image>\nWhat is in the image?",
            "chosen": f"I see {_describe(bg, fg, shape)}",
            "rejected": f"I see {_describe(bg, wrong_fg, wrong_shape)}",
            "images": ["0.jpg"],
        }
        out.append((f"pair{i:04d}", {"0.jpg": jpg, "json": rec}))
    return out


def _safety(rng: random.Random, n: int) -> list[tuple[str, dict]]:
    out = []
    for i in range(n):
        jpg, bg, fg, shape = _scene(rng)
        if i % 2 == 0:
            conv = [{"role": "user", "content": f"<image>\n{rng.choice(UNSAFE)}"}, {"role": "assistant", "content": REFUSAL}]
        else:
            conv = [{"role": "user", "content": "<image>\nWhat is in the image?"}, {"role": "assistant", "content": f"I see {_describe(bg, fg, shape)}"}]
        out.append((f"safe{i:04d}", {"0.jpg": jpg, "json": {"conversations": conv, "images": ["0.jpg"]}}))
    return out


def _generate(root: Path) -> None:
    rng = random.Random(1234)
    _write(root / "caption", _captions(rng, 64))
    _write(root / "interleaved", _interleaved(rng, 16))
    _write(root / "sft", _chat(rng, 32, "sft"))
    _write(root / "multi", _multi(rng, 16))
    _write(root / "dpo", _dpo(rng, 24))
    _write(root / "safety", _safety(rng, 16))
    (root / "done.json").write_text(json.dumps({"version": VERSION}))


def ensure_tiny_data(root: Path | None = None) -> Path:
    """The tiny data folder, generated first if absent; returns its path."""
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
