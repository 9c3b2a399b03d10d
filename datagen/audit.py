"""`blip3 audit SHARDS -o DIR`: look at caption shards before training on them.

Writes `DIR/index.html`, a contact sheet of sampled images (reservoir sample, seeded) with the
OCR boxes (red: the polygon when there is one, else the normalised bbox) and the object boxes
(blue, with label and score) drawn on them, each with its key and caption; the drawn images in
`DIR/images/`; PNG histograms over *all* scanned samples: caption lengths, boxes per image,
OCR confidence (and detector scores); and every FAILED input sample of the shards' sidecars
(`error_message`), so the page never counts only the successes. Boxes are drawn into the pixels
(not overlaid in CSS), so the sheet shows exactly what the coordinates say on any viewer; each box
is a coloured line between two white ones and each label white text on the box colour, legible on
dark and light images alike.

The page counts its own images once loaded (`data-images-loaded` on `<body>`, and in its
header), so a broken image is visible to a person and to a headless-browser check alike.
"""

from __future__ import annotations

import html
import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from blip3.core.errors import UserError
from blip3.core.records import grounding_objects, ocr_entries
from blip3.core.shards import is_image_ext, iter_shard, resolve_shards

THUMB_WIDTH = 320
OCR_COLOR = (230, 20, 20)
OBJECT_COLOR = (20, 90, 230)
HALO_COLOR = (255, 255, 255)  # around every box line: contrast on dark and light backgrounds
LABEL_SIZE = 13


@dataclass
class AuditResult:
    html: Path
    scanned: int
    shown: int
    plots: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (shard, key, error_message)


@dataclass
class _Card:
    key: str
    shard: str
    caption: str
    image: bytes | None
    entries: list[dict]
    objects: list[dict]
    frame_width: int | None = None  # width of the image the polygons' pixels refer to (json `width`)


def _scaled_box(bbox, w: int, h: int) -> list[float] | None:
    try:
        x1, y1, x2, y2 = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    return [x1 * w, y1 * h, x2 * w, y2 * h]


def render_card_image(card: _Card) -> Image.Image | None:
    """The sample's image, scaled to THUMB_WIDTH, with its OCR and object boxes drawn."""
    if card.image is None:
        return None
    try:
        img = Image.open(io.BytesIO(card.image))
        img.load()
    except (UnidentifiedImageError, OSError):
        return None
    img = ImageOps.exif_transpose(img).convert("RGB")  # annotations refer to the upright image
    ow, oh = img.size
    img = img.resize((THUMB_WIDTH, max(1, round(oh * THUMB_WIDTH / max(ow, 1)))), Image.Resampling.BILINEAR)
    w, h = img.size
    scale = THUMB_WIDTH / max(card.frame_width or ow, 1)  # polygon pixels -> thumbnail pixels
    d = ImageDraw.Draw(img)
    for e in card.entries:
        poly = e.get("polygon")
        if isinstance(poly, list) and len(poly) >= 3:
            points = [(float(x) * scale, float(y) * scale) for x, y in poly]
            d.polygon(points, outline=HALO_COLOR, width=4)
            d.polygon(points, outline=OCR_COLOR, width=2)
        elif (box := _scaled_box(e.get("bbox"), w, h)) is not None:
            _outlined_rect(d, box, OCR_COLOR)
    font = ImageFont.load_default(size=LABEL_SIZE)
    for o in card.objects:
        box = _scaled_box(o.get("bbox"), w, h)
        if box is None:
            continue
        _outlined_rect(d, box, OBJECT_COLOR)
        label = f"{o.get('label', '?')} {o.get('score', '')}".strip()
        x, y = box[0], max(0.0, box[1] - LABEL_SIZE - 3)  # above the box, inside the image
        x1, y1, x2, y2 = d.textbbox((x + 2, y + 1), label, font=font)
        d.rectangle((x, y, x2 + 2, y2 + 2), fill=OBJECT_COLOR)
        d.text((x + 2, y + 1), label, fill=HALO_COLOR, font=font)
    return img


