"""Engine-independent OCR post-processing: filter, polygon -> normalised box, reading order.

Every engine returns `RawText(polygon, text, confidence)` with a 4-point polygon in pixels of the
upright image. `build_entries` turns them into the stored entries of docs/formats.md:

    {"text", "bbox": [x1, y1, x2, y2] normalised to [0, 1] (3 decimals, clamped),
     "polygon": [[x, y] * 4] pixels (1 decimal), "confidence"}

- Dropped: empty/whitespace text and confidence below `min_confidence`.
- Box: min/max of the polygon, divided by width/height, clamped to [0, 1], rounded to 3 decimals
  (rounding is monotonic, so x1 <= x2 and y1 <= y2 survive it).
- Reading order: top to bottom by line, then left to right. Entries are sorted by their vertical
  centre; an entry joins the current line when its centre lies within the vertical span of the
  line's first entry (tolerant to slightly slanted lines); lines are then read left to right by x1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

BOX_DECIMALS = 3


@dataclass(frozen=True)
class RawText:
    """One detection as an engine reports it: polygon in pixels, recognised text, confidence."""

    polygon: Sequence[Sequence[float]]
    text: str
    confidence: float


def polygon_to_bbox(polygon: Sequence[Sequence[float]], width: int, height: int) -> list[float]:
    """Pixel polygon -> `[x1, y1, x2, y2]` normalised, clamped to [0, 1], 3 decimals."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    xs = [float(p[0]) for p in polygon]
    ys = [float(p[1]) for p in polygon]

    def norm(v: float, size: int) -> float:
        return round(min(1.0, max(0.0, v / size)), BOX_DECIMALS)

    return [norm(min(xs), width), norm(min(ys), height), norm(max(xs), width), norm(max(ys), height)]


def reading_order(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sort entries top-to-bottom by line, then left-to-right within a line."""
    by_centre = sorted(entries, key=lambda e: ((e["bbox"][1] + e["bbox"][3]) / 2, e["bbox"][0]))
    lines: list[list[dict[str, Any]]] = []
    span: tuple[float, float] | None = None
    for entry in by_centre:
        cy = (entry["bbox"][1] + entry["bbox"][3]) / 2
        if span is not None and span[0] <= cy <= span[1]:
            lines[-1].append(entry)
            continue
        lines.append([entry])
        span = (entry["bbox"][1], entry["bbox"][3])
    return [e for line in lines for e in sorted(line, key=lambda e: (e["bbox"][0], e["bbox"][1]))]


def build_entries(
    raw: Sequence[RawText], width: int, height: int, min_confidence: float = 0.5
) -> list[dict[str, Any]]:
    """Filter, normalise and order raw detections into stored OCR entries."""
    entries = []
    for r in raw:
        text = " ".join(r.text.split())
        if not text or float(r.confidence) < min_confidence:
            continue
        entries.append(
            {
                "text": text,
                "bbox": polygon_to_bbox(r.polygon, width, height),
                "polygon": [[round(float(x), 1), round(float(y), 1)] for x, y in r.polygon],
                "confidence": round(float(r.confidence), 4),
            }
        )
    return reading_order(entries)
