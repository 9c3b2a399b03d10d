"""Where the grounding detector's prompts come from: caption noun phrases or a vocabulary file.

The paper tags images with Recognize Anything; its weights are not available here, so three
sources are offered: noun phrases of the image's own caption (`caption`, this module's chunker),
a fixed vocabulary file (`vocab`), or open_clip zero-shot tagging against a vocabulary
(`clip`, in `tags_clip.py`, needs local CLIP weights).

The chunker is deliberately light and dependency-free (no POS tagger, no model). Its limits:

- English only; words are `[A-Za-z][A-Za-z'-]*`; digits end a phrase.
- A phrase is a run of up to MAX_PHRASE_WORDS content words between closed-class words
  (determiners, pronouns, prepositions, conjunctions, auxiliaries), punctuation and verbs; when a
  run is longer, its last MAX_PHRASE_WORDS words (the head noun and its nearest modifiers) are kept.
- Verbs are recognised only from a short list of verbs common in captions, `-ing` forms (with a
  list of `-ing` nouns such as "building", "painting" kept), and a word directly followed by a
  determiner ("rides a horse"). Other verbs end up inside phrases ("a dog naps" -> "dog naps").
- Adjectives are kept as modifiers ("red car"); number words and quantifiers are dropped from the
  front ("two dogs" -> "dogs"); scene words that are not objects ("image", "background", "front",
  "side", "top", "view" ...) are removed, so "in front of" gives nothing.
- No lemmatisation: "dogs" stays "dogs" (caption insertion matches a plural `s`/`es` anyway).
- Conjunctions always split: "an old black and white photo of a train station" gives
  "old black", "white", "train station" (no attachment of coordinated modifiers).
- Phrases are lower-cased and deduplicated, in caption order.
"""

from __future__ import annotations

import re
from pathlib import Path

from blip3.core.errors import UserError

MAX_PHRASE_WORDS = 4

_DETERMINERS = set(
    "a an the this that these those his her its their our my your some any each every another "
    "no several many few both either neither such".split()
)
_NUMBERS = set(
    "one two three four five six seven eight nine ten eleven twelve dozen dozens hundreds "
    "multiple various numerous lots couple pair".split()
)
_CLOSED = _DETERMINERS | set(
    """i me you he him she it we us they them who whom whose which what where when while why how
    there here of in on at by for with without from to into onto over under above below near beside
    besides behind between among around next through across along against toward towards up down out off
    about after before during inside outside upon within like than as via per and or but nor so yet
    if then because although though not very too also just only all most more less other others
    again together away still almost nearly
    is are was were be been being am has have had having do does did will would can could should
    may might must shall its it's there's that's what's""".split()
)
_VERBS = set(
    """sits sit sat stands stand stood lies lie lying lay lays walks walk walked runs run ran rides
    ride rode holds hold held wears wear wore looks look looked plays play played eats eat ate
    drinks drink drank shows show showed showcases showcase features feature depicts depict
    contains contain displays display carries carry carried waits wait waited flies fly flew
    hangs hang hung rests rest rested leans lean leaned poses pose posed smiles smile smiled
    talks talk reads read watches watch uses use used covers cover covered filled parked made
    appears appear seems seem seen taken captured surrounded located placed set sits stacked
    swims swim jumps jump throws throw threw catches catch caught kicks kick hits hit grazes graze
    cuts cut prepares prepare cooks cook waves wave points point faces face""".split()
)
_ING_NOUNS = set(
    """building buildings painting paintings ceiling ceilings clothing king kings ring rings
    string strings wing wings thing things sibling siblings evening morning wedding pudding
    stuffing icing frosting railing railings awning awnings sign signing dumpling dumplings
    sterling lightning bedding topping toppings earring earrings sling swing swings spring
    springs parking living dining""".split()
)
_NON_OBJECTS = set(
    """image images picture pictures photo photos photograph photographs view views scene scenes
    background foreground front back side sides top bottom middle center centre left right
    closeup close-up shot shots kind type sort lot lots group groups number bunch set part
    piece pieces way day time times area areas shape shapes color colors colour colours style""".split()
)
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*|[0-9]+|[^\sA-Za-z0-9]")


def _is_verb(word: str) -> bool:
    if word in _VERBS:
        return True
    return len(word) > 4 and word.endswith("ing") and word not in _ING_NOUNS


def noun_phrases(caption: str | None) -> list[str]:
    """Noun phrases of `caption`, lower-cased, deduplicated, in order (limits: module doc)."""
    if not caption:
        return []
    tokens = [t.lower() for t in _WORD.findall(caption)]
    phrases: list[str] = []
    run: list[str] = []

    def flush() -> None:
        words = [w for w in run if w not in _NON_OBJECTS]
        while words and (words[0] in _NUMBERS or words[0] in _NON_OBJECTS):
            words.pop(0)
        words = words[-MAX_PHRASE_WORDS:]
        if words:
            phrase = " ".join(w.strip("'-") for w in words if w.strip("'-"))
            if phrase and phrase not in phrases:
                phrases.append(phrase)
        run.clear()

    for i, tok in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        is_word = tok[0].isalpha()
        if not is_word or tok in _CLOSED or _is_verb(tok) or (run and nxt in _DETERMINERS and tok.endswith("s")):
            flush()
            continue
        if tok.endswith("'s"):  # possessive ends the owner's phrase: "man's hat" -> man, hat
            run.append(tok[:-2])
            flush()
            continue
        run.append(tok)
    flush()
    return phrases


def load_vocab(path: str | Path) -> list[str]:
    """A vocabulary file: one tag per line (or comma separated); `#` comments and blanks skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError("vocabulary file not found", field="--vocab", file=p) from None
    except UnicodeDecodeError:
        raise UserError("vocabulary file is not UTF-8 text", field="--vocab", file=p) from None
    tags: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        for item in line.split(","):
            tag = " ".join(item.split()).lower()
            if tag and tag not in tags:
                if "." in tag:
                    raise UserError(f"tag {tag!r} contains '.', the prompt separator", field="--vocab", file=p)
                tags.append(tag)
    if not tags:
        raise UserError("vocabulary file has no tags", field="--vocab", file=p)
    return tags