def _outlined_rect(d: ImageDraw.ImageDraw, box: list[float], color: tuple[int, int, int]) -> None:
    """A 2-px coloured box line inside a 4-px white one: visible on any background."""
    d.rectangle(box, outline=HALO_COLOR, width=4)
    d.rectangle([box[0] + 1, box[1] + 1, box[2] - 1, box[3] - 1], outline=color, width=2)


def _failed_rows(tar: Path) -> list[tuple[str, str, str]]:
    """(shard, key, error_message) of the failed inputs in a tar's sidecar (none without one)."""
    sidecar = tar.with_suffix(".parquet")
    if not sidecar.is_file():
        return []
    try:
        rows = pq.read_table(sidecar, columns=["key", "status", "error_message"]).to_pylist()
    except Exception:  # a foreign or damaged sidecar: the sheet still shows the tar's samples
        return []
    return [(tar.name, str(r["key"]), str(r["error_message"] or "")) for r in rows if r["status"] != "success"]


def _card_html(card: _Card, name: str, out: Path) -> str:
    """One card of the sheet; its drawn image is saved as `out/name`."""
    img = render_card_image(card)
    if img is None:
        figure = '<div class="broken">image does not decode</div>'
    else:
        img.save(out / name, format="JPEG", quality=85)
        figure = f'<img src="{name}" width="{img.width}" height="{img.height}" alt="{html.escape(card.key)}">'
    legend = "".join(
        f'<li class="ocr">{html.escape(str(e.get("text", "")))} '
        f'<span>{e.get("confidence", "")}</span></li>' for e in card.entries
    ) + "".join(
        f'<li class="obj">{html.escape(str(o.get("label", "")))} <span>{o.get("score", "")}</span></li>'
        for o in card.objects
    )
    return (f'<figure class="card">{figure}<figcaption><b>{html.escape(card.key)}</b> '
            f'<small>{html.escape(card.shard)}</small><p>{html.escape(card.caption)}</p>'
            f'<ul>{legend}</ul></figcaption></figure>')


def _tar_samples(tar: Path) -> Iterator[dict[str, Any]]:
    """The samples of one tar; a file that is not a tar is named in one line (a UserError)."""
    try:
        yield from iter_shard(tar)
    except tarfile.TarError as e:
        raise UserError(f"not a readable tar ({e})", file=tar) from None


