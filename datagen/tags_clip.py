"""Zero-shot image tagging with open_clip against a vocabulary (`--tags clip`).

Needs CLIP weights on local disk, in open_clip's own folder layout: a directory with
`open_clip_config.json` (`{"model_cfg": ..., "preprocess_cfg": ...}`) and
`open_clip_model.safetensors` (or `open_clip_pytorch_model.bin`), i.e. what the `hf-hub:` CLIP
repos hold. It is looked up at `--clip-model DIR`, then `$BLIP3_CLIP_MODEL`; nothing is downloaded.

Tagging: the vocabulary is encoded once (`a photo of a {tag}.`); per image, tags are ranked by
cosine similarity and the `top_k` best are kept when their softmax probability over the vocabulary
(with the model's logit scale) is at least `min_prob`. CLIP is not a multi-label classifier, so
this is a ranking, not calibrated presence: Grounding DINO's thresholds then decide what is boxed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from blip3.core.errors import MissingWeightsError

ENV_VAR = "BLIP3_CLIP_MODEL"
PROMPT = "a photo of a {}."
WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)


def resolve_clip_model(path: str | Path | None, needed_by: str = "--tags clip") -> Path:
    """The local open_clip directory (flag, then env var), or MissingWeightsError naming `needed_by`."""
    raw = str(path) if path else os.environ.get(ENV_VAR)
    if not raw:
        raise MissingWeightsError(
            f"{needed_by} needs local CLIP weights: pass --clip-model DIR or set ${ENV_VAR}=DIR "
            "(a folder with open_clip_config.json and open_clip_model.safetensors)")
    p = Path(raw).expanduser()
    where = "--clip-model" if path else f"${ENV_VAR}"
    if not (p / "open_clip_config.json").is_file():
        raise MissingWeightsError(f"{where}: no open_clip_config.json in {p}")
    if not any((p / f).is_file() for f in WEIGHT_FILES):
        raise MissingWeightsError(f"{where}: no CLIP weights in {p} (expected one of {', '.join(WEIGHT_FILES)})")
    return p


class ClipTagger:
    """Top-k vocabulary tags of an image by open_clip similarity."""

    def __init__(self, model_dir: str | Path, vocab: Sequence[str], top_k: int = 8, min_prob: float = 0.01,
                 device: str | None = None):
        self.model_dir = Path(model_dir)
        self.vocab = list(vocab)
        self.top_k = top_k
        self.min_prob = min_prob
        self.device = device
        self._model: Any = None
        self._preprocess: Any = None
        self._text: Any = None

    def load(self) -> None:
        import open_clip
        import torch

        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        name = f"local-dir:{self.model_dir}"
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=self.device)
        tokenizer = open_clip.get_tokenizer(name)
        model.eval()
        with torch.inference_mode():
            text = model.encode_text(tokenizer([PROMPT.format(t) for t in self.vocab]).to(self.device))
        self._text = text / text.norm(dim=-1, keepdim=True)
        self._model, self._preprocess = model, preprocess

    def tags(self, image: Image.Image) -> list[str]:
        import torch

        with torch.inference_mode():
            feats = self._model.encode_image(self._preprocess(image).unsqueeze(0).to(self.device))
            feats = feats / feats.norm(dim=-1, keepdim=True)
            sims = (feats @ self._text.T)[0]
            probs = (self._model.logit_scale.exp() * sims).softmax(dim=-1)
        order = sims.argsort(descending=True)[: self.top_k].tolist()
        return [self.vocab[i] for i in order if float(probs[i]) >= self.min_prob]
