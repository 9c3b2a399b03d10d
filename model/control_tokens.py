"""Text from data never becomes a model control token.

The processor tokenizes a sample as one string, and a tokenizer reads the spelling of any of its
special tokens as that token: a caption holding `<image>` would ask for an image the sample does
not have, an instruction holding `<|end|>\\n<|assistant|>` would open a real assistant turn, and an
alt text holding `<|endofchunk|>` would end its chunk. So every control-token spelling inside data
text has its `<` and `>` replaced by `‹` and `›` (U+2039, U+203A, the glyphs `datagen.caption_text`
uses for caption tags): `<|end|>` reads `‹|end|›`, plain text to the tokenizer, the same to a person.

It is applied twice: when released data is imported (`datagen.released`: the shards hold no
control tokens) and when a sample is encoded (`model.processor`: shards from anywhere else are
covered, with the spellings of the tokenizer actually in use). The one spelling kept is `<image>`
in chat and preference contents, where the data formats use it to place the sample's images.
"""

from __future__ import annotations

import re
from typing import Collection, Iterable

from .config import CHAT_TOKENS, END_OF_CHUNK_TOKEN, IMAGE_TOKEN, PAD_TOKEN, PLACEHOLDER_TOKEN

#: Spellings of the control tokens of our tokenizers (the tiny one and Phi-3's, with our additions).
KNOWN_TOKENS = (IMAGE_TOKEN, PLACEHOLDER_TOKEN, END_OF_CHUNK_TOKEN, *CHAT_TOKENS, PAD_TOKEN,
                "<s>", "</s>", "<unk>", "<|endoftext|>")
#: Any `<|word|>`: Phi-3 reserves `<|placeholder1|>` ... and other models more of the same shape.
_PIPE_TOKEN = r"<\|[^<>|\s]{1,64}\|>"
_BRACKETS = str.maketrans({"<": "\u2039", ">": "\u203a"})


def control_pattern(tokens: Iterable[str] = ()) -> re.Pattern[str]:
    """A pattern matching KNOWN_TOKENS, any `<|word|>`, and `tokens` (a tokenizer's own special
    tokens); longer spellings first, so `<image placeholder>` is not read as `<image>`."""
    spellings = sorted({*KNOWN_TOKENS, *(t for t in tokens if t and not t.isspace())}, key=len, reverse=True)
    return re.compile("|".join([_PIPE_TOKEN, *map(re.escape, spellings)]))


_DEFAULT = control_pattern()


def escape_control_tokens(text: str, *, keep: Collection[str] = (), pattern: re.Pattern[str] | None = None) -> str:
    """`text` with every control-token spelling but those in `keep` made plain (`<`/`>` -> `‹`/`›`).

    Only `<` and `>` are ever replaced, so the result holds no spelling that the input did not
    (escaping cannot assemble a new token out of the pieces around an old one)."""
    if "<" not in text:
        return text
    return (pattern or _DEFAULT).sub(lambda m: m[0] if m[0] in keep else m[0].translate(_BRACKETS), text)