def write_audit(shards: str | Path, out: str | Path, *, n: int = 48, seed: int = 0,
                db: str | Path | None = None) -> AuditResult:
    """Scan `shards`, draw a reservoir sample of `n` on a contact sheet, plot the histograms; with
    a catalog `db` holding `blip3 curate` decisions for the shards, add their section
    (datagen/audit_curation.py: duplicate clusters, dropped samples, score histograms)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    chosen: list[_Card] = []
    lengths: list[int] = []
    boxes: list[int] = []
    ocr_conf: list[float] = []
    obj_score: list[float] = []
    scanned = 0
    failed: list[tuple[str, str, str]] = []
    tars = resolve_shards(shards)
    for tar in tars:
        failed += _failed_rows(Path(tar))
        for sample in _tar_samples(tar):
            try:
                rec = json.loads(sample["json"]) if "json" in sample else {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                rec = {}
            caption = sample["txt"].decode("utf-8", errors="replace") if "txt" in sample else ""
            entries, objects = ocr_entries(rec), grounding_objects(rec)
            lengths.append(len(caption))
            boxes.append(len(entries) + len(objects))
            ocr_conf += [float(e["confidence"]) for e in entries if isinstance(e.get("confidence"), (int, float))]
            obj_score += [float(o["score"]) for o in objects if isinstance(o.get("score"), (int, float))]
            scanned += 1
            slot = len(chosen) if len(chosen) < n else rng.randrange(scanned)
            if slot < n:
                image = next((v for k, v in sample.items() if not k.startswith("__") and is_image_ext(k)), None)
                width = rec.get("width") if isinstance(rec.get("width"), int) else None
                card = _Card(sample["__key__"], Path(tar).name, caption, image, entries, objects, width)
                if slot == len(chosen):
                    chosen.append(card)
                else:
                    chosen[slot] = card
    chosen.sort(key=lambda c: (c.shard, c.key))
    cards_html = [_card_html(card, f"images/{i:04d}.jpg", out) for i, card in enumerate(chosen)]
    from blip3.datagen.audit_plots import plot_histograms

    plots = plot_histograms(out, lengths=lengths, boxes=boxes, ocr_conf=ocr_conf, obj_score=obj_score)
    curation = None
    if db is not None:
        from blip3.datagen.audit_curation import curation_audit

        curation = curation_audit(Path(db), [str(Path(t).resolve()) for t in tars], out)
        plots += curation.plots if curation else []
    failed_html = "".join(
        f'<tr><td>{html.escape(shard)}</td><td>{html.escape(key)}</td><td>{html.escape(error)}</td></tr>'
        for shard, key, error in failed)
    page = _PAGE.format(
        title=html.escape(str(shards)), scanned=scanned, shown=len(chosen), n_failed=len(failed),
        inputs=scanned + len(failed),
        plots="".join(f'<img class="plot" src="{p.name}" alt="{p.stem}">' for p in plots),
        cards="\n".join(cards_html),
        curation=curation.html if curation else "",
        failed=(f'<table><tr><th>shard</th><th>key</th><th>reason</th></tr>{failed_html}</table>'
                if failed else "<p>None.</p>"),
    )
    index = out / "index.html"
    index.write_text(page)
    return AuditResult(index, scanned, len(chosen), plots, failed)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>audit: {title}</title>
<style>
body {{ font-family: sans-serif; margin: 16px; background: #fafafa; }}
header p {{ color: #444; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 8px; }}
.plot {{ width: 360px; border: 1px solid #ddd; background: #fff; }}
.sheet {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 10px; }}
.card {{ margin: 0; padding: 5px; background: #fff; border: 1px solid #ddd; }}
.card p {{ font-size: 12px; margin: 4px 0; }}
.card ul {{ font-size: 11px; margin: 0; padding-left: 16px; }}
.ocr {{ color: rgb(230, 20, 20); }} .obj {{ color: rgb(20, 90, 230); }}
.broken {{ width: 320px; height: 60px; background: #fdd; }}
#failed table {{ border-collapse: collapse; font-size: 12px; background: #fff; }}
#failed td, #failed th {{ border: 1px solid #ddd; padding: 2px 6px; text-align: left; }}
.cluster, .drops {{ display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-start; margin-bottom: 8px; }}
.cluster h3 {{ width: 100%; margin: 4px 0; font-size: 14px; }}
.cluster figure, .drops figure {{ margin: 0; padding: 4px; width: 170px; background: #fff; font-size: 11px; }}
figure.kept {{ border: 2px solid #2ca02c; }} figure.dropped {{ border: 2px solid #d62728; }}
</style></head>
<body data-images-loaded="pending">
<header><h1>Audit of {title}</h1>
<p>{inputs} input samples: {scanned} written ({shown} shown below), {n_failed} failed (listed at the
end, with their reason). Red: OCR boxes; blue: objects.
<span id="loaded">Images loaded: checking...</span></p></header>
<section class="plots">{plots}</section>
<section class="sheet">
{cards}
</section>
{curation}
<section id="failed"><h2>Failed samples ({n_failed})</h2>
{failed}
</section>
<script>
window.addEventListener("load", () => {{
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = ok + "/" + imgs.length;
  document.getElementById("loaded").textContent = "Images loaded: " + ok + " of " + imgs.length;
}});
</script>
</body></html>
"""

