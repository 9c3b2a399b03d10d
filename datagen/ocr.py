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

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from blip3.core.errors import UserError
from blip3.datagen.annotator import Annotation, SkipSample
from blip3.datagen.inputs import InputSample
from blip3.datagen.ocr_captions import GRANULARITIES, CaptionStyle, build_captions
from blip3.datagen.ocr_engines import DEFAULT_ENGINE, ENGINES, OcrEngine, check_cuda_provider, make_engine
from blip3.datagen.ocr_entries import build_entries
from blip3.datagen.pipeline import JobOptions, JobResult, run_job

DEFAULT_GRANULARITY = 4
DEFAULT_MIN_CONFIDENCE = 0.5


@dataclass
class OcrAnnotator:
    """The OCR annotator; also its own picklable factory (calling it returns a fresh copy)."""

    engine: str = DEFAULT_ENGINE
    engine_options: dict[str, Any] = field(default_factory=dict)
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    default_granularity: int = DEFAULT_GRANULARITY
    style: CaptionStyle = field(default_factory=CaptionStyle)
    keep_empty: bool = True
    name: str = "ocr"
    _engine: OcrEngine | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise UserError(f"unknown OCR engine {self.engine!r}; one of {', '.join(ENGINES)}", field="--engine")
        if self.default_granularity not in GRANULARITIES:
            raise UserError(f"must be one of {GRANULARITIES}", field="--default-granularity")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise UserError("must be within [0, 1]", field="--min-confidence")

    def __call__(self) -> "OcrAnnotator":
        return replace(self, engine_options=dict(self.engine_options), _engine=None)

    def load(self) -> None:
        self._engine = make_engine(self.engine, **self.engine_options)
        self._engine.load()

    def generator_info(self) -> dict[str, Any]:
        return {**make_engine(self.engine, **self.engine_options).info(), "min_confidence": self.min_confidence,
                "default_granularity": self.default_granularity, "lead_in": self.style.lead_in,
                "filler": self.style.filler, "keep_empty": self.keep_empty}

    def annotate(self, image: Image.Image, sample: InputSample) -> Annotation:
        if self._engine is None:
            raise RuntimeError("call load() first")
        entries = build_entries(self._engine.recognize(image), image.width, image.height, self.min_confidence)
        if not entries and not self.keep_empty:
            raise SkipSample("no_text", f"no OCR entry at confidence >= {self.min_confidence}")
        captions = build_captions(entries, sample.source_caption, self.style)
        lead = bool(sample.source_caption)
        default = next(c["text"] for c in captions
                       if c["granularity"] == self.default_granularity and c["include_datacomp_raw_cap"] == lead)
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
    annotator = OcrAnnotator(engine, options, min_confidence=min_confidence, default_granularity=default_granularity,
                             style=style, keep_empty=keep_empty)
    # fail before Ray starts, in one line
    if engine == "paddleocr":
        make_engine(engine, **annotator.engine_options).check()
    elif options.get("use_cuda"):
        check_cuda_provider()
    return run_job(input, output, annotator, job)
