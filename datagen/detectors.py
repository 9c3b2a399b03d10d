"""What every grounding detector shares: its limits and the post-filter (area, per-label NMS, cap).

A detector returns `GroundedObject`s with normalized boxes; `filter_objects` then applies, in
this order: minimum box area, per-label non-maximum suppression, and the maximum object count
(highest scores kept). Annotation imports skip NMS (ground truth may overlap on purpose, e.g. a
person on a horse) but keep the area floor and the cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from blip3.datagen.grounding_captions import GroundedObject

#: Grounding DINO's own demo defaults.
DEFAULT_BOX_THRESHOLD = 0.35
DEFAULT_TEXT_THRESHOLD = 0.25


@dataclass(frozen=True)
class DetectionLimits:
    """Thresholds and caps; `nms_iou=None` disables NMS."""

    box_threshold: float = DEFAULT_BOX_THRESHOLD
    text_threshold: float = DEFAULT_TEXT_THRESHOLD
    nms_iou: float | None = 0.5
    min_area: float = 0.0005  # fraction of the image (~12x12 px at 640x480)
    max_objects: int = 20

    def validate(self) -> "DetectionLimits":
        """Raise ValueError naming the bad option."""
        for name in ("box_threshold", "text_threshold"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {v}")
        if self.nms_iou is not None and not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"--nms-iou must be in (0, 1], got {self.nms_iou}")
        if not 0.0 <= self.min_area < 1.0:
            raise ValueError(f"--min-area must be in [0, 1), got {self.min_area}")
        if self.max_objects < 1:
            raise ValueError(f"--max-objects must be >= 1, got {self.max_objects}")
        return self


def box_area(b: Sequence[float]) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def nms_per_label(objects: Sequence[GroundedObject], iou_threshold: float) -> list[GroundedObject]:
    """Greedy NMS within each label: a box is dropped when it overlaps a higher-scoring box of
    the same label by IoU > `iou_threshold`. Boxes of different labels never suppress each other."""
    kept: list[GroundedObject] = []
    for o in sorted(objects, key=lambda o: -o.score):
        if all(k.label != o.label or iou(k.bbox, o.bbox) <= iou_threshold for k in kept):
            kept.append(o)
    return kept


def filter_objects(objects: Sequence[GroundedObject], limits: DetectionLimits) -> list[GroundedObject]:
    """Area floor, then per-label NMS (unless disabled), then the `max_objects` best by score."""
    objs = [o for o in objects if box_area(o.bbox) >= limits.min_area and box_area(o.bbox) > 0]
    if limits.nms_iou is not None:
        objs = nms_per_label(objs, limits.nms_iou)
    return sorted(objs, key=lambda o: -o.score)[: limits.max_objects]
