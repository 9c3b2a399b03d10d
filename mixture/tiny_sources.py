"""Tiny sources of all four kinds, written as real shards: test data and the data of the shipped
small mixtures (`manifests/tiny-mix.yaml`), made by `blip3 source tiny OUT`.

Images are drawn with PIL (a coloured box, and for OCR sources the text itself), records follow
formats.md (OCR entries / grounded objects / interleaved documents / SFT chats / DPO pairs), and
every caption shard records a few failed inputs so failure views have something to show.
Deterministic: the same arguments give the same bytes.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageDraw

from core.shards import SampleRow, ShardWriter

WORDS = ("open", "shop", "cafe", "exit", "sale", "main", "road", "north", "park", "bank", "city", "hotel")
LABELS = ("person", "dog", "car", "tree", "cup", "chair", "bicycle", "bird")
TINY_KINDS = {
    "caption-ocr": "caption",
    "caption-grounding": "caption",
    "interleaved": "interleaved",
    "sft": "sft",
    "dpo": "dpo",
}


def _image(rng: random.Random, w: int = 96, h: int = 64, text: str | None = None) -> tuple[bytes, tuple[int, int, int, int]]:
    """A JPEG with a filled rectangle (and `text` written in it); returns bytes and the box (px)."""
    img = Image.new("RGB", (w, h), tuple(rng.randrange(150, 255) for _ in range(3)))
    d = ImageDraw.Draw(img)
    x1, y1 = rng.randrange(0, w // 2), rng.randrange(0, h // 2)
    x2, y2 = rng.randrange(x1 + 16, w), rng.randrange(y1 + 12, h)
    d.rectangle([x1, y1, x2, y2], fill=tuple(rng.randrange(0, 120) for _ in range(3)))
    if text:
        d.text((x1 + 2, y1 + 1), text, fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return buf.getvalue(), (x1, y1, x2, y2)


def _norm(box: tuple[int, int, int, int], w: int, h: int) -> list[float]:
    x1, y1, x2, y2 = box
    return [round(x1 / w, 3), round(y1 / h, 3), round(x2 / w, 3), round(y2 / h, 3)]


def write_caption_ocr(out: Path, shards: int, per_shard: int, seed: int) -> None:
    rng = random.Random(f"ocr:{seed}")
    for s in range(shards):
        with ShardWriter(out, s, generator={"name": "ocr", "engine": "tiny-sources"}) as wr:
            for i in range(per_shard):
                key = f"ocr{s:03d}{i:04d}"
                words = " ".join(rng.choice(WORDS).upper() for _ in range(rng.randint(0, 2)))
                jpg, box = _image(rng, text=words or None)
                entries = []
                if words:
                    x1, y1, x2, y2 = box
                    entries.append({"text": words, "bbox": _norm(box, 96, 64),
                                    "polygon": [[x1, y1], [x2, y1], [x2, y2], [x1, y2]],
                                    "confidence": round(rng.uniform(0.5, 1.0), 3)})
                caption = (f'The image contains the text "{words}".' if words else "The image contains no text.")
                caption += " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12)))
                record = {"uid": key, "url": None, "width": 96, "height": 64,
                          "captions": [{"text": caption, "granularity": 0, "include_datacomp_raw_cap": False}],
                          "metadata": {"entries": entries}, "status": "success"}
                conf = entries[0]["confidence"] if entries else None
                wr.add(key, {"jpg": jpg, "txt": caption, "json": record},
                       SampleRow(key, uid=key, width=96, height=64, image_bytes=len(jpg), caption_length=len(caption),
                                 n_captions=1, n_ocr=len(entries), n_objects=0, mean_confidence=conf))
            wr.add_failure(SampleRow(f"ocr{s:03d}bad", error="decode: cannot identify image file"))


def write_caption_grounding(out: Path, shards: int, per_shard: int, seed: int) -> None:
    rng = random.Random(f"ground:{seed}")
    for s in range(shards):
        with ShardWriter(out, s, generator={"name": "grounding", "engine": "tiny-sources"}) as wr:
            for i in range(per_shard):
                key = f"gnd{s:03d}{i:04d}"
                jpg, box = _image(rng)
                objects = [{"label": rng.choice(LABELS), "bbox": _norm(box, 96, 64), "score": round(rng.uniform(0.3, 1), 3)}
                           for _ in range(rng.randint(0, 3))]
                caption = "The image contains " + (", ".join(f"{o['label']} (in the center)" for o in objects) or "nothing")
                record = {"uid": key, "width": 96, "height": 64, "objects": objects,
                          "captions": [{"text": caption, "format": "positional", "style": "tags"}], "status": "success"}
                scores = [o["score"] for o in objects]
                wr.add(key, {"jpg": jpg, "txt": caption, "json": record},
                       SampleRow(key, uid=key, width=96, height=64, image_bytes=len(jpg), caption_length=len(caption),
                                 n_captions=1, n_ocr=0, n_objects=len(objects),
                                 mean_confidence=sum(scores) / len(scores) if scores else None))
            if s == 0:
                wr.add_failure(SampleRow(f"gnd{s:03d}big", error="too_large: 30000x30000 exceeds max pixels"))


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_documents(out: Path, kind: str, shards: int, per_shard: int, seed: int) -> None:
    """Interleaved documents, SFT conversations or DPO pairs, images as `<key>.imgN.jpg`."""
    rng = random.Random(f"{kind}:{seed}")
    for s in range(shards):
        with ShardWriter(out, s, generator={"name": kind, "engine": "tiny-sources"}) as wr:
            for i in range(per_shard):
                key = f"{kind[:3]}{s:03d}{i:04d}"
                n_img = rng.randint(1, 3) if kind == "interleaved" else 1
                members: dict[str, bytes | str | dict] = {}
                names = []
                for j in range(n_img):
                    members[f"img{j}.jpg"] = _image(rng)[0]
                    names.append(f"img{j}.jpg")
                if kind == "interleaved":
                    texts, images = [], []
                    for name in names:
                        texts += [_sentence(rng, rng.randint(3, 20)), None]
                        images += [None, name]
                    record = {"texts": texts, "images": images}
                    chars = sum(len(t) for t in texts if t)
                elif kind == "sft":
                    record = {"conversations": [
                        {"role": "user", "content": "<image>\n" + _sentence(rng, 5) + "?"},
                        {"role": "assistant", "content": _sentence(rng, rng.randint(2, 15))}], "images": names}
                    chars = sum(len(c["content"]) for c in record["conversations"])
                else:
                    record = {"prompt": "<image>\n" + _sentence(rng, 5) + "?", "chosen": _sentence(rng, 8),
                              "rejected": _sentence(rng, 3), "images": names}
                    chars = len(record["prompt"]) + len(record["chosen"]) + len(record["rejected"])
                members["json"] = record
                wr.add(key, members, SampleRow(key, uid=key, caption_length=chars,
                                               image_bytes=sum(len(members[n]) for n in names)))


def write_tiny_sources(out_dir: str | Path, *, shards: int = 2, per_shard: int = 24, seed: int = 0) -> dict[str, Path]:
    """Write all tiny sources under `out_dir`; returns {source name: folder}."""
    out = Path(out_dir)
    folders = {name: out / name for name in TINY_KINDS}
    write_caption_ocr(folders["caption-ocr"], shards, per_shard, seed)
    write_caption_grounding(folders["caption-grounding"], shards, per_shard, seed)
    for kind in ("interleaved", "sft", "dpo"):
        write_documents(folders[kind], kind, shards, per_shard, seed)
    return folders
