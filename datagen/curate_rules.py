"""The curation rules: what each decides, from which score, with which default threshold.

Per-sample rules are thresholds on one score of `sample_scores`, turned into `sample_decisions`
rows by one SQL statement each (`run_rule_decisions` in core/curation.py). Cross-sample rules
(`exact_dup`, `near_dup`, `sem_dup`, `decontam`) are decided by datagen/dedup.py,
datagen/semdedup.py and datagen/decontam.py. docs/curation.md says where each default comes from.

A mixture may also name a threshold rule the curation run did not decide, `<score>_below_<x>` or
`<score>_above_<x>` (`clip_below_0.28`): `mixture/curation.py` evaluates it on the recorded scores,
so trying another threshold needs no re-run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from blip3.core.errors import UserError


@dataclass(frozen=True)
class ThresholdRule:
    name: str
    score: str
    drop_when: str  # "below" | "above": the sample is dropped when its score is below/above the threshold
    default: float | None  # None: off unless a threshold is given
    why: str  # the source of the default, shown in docs/curation.md


THRESHOLD_RULES: dict[str, ThresholdRule] = {r.name: r for r in (
    ThresholdRule("min_side", "min_side", "below", 200, "DataComp basic filtering: smaller side >= 200 px"),
    ThresholdRule("aspect", "aspect", "above", 3.0, "DataComp basic filtering: aspect ratio <= 3"),
    ThresholdRule("max_pixels", "pixels", "above", None, "off by default (a memory guard for the caption models)"),
    ThresholdRule("max_image_bytes", "image_bytes", "above", None, "off by default"),
    ThresholdRule("blur", "blur", "below", 100.0,
                  "variance of the Laplacian < 100 (Pech-Pacheco et al. 2000; the usual OpenCV rule of thumb)"),
    ThresholdRule("caption_words", "caption_words", "below", 3, "DataComp basic filtering: more than two words"),
    ThresholdRule("caption_chars", "caption_chars", "below", 6, "DataComp basic filtering: more than five characters"),
    ThresholdRule("repetition", "repetition", "above", 0.5,
                  "Data-Juicer character_repetition_filter defaults (10-grams, max ratio 0.5)"),
    ThresholdRule("no_text", "text_boxes", "below", 1, "BLIP3-OCR-200M keeps text-rich images: at least one line"),
    ThresholdRule("clip", "clip", "below", 0.28, "LAION-5B's CLIP ViT-B/32 cosine threshold (DataComp's CLIP score)"),
)}

#: Decided across samples (not thresholds on one score).
CROSS_SAMPLE_RULES = ("exact_dup", "near_dup", "sem_dup", "decontam")
LANGUAGE_RULE = "language"
DEFAULT_LANGUAGES = ("en",)  # DataComp basic filtering keeps English captions
DEFAULT_NEAR_DUP_BITS = 4

_SCORE_RULE = re.compile(r"^(?P<score>[a-z_]+)_(?P<op>below|above)_(?P<x>-?[0-9]+(\.[0-9]+)?)$")


def parse_thresholds(items: list[str]) -> dict[str, float | None]:
    """`RULE=VALUE` (or `RULE=off`) options -> thresholds by rule name; unknown rules are errors."""
    out: dict[str, float | None] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in THRESHOLD_RULES:
            raise UserError(f"{item!r}: expected RULE=VALUE with RULE one of {', '.join(THRESHOLD_RULES)}",
                            field="--threshold")
        if value == "off":
            out[name] = None
            continue
        try:
            x = float(value)
        except ValueError:
            raise UserError(f"{item!r}: the threshold must be a number or 'off'", field="--threshold") from None
        if not math.isfinite(x):
            raise UserError(f"{item!r}: the threshold must be finite", field="--threshold")
        out[name] = x
    return out


def score_rule(name: str) -> tuple[str, str, float] | None:
    """(score, "below"|"above", threshold) of a `<score>_below_<x>` rule name, else None."""
    m = _SCORE_RULE.match(name)
    return None if m is None else (m["score"], m["op"], float(m["x"]))
