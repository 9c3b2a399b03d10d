"""The per-sample curation stages: plain callables over batches, for `ds.map_batches(...)`.

A batch is a mapping of column name -> sequence (Ray Data's "numpy" batches, or a dict of lists);
every stage returns the batch with its columns added. Each runs where the samples are read (a
Ray Data task), so images are decoded and scored next to the shard, never on the driver, and a
library user composes them on their own dataset:

    ds = ray.data.from_items(shards).map_batches(read_shard_samples, batch_size=1)
    ds = ds.map_batches(ImageStage()).map_batches(TextStage(languages=True))
    ds = ds.map_batches(ClipStage, fn_constructor_kwargs={"model_dir": d},
                        compute=ray.data.ActorPoolStrategy(size=1))

Score columns are named `score.<name>` (NaN when the stage could not compute it: an image that
does not decode has no blur); `datagen/curate_rules.py` turns them into keep/drop decisions.
"""

from __future__ import annotations

import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from blip3.core.errors import UserError
from blip3.core.shards import IMAGE_EXTS, iter_shard
from blip3.datagen.image_hash import bytes_sha256, open_image, phash, pixel_sha256

Batch = Mapping[str, Any]
#: Laplacian variance is measured with the longer side scaled to at most this, so its cost and its
#: scale (a blur threshold means the same on a 4000 px photo and a 500 px one) are bounded.
BLUR_SIDE = 512
REPETITION_N = 10  # Data-Juicer's character_repetition_filter rep_len


def with_columns(batch: Batch, **cols: Any) -> dict[str, np.ndarray]:
    """`batch` (as numpy columns) with `cols` added: what every stage returns."""
    out = {k: np.asarray(v) if not isinstance(v, np.ndarray) else v for k, v in batch.items()}
    for k, v in cols.items():
        out[k] = v if isinstance(v, np.ndarray) else np.asarray(v)
    return out


