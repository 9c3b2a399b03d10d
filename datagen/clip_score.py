"""CLIP score per sample: open_clip image-text cosine similarity, DataComp's convention.

DataComp (and LAION before it) score a pair as the cosine similarity of the L2-normalised image
and caption embeddings, without the logit scale: a number in [-1, 1], about 0.2-0.4 for real
pairs, thresholded at 0.28 (LAION-5B, ViT-B/32) or ranked (DataComp's top-30% baseline). The
caption goes through the model's own tokenizer, truncated to its context (77 tokens).

Weights come from a local open_clip directory (`--clip-model DIR` or `$BLIP3_CLIP_MODEL`, the
layout `--tags clip` uses); nothing is downloaded, and missing weights are one line.

`ClipStage` is a Ray Data callable class (`ds.map_batches(ClipStage, fn_constructor_kwargs=...,
compute=ray.data.ActorPoolStrategy(size=N))`): the model loads once per actor. It adds `score.clip` and, with `embeddings`,
the image embedding (`embedding`, float32) that semantic dedup clusters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from blip3.datagen.curate_stages import with_columns
from blip3.datagen.image_hash import open_image


class ClipStage:
    def __init__(self, model_dir: str | Path, *, embeddings: bool = False, batch: int = 64, device: str | None = None):
        import open_clip
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        name = f"local-dir:{model_dir}"
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(name, device=self.device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.generator = f"open_clip {Path(model_dir).name}"
        self.embeddings = embeddings
        self.batch = batch

    def encode(self, images: list[Any], captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(cosine similarity per pair, normalised image embeddings) for decoded images."""
        import torch

        with torch.inference_mode():
            pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
            img = self.model.encode_image(pixels)
            txt = self.model.encode_text(self.tokenizer(captions).to(self.device))
            img = img / img.norm(dim=-1, keepdim=True)
            txt = txt / txt.norm(dim=-1, keepdim=True)
            return (img * txt).sum(dim=-1).float().cpu().numpy(), img.float().cpu().numpy()

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        scores = np.full(n, np.nan)
        emb: list[np.ndarray | None] = [None] * n
        ok, images = [], []
        for i, data in enumerate(batch["image"]):
            try:
                images.append(open_image(bytes(data)).convert("RGB"))
                ok.append(i)
            except Exception:  # noqa: BLE001 - ImageStage records why an image does not decode
                continue
        captions = [str(batch["caption"][i]) for i in ok]
        for start in range(0, len(ok), self.batch):
            sims, feats = self.encode(images[start:start + self.batch], captions[start:start + self.batch])
            for j, i in enumerate(ok[start:start + self.batch]):
                scores[i] = sims[j]
                emb[i] = feats[j]
        cols: dict[str, Any] = {"score.clip": scores}
        if self.embeddings:
            dim = next((e.shape[0] for e in emb if e is not None), 0)
            cols["embedding"] = np.stack([e if e is not None else np.full(dim, np.nan, np.float32) for e in emb]) \
                if n else np.zeros((0, dim), np.float32)
        return with_columns(batch, **cols)
