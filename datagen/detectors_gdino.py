"""Grounding DINO backends: transformers (default) and groundingdino-py (optional extra).

Weights are never downloaded. `resolve_grounding_dino` looks, in order, at the `--model` path,
the `BLIP3_GROUNDING_DINO` env var, then the Hugging Face cache for
`IDEA-Research/grounding-dino-tiny` (local files only); nothing found -> one MissingWeightsError
that names all three. It runs in the driver, so a missing model fails before any Ray work.

Prompting: the tags become one prompt `tag one. tag two.` (split into several prompts when they
exceed the text encoder's 256 tokens). Rather than decoding whichever tokens pass the text
threshold (which can merge neighbouring tags into one label), each query is given the tag whose
tokens score highest; it is kept when its best token score passes `box_threshold` and that tag's
score passes `text_threshold`. Labels are therefore always exactly the tags.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from blip3.core.errors import MissingWeightsError, UserError
from blip3.datagen.detectors import DetectionLimits
from blip3.datagen.grounding_captions import GroundedObject, normalize_box

ENV_VAR = "BLIP3_GROUNDING_DINO"
HF_REPO = "IDEA-Research/grounding-dino-tiny"
MAX_PROMPT_TOKENS = 250  # the model's max_text_len is 256, minus [CLS]/[SEP] and slack


def _hf_cached_snapshot(repo: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError) or hub offline errors: treat as absent
        return None


def resolve_grounding_dino(model: str | Path | None) -> Path:
    """The local directory holding the transformers Grounding DINO (see module doc)."""
    if model:
        p = Path(model).expanduser()
        if not (p / "config.json").is_file():
            raise MissingWeightsError(
                f"no Grounding DINO model at {p} (expected config.json + weights in the "
                f"{HF_REPO} layout)", field="--model")
        return p
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not (p / "config.json").is_file():
            raise MissingWeightsError(f"${ENV_VAR}={env} holds no Grounding DINO model (config.json missing)")
        return p
    cached = _hf_cached_snapshot(HF_REPO)
    if cached is not None and (cached / "config.json").is_file():
        return cached
    raise MissingWeightsError(
        f"Grounding DINO weights not found: pass --model DIR, set ${ENV_VAR}=DIR, or put {HF_REPO} in "
        "the Hugging Face cache (nothing is downloaded)")


def _chunk_tags(tags: Sequence[str], n_tokens: Any) -> list[list[str]]:
    chunks: list[list[str]] = [[]]
    used = 0
    for tag in tags:
        cost = n_tokens(tag) + 1  # the tag and its "."
        if chunks[-1] and used + cost > MAX_PROMPT_TOKENS:
            chunks.append([])
            used = 0
        chunks[-1].append(tag)
        used += cost
    return [c for c in chunks if c]


def _corners(cx: float, cy: float, w: float, h: float) -> tuple[float, float, float, float]:
    """A normalized (cx, cy, w, h) box, as both backends predict it, to clamped [0, 1] corners."""
    return normalize_box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, 1.0, 1.0)


class HFGroundingDino:
    """Grounding DINO through `AutoModelForZeroShotObjectDetection` (any local directory in the
    `IDEA-Research/grounding-dino-tiny` layout, including tiny random ones)."""

    def __init__(self, model_dir: str | Path, device: str | None = None):
        self.model_dir = Path(model_dir)
        self.device = device
        self.model: Any = None
        self.processor: Any = None
        self._tag_tokens: dict[str, list[list[int]]] = {}  # prompt -> token positions of each tag
        self._chunks: dict[tuple[str, ...], list[list[str]]] = {}  # tags -> prompt chunks

    def load(self) -> None:
        import torch
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.processor = AutoProcessor.from_pretrained(self.model_dir, local_files_only=True)
            self.model = AutoModelForZeroShotObjectDetection.from_pretrained(self.model_dir, local_files_only=True)
        except OSError as e:
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise MissingWeightsError(f"cannot load Grounding DINO from {self.model_dir}: {first_line}") from None
        self.model.to(self.device).eval()

    def detect(self, image: Image.Image, tags: Sequence[str], limits: DetectionLimits) -> list[GroundedObject]:
        """Raw detections (before NMS/area/cap), boxes normalized to [0, 1]."""
        import torch

        if not tags:
            return []
        out: list[GroundedObject] = []
        # What `processor(images=, text=)` does, split so the image is preprocessed once for all chunks.
        pixels = self.processor.image_processor(image, return_tensors="pt").to(self.device)
        for chunk in self._chunk_cached(tags):
            text = ". ".join(chunk) + "."
            tag_tokens = self._tag_tokens.get(text) or self._locate_tags(chunk, text)
            tokens = self.processor.tokenizer(text, return_token_type_ids=True, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                outputs = self.model(**pixels, **tokens)
            probs = outputs.logits[0].sigmoid().float().cpu()  # (queries, max_text_len)
            boxes = outputs.pred_boxes[0].float().cpu()  # (queries, 4) cx, cy, w, h normalized
            box_scores = probs.max(dim=-1).values
            per_tag = torch.stack(
                [probs[:, idx].max(dim=-1).values if idx else torch.zeros(len(probs)) for idx in tag_tokens], dim=1
            )  # (queries, n_tags)
            tag_scores, best = per_tag.max(dim=-1)
            keep = (box_scores > limits.box_threshold) & (tag_scores > limits.text_threshold)
            for q in keep.nonzero().flatten().tolist():
                out.append(GroundedObject(chunk[int(best[q])], _corners(*boxes[q].tolist()), float(box_scores[q])))
        return out

    def _chunk_cached(self, tags: Sequence[str]) -> list[list[str]]:
        """The prompt chunks of a tag list (cached like `_locate_tags`: tag lists repeat per image)."""
        key = tuple(tags)
        chunks = self._chunks.get(key)
        if chunks is None:
            tok = self.processor.tokenizer
            chunks = _chunk_tags(tags, lambda t: len(tok.tokenize(t)))
            if len(self._chunks) < 1024:
                self._chunks[key] = chunks
        return chunks

    def _locate_tags(self, chunk: Sequence[str], text: str) -> list[list[int]]:
        """Token positions of each tag in the prompt (cached: vocabulary prompts repeat per image)."""
        spans, pos = [], 0
        for tag in chunk:
            spans.append((pos, pos + len(tag)))
            pos += len(tag) + 2
        offsets = self.processor.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        found = [[i for i, (s, e) in enumerate(offsets) if e > s and s >= a and e <= b] for a, b in spans]
        if len(self._tag_tokens) < 1024:
            self._tag_tokens[text] = found
        return found


class GroundingDinoPy:
    """The original `groundingdino-py` package (optional extra): a local config .py + checkpoint."""

    def __init__(self, config_path: str | Path, checkpoint: str | Path, device: str | None = None):
        self.config_path = Path(config_path)
        self.checkpoint = Path(checkpoint)
        self.device = device
        self.model: Any = None

    @staticmethod
    def check_available() -> None:
        try:
            import groundingdino  # noqa: F401
        except ImportError:
            raise UserError(
                "the groundingdino-py backend is not installed: pip install 'blip3-engine[groundingdino]', "
                "or use --detector grounding-dino (transformers)", field="--detector") from None

    def load(self) -> None:
        import torch

        self.check_available()
        from groundingdino.util.inference import load_model

        for p, flag in ((self.config_path, "--gdino-config"), (self.checkpoint, "--model")):
            if not p.is_file():
                raise MissingWeightsError(f"groundingdino-py needs a local file: {p} not found", field=flag)
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(str(self.config_path), str(self.checkpoint), device=self.device)

    def detect(self, image: Image.Image, tags: Sequence[str], limits: DetectionLimits) -> list[GroundedObject]:
        import groundingdino.datasets.transforms as T
        from groundingdino.util.inference import predict

        if not tags:
            return []
        transform = T.Compose([T.RandomResize([800], max_size=1333), T.ToTensor(),
                               T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        tensor, _ = transform(image, None)
        boxes, logits, phrases = predict(self.model, tensor, ". ".join(tags) + ".", limits.box_threshold,
                                         limits.text_threshold, device=self.device)
        known = {t.lower(): t for t in tags}
        out = []
        for (cx, cy, w, h), score, phrase in zip(boxes.tolist(), logits.tolist(), phrases):
            label = known.get(phrase.strip().lower(), phrase.strip())
            if not label:
                continue
            out.append(GroundedObject(label, _corners(cx, cy, w, h), float(score)))
        return out
