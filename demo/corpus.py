"""The demo's small corpus, generated on the spot from what ships with the installed packages.

Nothing is downloaded: text images are rendered with the DejaVu fonts matplotlib ships, the real
photos are matplotlib's sample images, and the shape scenes come with a COCO-style box file
written next to them (categories, a crowd box, an image with no boxes), so the grounding engine's
annotations path has real structure to read.

    corpus/
      local/          images read as a folder input (rendered signs, real photos)
      web/            images served over HTTP and fetched by the shard tasks
      urls.parquet    url, caption (alt text), uid — includes a 404 and a corrupt image
      scenes/         shape scenes + coco.json (their boxes) + captions.jsonl
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from PIL import Image, ImageDraw, ImageFont

FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
FONTS = ["DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans.ttf", "DejaVuSerif-Bold.ttf"]
PHOTOS = ["grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"]

SIGNS = [
    "MACK SHOP", "OPEN 24 HOURS", "FRESH BREAD", "NO PARKING", "CITY LIBRARY", "EXIT",
    "SALE 50% OFF", "MAIN STREET", "COFFEE AND TEA", "PLATFORM 9", "HOTEL CENTRAL", "DANGER HIGH VOLTAGE",
]
ALT_TEXTS = [
    "a shop sign on a wall", "a poster in a window", "a street sign", "a printed notice",
    "a label on a door", "a banner above the entrance",
]
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ["circle", "square", "triangle"]


@dataclass
class Corpus:
    root: Path
    local_dir: Path
    web_dir: Path
    urls: Path  # parquet written by `write_url_list` once the server's address is known
    scenes_dir: Path
    coco: Path
    texts: dict[str, str]  # image file name -> rendered text (for checking OCR)


def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_DIR / name), size)


def render_sign(text: str, rng: random.Random, *, width: int = 480, height: int = 240) -> Image.Image:
    """A sign: `text` in a random font, size, colour and slight rotation on a plain background."""
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    fg = tuple(rng.randint(0, 90) for _ in range(3))
    img = Image.new("RGB", (width, height), bg)
    f = font(rng.choice(FONTS), rng.randint(30, 44))
    draw = ImageDraw.Draw(img)
    box = draw.textbbox((0, 0), text, font=f)
    tw, th = box[2] - box[0], box[3] - box[1]
    layer = Image.new("RGBA", (tw + 20, th + 20), (0, 0, 0, 0))
    ImageDraw.Draw(layer).text((10 - box[0], 10 - box[1]), text, font=f, fill=fg + (255,))
    layer = layer.rotate(rng.uniform(-6, 6), expand=True, resample=Image.BICUBIC)
    x = rng.randint(0, max(0, width - layer.width))
    y = rng.randint(0, max(0, height - layer.height))
    img.paste(layer, (x, y), layer)
    return img


def render_scene(rng: random.Random, n_shapes: int, size: tuple[int, int] = (320, 240)) -> tuple[Image.Image, list[dict]]:
    """Coloured shapes on a grey field; returns the image and its objects (label, pixel box)."""
    img = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(img)
    objects = []
    for _ in range(n_shapes):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        w = h = rng.randint(40, 90)
        x, y = rng.randint(0, size[0] - w), rng.randint(0, size[1] - h)
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse([x, y, x + w, y + h], fill=fill)
        elif shape == "square":
            draw.rectangle([x, y, x + w, y + h], fill=fill)
        else:
            draw.polygon([(x + w / 2, y), (x, y + h), (x + w, y + h)], fill=fill)
        objects.append({"label": f"{colour} {shape}", "shape": shape, "bbox_xywh": [x, y, w, h]})
    return img, objects


def scene_caption(objects: list[dict]) -> str:
    if not objects:
        return "an empty grey background"
    names = [f"a {o['label']}" for o in objects]
    return "a picture of " + (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1])


def build_corpus(root: str | Path, *, n_signs: int = 12, n_scenes: int = 8, seed: int = 0) -> Corpus:
    """Write the corpus under `root` (replacing what was there) and return where things are."""
    rng = random.Random(seed)
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    local, web, scenes = root / "local", root / "web", root / "scenes"
    for d in (local, web, scenes):
        d.mkdir(parents=True)
    texts: dict[str, str] = {}
    for i in range(n_signs):
        text = SIGNS[i % len(SIGNS)]
        target = web if i % 2 == 0 else local
        name = f"sign_{i:03d}.png" if i % 3 else f"sign_{i:03d}.jpg"
        render_sign(text, rng).save(target / name)
        texts[name] = text
    sample_dir = Path(matplotlib.get_data_path()) / "sample_data"
    for photo in PHOTOS:
        if (sample_dir / photo).exists():
            shutil.copy(sample_dir / photo, local / photo)
    (web / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")

    categories = [
        {"id": i + 1, "name": f"{c} {s}", "supercategory": s}
        for i, (c, s) in enumerate((c, s) for c in COLOURS for s in SHAPES)
    ]
    cat_id = {c["name"]: c["id"] for c in categories}
    images, annotations, captions = [], [], []
    for i in range(n_scenes):
        n_shapes = 0 if i == n_scenes - 1 else rng.randint(1, 3)  # the last scene has no boxes
        img, objects = render_scene(rng, n_shapes)
        name = f"scene_{i:03d}.png"
        img.save(scenes / name)
        images.append({"id": i + 1, "file_name": name, "width": img.width, "height": img.height})
        for o in objects:
            x, y, w, h = o["bbox_xywh"]
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": cat_id[o["label"]],
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
            })
        captions.append({"file_name": name, "caption": scene_caption(objects)})
    if annotations:  # one crowd region, as COCO has, which grounding must skip
        crowd = dict(annotations[0], id=len(annotations) + 1, iscrowd=1)
        annotations.append(crowd)
    coco = scenes / "coco.json"
    coco.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}, indent=1))
    with open(scenes / "captions.jsonl", "w") as f:
        for c in captions:
            f.write(json.dumps(c) + "\n")
    return Corpus(root, local, web, root / "urls.parquet", scenes, coco, texts)


def write_url_list(corpus: Corpus, base_url: str) -> Path:
    """The URL list the job fetches: every web image with an alt text, plus a 404."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i, p in enumerate(sorted(corpus.web_dir.iterdir())):
        rows.append({"url": f"{base_url}/{p.name}", "caption": ALT_TEXTS[i % len(ALT_TEXTS)], "uid": p.stem})
    rows.append({"url": f"{base_url}/missing.jpg", "caption": "gone", "uid": "missing"})
    pq.write_table(pa.Table.from_pylist(rows), corpus.urls)
    return corpus.urls


