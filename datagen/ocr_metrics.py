"""OCR quality figures: character error rate, its space-insensitive twin, word recall/precision.

CER alone hides the failure that hurts captions most: `MAIN STREET STATION` read as
`MAINSTREETSTATION` costs only 2 edits in 19 characters (CER 0.11) yet gets none of the three
words right. So every measurement reports three views of the same strings:

- `cer`          edit distance / reference length (spaces count as characters);
- `cer_nospace`  the same with all whitespace removed: what the recogniser read, spacing aside;
- `word_recall`  reference words found in the output (multiset match, case-sensitive, punctuation
                 kept), and `word_precision`, output words found in the reference.

A gap between `cer_nospace` and `cer`, or a low word recall with a low CER, means glued or split
words. Scores are summed over strings (`OcrScore.add`), so long strings weigh more, as in a
corpus-level CER.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (insert, delete, substitute: cost 1) between two sequences."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


def _squash(text: str) -> str:
    return "".join(text.split())


@dataclass
class OcrScore:
    """Running totals over (reference, output) pairs; the rates are ratios of the totals."""

    pairs: int = 0
    char_errors: int = 0
    chars: int = 0
    nospace_errors: int = 0
    nospace_chars: int = 0
    ref_words: int = 0
    hyp_words: int = 0
    matched_words: int = 0

    def add(self, ref: str, hyp: str) -> "OcrScore":
        """Count one pair; whitespace runs are normalised to one space first."""
        ref, hyp = " ".join(ref.split()), " ".join(hyp.split())
        self.pairs += 1
        self.char_errors += edit_distance(ref, hyp)
        self.chars += len(ref)
        self.nospace_errors += edit_distance(_squash(ref), _squash(hyp))
        self.nospace_chars += len(_squash(ref))
        ref_w, hyp_w = Counter(ref.split()), Counter(hyp.split())
        self.ref_words += sum(ref_w.values())
        self.hyp_words += sum(hyp_w.values())
        self.matched_words += sum((ref_w & hyp_w).values())
        return self

    @property
    def cer(self) -> float:
        return self.char_errors / self.chars if self.chars else 0.0

    @property
    def cer_nospace(self) -> float:
        return self.nospace_errors / self.nospace_chars if self.nospace_chars else 0.0

    @property
    def word_recall(self) -> float:
        return self.matched_words / self.ref_words if self.ref_words else 1.0

    @property
    def word_precision(self) -> float:
        return self.matched_words / self.hyp_words if self.hyp_words else 1.0

    def summary(self) -> dict[str, float | int]:
        """The four rates (4 decimals) and the pair count, for reports and benchmark JSON."""
        return {"pairs": self.pairs, "cer": round(self.cer, 4), "cer_nospace": round(self.cer_nospace, 4),
                "word_recall": round(self.word_recall, 4), "word_precision": round(self.word_precision, 4)}


def score(pairs: Sequence[tuple[str, str]]) -> OcrScore:
    """An `OcrScore` over many (reference, output) pairs."""
    total = OcrScore()
    for ref, hyp in pairs:
        total.add(ref, hyp)
    return total