def _image_member(sample: dict[str, Any]) -> bytes | None:
    """The sample's image: the first of IMAGE_EXTS, else the first `img<N>.<ext>` (documents)."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    for name in sorted(k for k in sample if not k.startswith("__")):
        if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
            return sample[name]
    return None


def read_shard_samples(batch: Batch) -> dict[str, np.ndarray]:
    """Rows (`source`, `shard`) -> one row per sample of each shard: `source`, `shard`, `key`,
    `image` (the image member's bytes, b"" when there is none) and `caption` (the `.txt`).
    A tar that cannot be read is a UserError: a catalogued shard that no longer reads is the user's to fix."""
    cols: dict[str, list] = {"source": [], "shard": [], "key": [], "image": [], "caption": []}
    for source, shard in zip(batch["source"], batch["shard"]):
        try:
            for sample in iter_shard(Path(str(shard))):
                image = _image_member(sample)
                cols["source"].append(str(source))
                cols["shard"].append(str(shard))
                cols["key"].append(sample["__key__"])
                cols["image"].append(image or b"")
                cols["caption"].append(sample["txt"].decode("utf-8", "replace") if "txt" in sample else "")
        except (OSError, tarfile.TarError) as e:
            raise UserError(f"cannot read the catalogued tar ({' '.join(str(e).split())}); re-check it with "
                            "`blip3 catalog add --verify`", file=str(shard)) from None
    return {k: np.asarray(v, dtype=object) for k, v in cols.items()}


def laplacian_variance(grey: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian (OpenCV's `Laplacian(ksize=1)`): low = blurry."""
    g = grey.astype(np.float64)
    if g.shape[0] < 3 or g.shape[1] < 3:
        return float("nan")
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4 * g[1:-1, 1:-1]
    return float(lap.var())


class ImageStage:
    """Fingerprints (sha256 of bytes and of pixels, pHash) and image scores: `width`, `height`,
    `min_side`, `aspect` (longer / shorter side), `pixels`, `image_bytes`, `blur` (Laplacian
    variance at BLUR_SIDE). The image is decoded once for all of them."""

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        sha, pix = [None] * n, [None] * n
        ph = np.zeros(n, dtype=np.uint64)
        has_ph = np.zeros(n, dtype=bool)
        scores = {k: np.full(n, np.nan) for k in ("width", "height", "min_side", "aspect", "pixels", "image_bytes",
                                                   "blur")}
        error = [""] * n  # "" = decodes
        for i, data in enumerate(batch["image"]):
            data = bytes(data)
            if not data:
                error[i] = "no image member"
                continue
            sha[i] = bytes_sha256(data)
            scores["image_bytes"][i] = len(data)
            try:
                img = open_image(data)
            except Exception as e:  # noqa: BLE001 - any decoder failure is this sample's recorded reason
                error[i] = f"image does not decode ({type(e).__name__})"
                continue
            w, h = img.size
            scores["width"][i], scores["height"][i] = w, h
            scores["min_side"][i], scores["pixels"][i] = min(w, h), w * h
            scores["aspect"][i] = max(w, h) / max(min(w, h), 1)
            pix[i] = pixel_sha256(img)
            ph[i], has_ph[i] = phash(img), True
            grey = img.convert("L")
            if max(w, h) > BLUR_SIDE:
                grey.thumbnail((BLUR_SIDE, BLUR_SIDE))
            scores["blur"][i] = laplacian_variance(np.asarray(grey))
        return with_columns(batch, sha256=np.asarray(sha, dtype=object), pixel_sha256=np.asarray(pix, dtype=object),
                            phash=ph, has_phash=has_ph, image_error=np.asarray(error, dtype=object),
                            **{f"score.{k}": v for k, v in scores.items()})


def repetition_ratio(text: str, n: int = REPETITION_N) -> float:
    """Share of the caption's character n-grams that occur more than once (Data-Juicer's
    character repetition ratio): 0 for varied text, near 1 for `spam spam spam ...`."""
    grams = Counter(text[i:i + n] for i in range(max(0, len(text) - n + 1)))
    total = sum(grams.values())
    if not total:
        return 0.0
    return sum(c for c in grams.values() if c > 1) / total


_WORD = re.compile(r"\w+", re.UNICODE)


class TextStage:
    """Caption scores: `caption_chars`, `caption_words`, `repetition`, and with `languages` the
    language identified by py3langid (its model ships in the package): `lang_score` (the
    probability of the language found) and the column `lang` (its ISO 639-1 code)."""

    def __init__(self, languages: bool = True):
        self.languages = languages
        self._ident: Any = None

    def _identifier(self) -> Any:
        if self._ident is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            self._ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        return self._ident

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        captions = [str(c) for c in batch["caption"]]
        cols: dict[str, Any] = {
            "score.caption_chars": np.asarray([len(c) for c in captions], dtype=np.float64),
            "score.caption_words": np.asarray([len(_WORD.findall(c)) for c in captions], dtype=np.float64),
            "score.repetition": np.asarray([repetition_ratio(c) for c in captions], dtype=np.float64),
        }
        if self.languages:
            ident = self._identifier()
            found = [ident.classify(c) if c.strip() else ("", float("nan")) for c in captions]
            cols["lang"] = np.asarray([lang for lang, _ in found], dtype=object)
            cols["score.lang_score"] = np.asarray([float(p) for _, p in found], dtype=np.float64)
        return with_columns(batch, **cols)


class TextPresenceStage:
    """`text_boxes`: text lines the OCR engine's *detector* finds, without recognising them: the
    cheap pre-pass that picks text-rich images for OCR captioning (BLIP3-OCR-200M kept text-rich
    images). benchmarks/bench_curation.py measures it against the full OCR pass."""

    def __init__(self, threads: int = 1):
        from blip3.datagen.ocr_engines import RapidOcrEngine

        self.engine = RapidOcrEngine(threads=threads, use_cls=False)
        self.engine.load()

    def boxes(self, image: Any) -> int:
        out = self.engine._ocr(np.asarray(image.convert("RGB")), use_det=True, use_cls=False, use_rec=False)
        return 0 if out.boxes is None else len(out.boxes)

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        counts = np.full(len(batch["key"]), np.nan)
        for i, data in enumerate(batch["image"]):
            try:
                counts[i] = self.boxes(open_image(bytes(data)))
            except Exception:  # noqa: BLE001 - ImageStage records why an image does not decode
                continue
        return with_columns(batch, **{"score.text_boxes": counts})
