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
- Split lines: detectors sometimes cut one line of text into pieces (`DANGER HIGH` + `HVOLTAGE`,
  often overlapping, the overlap read twice). Neighbouring pieces of one visual line are merged
  into one entry, joined by one space, only where the gap between them is a word gap: at most
  `WORD_GAP` line heights (detector boxes are padded, so a word gap is usually an overlap).
  Characters read twice in an overlap (the left text ends with what the right one starts with,
  and the overlap is wide enough to hold them) are kept once. Pieces further apart (two signs side by side, columns)
  stay separate entries. The merged polygon runs from the left piece's left edge to the right
  piece's right edge; its confidence is the lower of the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

BOX_DECIMALS = 3
#: Largest gap, in line heights, between two pieces of one line that still counts as a word gap.
WORD_GAP = 0.5
#: Overlap, in character widths, that one character read twice takes (see `_drop_repeat`).
REPEAT_WIDTH = 0.75


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


def _lines(entries: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Group entries into visual lines, top to bottom; each line left to right."""
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
    return [sorted(line, key=lambda e: (e["bbox"][0], e["bbox"][1])) for line in lines]


def reading_order(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sort entries top-to-bottom by line, then left-to-right within a line."""
    return [e for line in _lines(entries) for e in line]


def _x_span(entry: dict[str, Any]) -> tuple[float, float]:
    xs = [p[0] for p in entry["polygon"]]
    return min(xs), max(xs)


def _height(entry: dict[str, Any]) -> float:
    ys = [p[1] for p in entry["polygon"]]
    return max(ys) - min(ys)


def _drop_repeat(left: str, right: str, overlap_chars: float) -> str:
    """`right` without the characters that end `left` too (an overlap read twice), longest first.

    Only as many characters as fit in the boxes' overlap (`overlap_chars`, in the right piece's mean
    character widths, `REPEAT_WIDTH` each): padded boxes of `SALE` + `EXIT` overlap too, and their
    `E`s are two letters.
    """
    most = min(len(left), len(right) - 1, int(overlap_chars / REPEAT_WIDTH))
    for k in range(most, 0, -1):
        if left.endswith(right[:k]):
            return right[k:].lstrip()
    return right


def merge_split_line(line: list[dict[str, Any]], width: int, height: int) -> list[dict[str, Any]]:
    """Merge the neighbouring pieces of one visual line that are a word gap apart (module doc)."""
    out: list[dict[str, Any]] = []
    for entry in line:
        if out:
            prev = out[-1]
            (_, prev_x2), (x1, _) = _x_span(prev), _x_span(entry)
            gap = x1 - prev_x2
            if gap <= WORD_GAP * min(_height(prev), _height(entry)):
                right = entry["text"]
                if gap < 0:
                    char_w = (_x_span(entry)[1] - x1) / len(right)
                    right = _drop_repeat(prev["text"], right, -gap / char_w if char_w > 0 else 0.0)
                polygon = [prev["polygon"][0], entry["polygon"][1], entry["polygon"][2], prev["polygon"][3]]
                out[-1] = {"text": f"{prev['text']} {right}" if right else prev["text"],
                           "bbox": polygon_to_bbox(polygon, width, height), "polygon": polygon,
                           "confidence": min(prev["confidence"], entry["confidence"])}
                continue
        out.append(entry)
    return out


def build_entries(
    raw: Sequence[RawText], width: int, height: int, min_confidence: float = 0.5
) -> list[dict[str, Any]]:
    """Filter, normalise, merge split lines and order raw detections into stored OCR entries."""
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
    return [e for line in _lines(entries) for e in merge_split_line(line, width, height)]
