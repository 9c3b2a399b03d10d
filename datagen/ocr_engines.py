"""OCR engines behind one small interface: `load()`, `recognize(image) -> [RawText]`, `info()`.

- `rapidocr`     (default) the maintained `rapidocr` 3.x package with the PP-OCRv6 small det/rec
                 models shipped inside its wheel: real OCR with nothing to download. Chosen by
                 measurement (docs/ocr.md): on multi-word signs it keeps the spaces between words
                 that PP-OCRv4 drops (`MAINSTREETSTATION`), at a similar cost per image once the
                 detector is sized as below.
- `rapidocr-v4`  the older `rapidocr_onnxruntime` 1.4.4 (PP-OCRv4 models in its wheel), kept for
                 side-by-side measurement only. It is not a dependency: it requires `opencv-python`,
                 which would overwrite the `opencv-python-headless` everything else uses, so install
                 it with `pip install --no-deps rapidocr_onnxruntime==1.4.4` where wanted.
- `paddleocr`    PaddleOCR 3.x (optional extra `blip3-engine[paddle]`) from local model folders:
                 `det_dir`/`rec_dir` or `BLIP3_PADDLEOCR_DET_DIR`/`BLIP3_PADDLEOCR_REC_DIR` (model
                 names optional: `BLIP3_PADDLEOCR_DET_NAME`/`BLIP3_PADDLEOCR_REC_NAME`). PaddleOCR
                 would otherwise download its models at first use, which cannot work offline, so the
                 folders are required and checked before anything loads.

The rapidocr engines run one ONNX Runtime (and OpenCV) thread per engine by default, so N Ray
actors use N cores without oversubscription and results do not depend on the thread count. All
return pixel polygons of the upright image; filtering, boxes, line merging and reading order are
done once, engine-independently, in `datagen.ocr_entries`.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from blip3.core.errors import UserError
from blip3.datagen.ocr_entries import RawText

DEFAULT_ENGINE = "rapidocr"
PADDLE_ENV = {"det_dir": "BLIP3_PADDLEOCR_DET_DIR", "rec_dir": "BLIP3_PADDLEOCR_REC_DIR",
              "det_name": "BLIP3_PADDLEOCR_DET_NAME", "rec_name": "BLIP3_PADDLEOCR_REC_NAME"}
CUDA_PROVIDER = "CUDAExecutionProvider"


class OcrEngine(Protocol):
    name: str

    def load(self) -> None: ...

    def recognize(self, image: Image.Image) -> list[RawText]: ...

    def info(self) -> dict[str, Any]: ...


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_cuda_provider() -> None:
    """One clear UserError when the CUDA execution provider was asked for and is not available.

    Without this check ONNX Runtime silently falls back to the CPU (or logs a warning wall per
    session), and a GPU job would run at CPU speed while holding GPUs.
    """
    import onnxruntime

    if CUDA_PROVIDER not in onnxruntime.get_available_providers():
        raise UserError(f"GPU OCR asked for but ONNX Runtime has no {CUDA_PROVIDER} (have: "
                        f"{', '.join(onnxruntime.get_available_providers())}); install onnxruntime-gpu "
                        "in place of onnxruntime, or run on CPU (--gpus-per-worker 0)", field="--gpus-per-worker")


@dataclass
class RapidOcrEngine:
    """rapidocr 3.x with the PP-OCRv6 small det/rec models of its wheel (+ the PP-OCRv4 angle classifier)."""

    threads: int = 1
    use_cuda: bool = False
    #: Detector input size: the longer side is scaled down to at most this (never up). 640 reads as
    #: well as 960 or 1280 on 384-1024 px pictures, 12 px text on a 1024 px page included, at up to
    #: half the detector cost (docs/ocr.md). The wheel's default instead scales the *shorter* side
    #: up to 736, which on a 600x120 sign means a 3700x736 detector pass: many times slower and
    #: worse (it splits lines into overlapping boxes: `fruit` + `t and`).
    det_limit_side_len: int = 640
    det_limit_type: str = "max"
    #: Text lines recognised per ONNX Runtime call (lines of one picture, sorted by width).
    rec_batch: int = 6
    #: The 0/180 degree line classifier: needed for upside-down text, ~10% of the time per image.
    use_cls: bool = True
    name: str = "rapidocr"
    _ocr: Any = field(default=None, repr=False)

    def load(self) -> None:
        import cv2
        from rapidocr import RapidOCR

        if self.use_cuda:
            check_cuda_provider()
        cv2.setNumThreads(self.threads)  # OpenCV (pre/post-processing) would otherwise use every core
        ort = "EngineConfig.onnxruntime."
        self._ocr = RapidOCR(params={
            "Global.log_level": "error", "Global.use_cls": self.use_cls,
            # Keep every detection: the confidence filter is ours (ocr_entries), not the engine's.
            "Global.text_score": 0.0,
            f"{ort}intra_op_num_threads": self.threads, f"{ort}inter_op_num_threads": 1, f"{ort}use_cuda": self.use_cuda,
            "Det.limit_side_len": self.det_limit_side_len, "Det.limit_type": self.det_limit_type,
            "Rec.rec_batch_num": self.rec_batch, "Cls.cls_batch_num": self.rec_batch,
        })

    def recognize(self, image: Image.Image) -> list[RawText]:
        if self._ocr is None:
            raise RuntimeError("call load() first")
        out = self._ocr(image)
        if out.boxes is None or out.txts is None:
            return []
        return [RawText([[float(x), float(y)] for x, y in poly], str(text), float(score))
                for poly, text, score in zip(out.boxes, out.txts, out.scores)]

    def info(self) -> dict[str, Any]:
        return {"engine": self.name, "engine_version": _version("rapidocr"),
                "models": "PP-OCRv6 small det + rec (in the wheel)",
                "det_limit": f"{self.det_limit_type} {self.det_limit_side_len}"}


@dataclass
class RapidOcrV4Engine:
    """rapidocr_onnxruntime 1.4.4 with its embedded PP-OCRv4 models (measurement only, see above)."""

    threads: int = 1
    use_cuda: bool = False
    det_limit_side_len: int = 960
    det_limit_type: str = "max"
    name: str = "rapidocr-v4"
    _ocr: Any = field(default=None, repr=False)

    def load(self) -> None:
        import cv2

        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as e:
            raise UserError("rapidocr-v4 needs rapidocr_onnxruntime: pip install --no-deps rapidocr_onnxruntime==1.4.4 "
                            "(--no-deps keeps one OpenCV), or use --engine rapidocr", field="--engine") from e
        if self.use_cuda:
            check_cuda_provider()
        cv2.setNumThreads(self.threads)
        opts: dict[str, Any] = {"intra_op_num_threads": self.threads, "inter_op_num_threads": 1, "text_score": 0.0,
                                "det_limit_side_len": self.det_limit_side_len, "det_limit_type": self.det_limit_type}
        if self.use_cuda:
            opts.update(det_use_cuda=True, cls_use_cuda=True, rec_use_cuda=True)
        self._ocr = RapidOCR(**opts)

    def recognize(self, image: Image.Image) -> list[RawText]:
        if self._ocr is None:
            raise RuntimeError("call load() first")
        result, _ = self._ocr(image)
        return [RawText([[float(x), float(y)] for x, y in poly], str(text), float(score))
                for poly, text, score in (result or [])]

    def info(self) -> dict[str, Any]:
        return {"engine": self.name, "engine_version": _version("rapidocr_onnxruntime"),
                "models": "PP-OCRv4 det + rec (embedded)",
                "det_limit": f"{self.det_limit_type} {self.det_limit_side_len}"}


@dataclass
class PaddleOcrEngine:
    """PaddleOCR 3.x from local model folders (no download)."""

    det_dir: str | None = None
    rec_dir: str | None = None
    det_name: str | None = None
    rec_name: str | None = None
    device: str = "cpu"
    name: str = "paddleocr"
    _ocr: Any = field(default=None, repr=False)

    def resolved(self) -> dict[str, str | None]:
        """Flags first, then env vars."""
        return {k: getattr(self, k) or os.environ.get(env) for k, env in PADDLE_ENV.items()}

    def check(self) -> dict[str, str | None]:
        """Raise one clear UserError when the package or the model folders are missing."""
        cfg = self.resolved()
        for k in ("det_dir", "rec_dir"):
            if not cfg[k]:
                raise UserError(f"paddleocr needs local model folders: pass --paddle-{k.replace('_', '-')} "
                                f"or set {PADDLE_ENV[k]}", field=f"--paddle-{k.replace('_', '-')}")
            if not Path(cfg[k]).is_dir():
                raise UserError(f"model folder not found (set {PADDLE_ENV[k]} or --paddle-{k.replace('_', '-')})",
                                field=PADDLE_ENV[k], file=cfg[k])
        try:
            import paddleocr  # noqa: F401
        except ImportError as e:
            raise UserError("paddleocr is not installed: pip install 'blip3-engine[paddle]' "
                            "(paddleocr>=3 and paddlepaddle), or use --engine rapidocr", field="--engine") from e
        return cfg

    def load(self) -> None:
        cfg = self.check()
        from paddleocr import PaddleOCR

        kwargs: dict[str, Any] = dict(
            text_detection_model_dir=cfg["det_dir"], text_recognition_model_dir=cfg["rec_dir"],
            use_doc_orientation_classify=False, use_doc_unwarping=False, use_textline_orientation=False,
            device=self.device,
        )
        if cfg["det_name"]:
            kwargs["text_detection_model_name"] = cfg["det_name"]
        if cfg["rec_name"]:
            kwargs["text_recognition_model_name"] = cfg["rec_name"]
        self._ocr = PaddleOCR(**kwargs)

    def recognize(self, image: Image.Image) -> list[RawText]:
        import numpy as np

        if self._ocr is None:
            raise RuntimeError("call load() first")
        bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
        out = []
        for res in self._ocr.predict(bgr):
            data = res.json.get("res", res.json) if hasattr(res, "json") else res
            for poly, text, score in zip(data["rec_polys"], data["rec_texts"], data["rec_scores"]):
                out.append(RawText([[float(x), float(y)] for x, y in poly], str(text), float(score)))
        return out

    def info(self) -> dict[str, Any]:
        cfg = self.resolved()
        return {"engine": self.name, "engine_version": _version("paddleocr"),
                "models": {"det": cfg["det_name"] or cfg["det_dir"], "rec": cfg["rec_name"] or cfg["rec_dir"]}}


#: The OCR engines, by the name `--engine` takes: the one table a new engine is added to.
ENGINES: dict[str, type] = {"rapidocr": RapidOcrEngine, "rapidocr-v4": RapidOcrV4Engine, "paddleocr": PaddleOcrEngine}


def make_engine(name: str, **options: Any) -> OcrEngine:
    """Build an (unloaded) engine by name; options are the engine's dataclass fields."""
    if name not in ENGINES:
        raise UserError(f"unknown OCR engine {name!r}; one of {', '.join(ENGINES)}", field="--engine")
    return ENGINES[name](**options)
