"""The prompts of `blip3 recaption`, exactly as docs/captions.md shows them.

Two prompts, both replaceable (`--prompt` / `--merge-prompt`, or the YAML settings file):

- the VLM prompt (`DEFAULT_VLM_PROMPT`), asked of every image for its dense caption;
- the merge prompt (`DEFAULT_MERGE_PROMPT`), given to the LLM with the dense caption and the
  image's alt-text, so the rewrite keeps the alt-text's real-world knowledge (names, places,
  products) and the dense caption's visual detail (the BLIP3-KALE recipe's first stage).

A merge prompt names its two slots `{dense_caption}` and `{alt_text}`; both must appear. They are
filled in ONE pass (`fill_merge_prompt`), so a caption that itself contains `{alt_text}` is left as
text and never expanded. Texts that come from the data (alt-text, a generated caption) are cleaned
first (`clean_slot`): the model's special-token strings are removed, so an alt-text holding
`<|endoftext|>` or `<image>` cannot end the prompt early or ask for an image, and each slot is cut
to `MAX_SLOT_CHARS`.
"""

from __future__ import annotations

import re
from typing import Iterable

from blip3.core.errors import UserError

DEFAULT_VLM_PROMPT = "Describe this image in detail."

DEFAULT_MERGE_PROMPT = (
    "Here are two descriptions of the same image.\n"
    "Dense caption: {dense_caption}\n"
    "Alt-text: {alt_text}\n"
    "Rewrite the dense caption as one paragraph that keeps all of its visual details and adds the "
    "real-world knowledge of the alt-text (names of people, places, products, events, dates). "
    "Use only facts stated in the two texts. Answer with the caption alone."
)

SLOTS = ("dense_caption", "alt_text")
_SLOT = re.compile(r"\{(dense_caption|alt_text)\}")
#: Characters kept of a slot's text: a web page's alt-text can be a whole paragraph of spam.
MAX_SLOT_CHARS = 2000


def check_merge_prompt(template: str, field: str = "--merge-prompt") -> str:
    """The template itself, when it has both slots; else one UserError naming the missing one."""
    found = set(_SLOT.findall(template))
    for slot in SLOTS:
        if slot not in found:
            raise UserError(f"the merge prompt must contain {{{slot}}}", field=field)
    return template


def clean_slot(text: str, special_tokens: Iterable[str] = ()) -> str:
    """`text` without the model's special-token strings, whitespace folded, cut to MAX_SLOT_CHARS."""
    for tok in sorted({t for t in special_tokens if t}, key=len, reverse=True):
        text = text.replace(tok, " ")
    return " ".join(text.split())[:MAX_SLOT_CHARS]


def fill_merge_prompt(template: str, dense_caption: str, alt_text: str) -> str:
    """The merge prompt with its two slots filled in one pass (see the module doc)."""
    values = {"dense_caption": dense_caption, "alt_text": alt_text}
    return _SLOT.sub(lambda m: values[m.group(1)], template)
