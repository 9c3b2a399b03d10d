"""Token counts of samples, as the trainer will pay for them.

Text is counted with the configured tokenizer: `--tokenizer DIR` (a Hugging Face tokenizer folder,
e.g. the one saved beside a model by `save_pretrained`) or `$BLIP3_TOKENIZER`. Without one, text is
*estimated* as ceil(UTF-8 bytes / 4), the usual bytes-per-token of English BPE; the label
`estimate:utf8-bytes/4` goes into the catalog and the manifest so nobody mistakes it for a count.

Images count as the vision tokens they will cost: `vision_tokens_per_crop` (the model's Perceiver
Resampler latents, `num_latents` in its config: 128 for the released phi3-mini, 16 for the tiny
model) times `crops_per_image` (1 at pretraining's base resolution; any-res SFT uses the base image
plus its crops, so set it to the mean crops per image there). Without a model at hand (`blip3
source add`, `mix build` of a spec that does not declare it) the released model's value is used.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from blip3.core.errors import UserError
from blip3.core.records import record_kind
from blip3.model.config import get_config

ESTIMATE_LABEL = "estimate:utf8-bytes/4"
#: Vision tokens per crop when no model says otherwise: the released xGen-MM (phi3-mini) config's.
DEFAULT_VISION_TOKENS_PER_CROP = get_config("phi3-mini").num_latents
TOKENIZER_ENV = "BLIP3_TOKENIZER"
_IMAGE_TAG = re.compile(r"<image>")


class TokenCounter:
    """Counts text tokens (tokenizer or estimate) plus vision tokens per image."""

    def __init__(self, tokenizer: str | Path | None = None, *,
                 vision_tokens_per_crop: int = DEFAULT_VISION_TOKENS_PER_CROP, crops_per_image: int = 1):
        tokenizer = tokenizer or os.environ.get(TOKENIZER_ENV) or None
        self.vision_tokens_per_image = vision_tokens_per_crop * crops_per_image
        self._tok = None
        if tokenizer is None:
            self.label = ESTIMATE_LABEL
        else:
            path = Path(tokenizer)
            if not path.is_dir():
                raise UserError(f"tokenizer folder not found (set --tokenizer or ${TOKENIZER_ENV})", file=path)
            from transformers import AutoTokenizer

            try:
                self._tok = AutoTokenizer.from_pretrained(str(path))
            except (OSError, ValueError) as e:
                raise UserError(f"cannot load tokenizer: {' '.join(str(e).split())[:200]}", file=path) from None
            self.label = f"hf:{path.resolve().name}"

    @property
    def exact(self) -> bool:
        return self._tok is not None

    def text(self, s: str | None) -> int:
        if not s:
            return 0
        s = _IMAGE_TAG.sub("", s)  # image slots are paid for as vision tokens
        if self._tok is None:
            return -(-len(s.encode("utf-8")) // 4)
        return len(self._tok(s, add_special_tokens=False)["input_ids"])

    def sample(self, kind: str, record: dict[str, Any], txt: str | None, n_images: int) -> int:
        """Tokens of one sample of `kind` (json `record`, caption `txt`, `n_images` image members)."""
        text = sum(self.text(t) for t in record_kind(kind).texts(record, txt))
        return text + n_images * self.vision_tokens_per_image
