"""Quality signals of a recaptioned sample, computed from text alone (no model).

Each is a number per sample, stored in the record (`metadata.scores`) and, by `blip3 recaption`,
in the catalog's `sample_scores` table (views `v_recaption_quality`, `v_entity_survival`):

- `length_chars`, `length_words`: length of the final caption (`.txt`);
- `repetition_3gram`: the share of the caption's word 3-grams that repeat an earlier one (0 for a
  caption of fewer than 4 words); a degenerate loop ("a red car a red car a red car") nears 1;
- `empty`: 1 when the LLM's rewrite came back empty (an empty dense caption is a failed row,
  `empty_caption`, so it has no scores);
- `refusal`: 1 when the dense caption or the rewrite opens like a refusal (`REFUSAL_OPENINGS`);
- `alt_entities`, `entities_kept`, `entity_survival`: the alt-text's named entities (below), how
  many the final caption still names, and their ratio (absent when the alt-text names none);
- `merged`: 1 when the LLM's rewrite is the caption, 0 when the dense caption is (no alt-text,
  no LLM, or a rewrite that was empty or a refusal).

Named entities, by string matching (no NER model, so the rate is cheap and reproducible): the
maximal runs of capitalised words or words holding a digit (`Eiffel Tower`, `iPhone 15`, `2019`),
with a leading common word (`A`, `The`, `Photo`, ...) dropped; a year (1800-2099) is an entity of
its own (`Paris 2019` is `Paris` and `2019`). An entity survives when the final
caption contains it as whole words, ignoring case.
"""

from __future__ import annotations

import re
from typing import Any

REFUSAL_OPENINGS = (
    "i'm sorry", "i am sorry", "sorry,", "i cannot", "i can't", "i can not", "i'm unable", "i am unable",
    "i'm not able", "i am not able", "as an ai", "i won't", "i will not",
)
#: Words that open alt-texts and sentences without naming anything.
COMMON_WORDS = frozenset("""
a an the this that these those it its in on at of for with and or to from by my our your his her their
photo photograph picture image images stock illustration vector close closeup view free new best top
""".split())
_YEAR = re.compile(r"(1[89]|20)\d\d")
_WORD = re.compile(r"[\w'’&.-]+", re.UNICODE)


def words(text: str) -> list[str]:
    return [w.strip(".'’-") for w in _WORD.findall(text) if w.strip(".'’-")]


def repetition(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (see the module doc)."""
    toks = [w.lower() for w in words(text)]
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return round(1 - len(set(grams)) / len(grams), 4)


def _is_entity_word(w: str) -> bool:
    return w[:1].isupper() or any(c.isdigit() for c in w) or any(c.isupper() for c in w[1:])


def named_entities(text: str) -> list[str]:
    """The alt-text's named entities, in order, each once (see the module doc)."""
    found: list[str] = []
    for sentence in re.split(r"[.!?;:|,()\[\]\"“”]+", text):
        run: list[str] = []
        for w in [*words(sentence), ""]:
            year = _YEAR.fullmatch(w) is not None
            if w and _is_entity_word(w) and not year:
                run.append(w)
                continue
            for entity in (_trimmed(run), w if year else ""):
                if entity and entity.lower() not in (e.lower() for e in found):
                    found.append(entity)
            run = []
    return found


def _trimmed(run: list[str]) -> str:
    """A run of entity words without its leading common words (`The`, `Photo`, ...)."""
    while run and run[0].lower() in COMMON_WORDS:
        run = run[1:]
    return " ".join(run)


def mentions(text: str, entity: str) -> bool:
    """`entity` as whole words of `text`, ignoring case and the spacing between its words."""
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in entity.split()) + r"(?!\w)"
    return re.search(pattern, text, re.IGNORECASE) is not None


def is_refusal(text: str) -> bool:
    return text.strip().lower().startswith(REFUSAL_OPENINGS)


def caption_scores(final: str, alt_text: str | None, *, merged: bool, refusal: bool, empty: bool) -> dict[str, Any]:
    """Every signal of one sample, by name (see the module doc); the caller knows whether a model
    output was empty or a refusal (`is_refusal`)."""
    scores: dict[str, Any] = {
        "length_chars": len(final),
        "length_words": len(words(final)),
        "repetition_3gram": repetition(final),
        "empty": int(empty),
        "refusal": int(refusal),
        "merged": int(merged),
    }
    entities = named_entities(alt_text or "")
    if entities:
        kept = sum(mentions(final, e) for e in entities)
        scores.update(alt_entities=len(entities), entities_kept=kept, entity_survival=round(kept / len(entities), 4))
    return scores
