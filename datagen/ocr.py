"""BLIP3-OCR caption generation: the OCR annotator and `run_ocr`, the Python face of `blip3 ocr`.

    from blip3.datagen.ocr import run_ocr
    from blip3.datagen.pipeline import JobOptions
    result = run_ocr("images/", "shards/ocr", JobOptions(workers=2), engine="rapidocr", min_confidence=0.5)

Each sample's `<key>.json` carries `captions` (the 12 variants of `datagen.ocr_captions`) and
`metadata = {"entries": [...]}` (`datagen.ocr_entries`); `<key>.txt` is the variant at
`default_granularity`, led by the source caption when the input has one. The caption policy for
images without text is in `datagen.ocr_captions` (kept, "The image contains no text.").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from blip3.core.errors import UserError
from blip3.datagen.annotator import Annotation, AnnotatorConfig, SkipSample
from blip3.datagen.inputs import InputSample
from blip3.datagen.ocr_captions import GRANULARITIES, CaptionStyle, build_captions
from blip3.datagen.ocr_engines import DEFAULT_ENGINE, ENGINES, OcrEngine, check_cuda_provider, make_engine
from blip3.datagen.ocr_entries import build_entries
from blip3.datagen.pipeline import JobOptions, JobResult, run_job

DEFAULT_GRANULARITY = 4
DEFAULT_MIN_CONFIDENCE = 0.5


@dataclass(frozen=True)
class OcrConfig(AnnotatorConfig):
    """Every setting of the OCR engine, checked on creation; the pipeline's factory (`config()`
    returns an unloaded `OcrAnnotator`)."""

    engine: str = DEFAULT_ENGINE
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    default_granularity: int = DEFAULT_GRANULARITY
    style: CaptionStyle = field(default_factory=CaptionStyle)
    keep_empty: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "engine_options", dict(self.engine_options))  # not the caller's dict
        if self.engine not in ENGINES:
            raise UserError(f"unknown OCR engine {self.engine!r}; one of {', '.join(ENGINES)}", field="--engine")
        if self.default_granularity not in GRANULARITIES:
            raise UserError(f"must be one of {GRANULARITIES}", field="--default-granularity")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise UserError("must be within [0, 1]", field="--min-confidence")

    def __call__(self) -> "OcrAnnotator":
        return OcrAnnotator(self)


class OcrAnnotator:
    """The `Annotator` of the OCR engine (see datagen/annotator.py)."""

    name = "ocr"

    def __init__(self, config: OcrConfig):
        self.config = config
        self._engine: OcrEngine | None = None

    def load(self) -> None:
        c = self.config
        self._engine = make_engine(c.engine, **c.engine_options)
        self._engine.load()

    def generator_info(self) -> dict[str, Any]:
        c = self.config
        return {**make_engine(c.engine, **c.engine_options).info(), "min_confidence": c.min_confidence,
                "default_granularity": c.default_granularity, "lead_in": c.style.lead_in,
                "filler": c.style.filler, "keep_empty": c.keep_empty}

    def annotate(self, image: Image.Image, sample: InputSample) -> Annotation:
        if self._engine is None:
            raise RuntimeError("call load() first")
        c = self.config
        entries = build_entries(self._engine.recognize(image), image.width, image.height, c.min_confidence)
        if not entries and not c.keep_empty:
            raise SkipSample("no_text", f"no OCR entry at confidence >= {c.min_confidence}")
        captions = build_captions(entries, sample.source_caption, c.style)
        lead = bool(sample.source_caption)
        default = next(v["text"] for v in captions
                       if v["granularity"] == c.default_granularity and v["include_datacomp_raw_cap"] == lead)
        mean = round(sum(e["confidence"] for e in entries) / len(entries), 4) if entries else None
        return Annotation(default, captions, {"entries": entries}, n_ocr=len(entries), mean_confidence=mean)


def run_ocr(
    input: str | Path,
    output: str | Path,
    job: JobOptions = JobOptions(),
    *,
    engine: str = DEFAULT_ENGINE,
    engine_options: dict[str, Any] | None = None,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    default_granularity: int = DEFAULT_GRANULARITY,
    style: CaptionStyle = CaptionStyle(),
    keep_empty: bool = True,
) -> JobResult:
    """OCR `input` into BLIP3-OCR caption shards in `output` (resumable; see datagen.pipeline).

    `job` says how the job runs and writes (datagen.pipeline.JobOptions).
    `job.gpus_per_worker > 0` reserves GPUs for the actors and asks the engine to use them (rapidocr:
    ONNX Runtime's CUDA provider, which needs `onnxruntime-gpu` installed in place of `onnxruntime`;
    asked for and absent, it is one UserError before anything starts; paddleocr: `device="gpu"`).
    """
    options = dict(engine_options or {})
    if job.gpus_per_worker > 0 and engine.startswith("rapidocr"):
        options.setdefault("use_cuda", True)
    elif job.gpus_per_worker > 0:
        options.setdefault("device", "gpu")
    config = OcrConfig(engine, options, min_confidence=min_confidence, default_granularity=default_granularity,
                       style=style, keep_empty=keep_empty)
    # fail before Ray starts, in one line
    if engine == "paddleocr":
        make_engine(engine, **config.engine_options).check()
    elif options.get("use_cuda"):
        check_cuda_provider()
    return run_job(input, output, config, job)
