"""The BLIP3-GROUNDING annotator, and `ground()`, the Python API behind `blip3 ground`.

One image goes: tags (caption noun phrases | vocabulary | open_clip zero-shot) -> detector
(Grounding DINO | groundingdino-py | existing COCO/VG boxes) -> area floor, per-label NMS, cap ->
objects in reading order -> caption variants (grounding_captions.py). Reading, validation,
sharding and the catalog are the shared pipeline's (datagen/pipeline.py), as for OCR.

Stored per sample (docs/formats.md): `captions` = all variants `{"text", "format", "style"}`;
`metadata` = `{"objects": [{"label", "bbox", "score"}], "tags", "tag_source", "detector", ...}`,
so `blip3 retemplate` can rebuild captions without re-detecting.

No-object policy (docs/captions.md), as OCR's for "no text": by default an image where nothing is
detected (or an annotated image with no boxes) is KEPT as a valid sample with `objects: []`, tag
variants saying "The image contains no objects" and inline variants equal to its source caption
(so `.txt` is the source caption, or that sentence when there is none: never empty);
`n_objects = 0` in the sidecar lets users filter it out. With `drop_empty` (`--drop-empty`) it is
recorded as failed with reason `no_objects` instead. An image
with no tags (no source caption with `--tags caption`) is the same case, noted in `metadata.tags`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from blip3.core.errors import UserError
from blip3.datagen.annotator import Annotation, AnnotatorConfig, SkipSample
from blip3.datagen.detectors import DetectionLimits, filter_objects
from blip3.datagen.grounding_captions import (
    DEFAULT_ALSO_LEAD_IN,
    DEFAULT_LEAD_IN,
    build_captions,
    check_caption_choice,
    pick_caption,
)
from blip3.datagen.inputs import InputSample

if TYPE_CHECKING:
    from blip3.datagen.pipeline import JobOptions

def _hf_grounding_dino(c: "GroundingConfig") -> Any:
    from blip3.datagen.detectors_gdino import HFGroundingDino

    return HFGroundingDino(c.model_dir, c.device)  # type: ignore[arg-type]


def _groundingdino_py(c: "GroundingConfig") -> Any:
    from blip3.datagen.detectors_gdino import GroundingDinoPy

    return GroundingDinoPy(c.gdino_config, c.model_dir, c.device)  # type: ignore[arg-type]


#: The detector models, by the name `--detector` takes: each builds its (unloaded) detector from
#: the config; the one table a new detector is added to. `annotations` (boxes read from a COCO/VG
#: file, no model) is the other `--detector`.
DETECTOR_MODELS = {"grounding-dino": _hf_grounding_dino, "groundingdino-py": _groundingdino_py}
DETECTORS = (*DETECTOR_MODELS, "annotations")
TAG_SOURCES = ("caption", "vocab", "clip")
ENGINE_VERSION = "1"


@dataclass(frozen=True)
class GroundingConfig(AnnotatorConfig):
    """Everything an actor needs to build its annotator; picklable, and the pipeline's factory
    (`config()` returns an unloaded `GroundingAnnotator`). Build it with `make_config`, which
    checks the options and finds the weights in the driver, before any work starts."""

    detector: str = "grounding-dino"
    tags: str = "caption"
    vocab: tuple[str, ...] = ()
    model_dir: str | None = None
    gdino_config: str | None = None
    annotations: str | None = None
    include_crowd: bool = False
    drop_empty: bool = False
    clip_model: str | None = None
    clip_top_k: int = 8
    limits: DetectionLimits = field(default_factory=DetectionLimits)
    caption_format: str = "positional"
    caption_style: str | None = None
    lead_in: str = DEFAULT_LEAD_IN
    also_lead_in: str = DEFAULT_ALSO_LEAD_IN
    tag_order: str = "detector"
    device: str | None = None

    def __call__(self) -> "GroundingAnnotator":
        return GroundingAnnotator(self)


def make_config(
    *,
    detector: str = "grounding-dino",
    tags: str = "caption",
    vocab: str | Path | None = None,
    model: str | Path | None = None,
    gdino_config: str | Path | None = None,
    annotations: str | Path | None = None,
    include_crowd: bool = False,
    drop_empty: bool = False,
    clip_model: str | Path | None = None,
    clip_top_k: int = 8,
    limits: DetectionLimits = DetectionLimits(),
    caption_format: str = "positional",
    caption_style: str | None = None,
    lead_in: str = DEFAULT_LEAD_IN,
    also_lead_in: str = DEFAULT_ALSO_LEAD_IN,
    tag_order: str = "detector",
    device: str | None = None,
) -> GroundingConfig:
    """Validate options, resolve weights (MissingWeightsError names what to set), load the vocab."""
    if detector not in DETECTORS:
        raise UserError(f"unknown detector {detector!r}; expected one of {', '.join(DETECTORS)}", field="--detector")
    if tags not in TAG_SOURCES:
        raise UserError(f"unknown tag source {tags!r}; expected one of {', '.join(TAG_SOURCES)}", field="--tags")
    check_caption_choice(caption_format, caption_style, tag_order)
    try:
        limits.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    if clip_top_k < 1:
        raise UserError("must be >= 1", field="--clip-top-k")
    words: tuple[str, ...] = ()
    model_dir = clip_dir = ann_path = None

    if detector == "annotations":
        from blip3.datagen.annotations import load_annotations

        if not annotations:
            raise UserError("--detector annotations needs --annotations FILE (COCO or Visual Genome JSON)",
                            field="--annotations")
        load_annotations(annotations, include_crowd=include_crowd)  # malformed file: fail before work
        ann_path = str(Path(annotations).resolve())
        limits = replace(limits, nms_iou=None)  # ground truth may overlap on purpose
    else:
        if tags in ("vocab", "clip"):
            if not vocab:
                raise UserError(f"--tags {tags} needs --vocab FILE", field="--vocab")
            from blip3.datagen.tags import load_vocab

            words = tuple(load_vocab(vocab))
        if tags == "clip":
            from blip3.datagen.tags_clip import resolve_clip_model

            clip_dir = str(resolve_clip_model(clip_model).resolve())
        if detector == "grounding-dino":
            from blip3.datagen.detectors_gdino import resolve_grounding_dino

            model_dir = str(resolve_grounding_dino(model).resolve())
        else:
            from blip3.datagen.detectors_gdino import GroundingDinoPy

            GroundingDinoPy.check_available()
            if not model or not gdino_config:
                raise UserError("groundingdino-py needs --model CHECKPOINT and --gdino-config CONFIG_PY",
                                field="--model")
            model_dir = str(Path(model).resolve())
            gdino_config = str(Path(gdino_config).resolve())
    return GroundingConfig(
        detector=detector, tags=tags, vocab=words, model_dir=model_dir,
        gdino_config=str(gdino_config) if gdino_config else None, annotations=ann_path,
        include_crowd=include_crowd, drop_empty=drop_empty, clip_model=clip_dir, clip_top_k=clip_top_k,
        limits=limits, caption_format=caption_format, caption_style=caption_style, lead_in=lead_in,
        also_lead_in=also_lead_in, tag_order=tag_order, device=device,
    )


def _sample_names(sample: InputSample) -> list[str]:
    """Every name an annotation file may know this image by."""
    names = [sample.meta.get(k) for k in ("path", "name", "file_name", "filename")]
    names += [sample.uid, sample.url, sample.key]
    return [str(n) for n in names if n]


class GroundingAnnotator:
    """The `Annotator` of the grounding engine (see datagen/annotator.py)."""

    name = "grounding"

    def __init__(self, config: GroundingConfig):
        self.config = config
        self._detector: Any = None
        self._clip: Any = None
        self._index: Any = None

    def load(self) -> None:
        c = self.config
        if c.detector == "annotations":
            from blip3.datagen.annotations import load_annotations

            self._index = load_annotations(c.annotations, include_crowd=c.include_crowd)  # type: ignore[arg-type]
            return
        self._detector = DETECTOR_MODELS[c.detector](c)
        self._detector.load()
        if c.tags == "clip":
            from blip3.datagen.tags_clip import ClipTagger

            self._clip = ClipTagger(c.clip_model or "", c.vocab, top_k=c.clip_top_k, device=c.device)
            self._clip.load()

    def tags_for(self, image: Image.Image, sample: InputSample) -> list[str]:
        c = self.config
        if c.tags == "caption":
            from blip3.datagen.tags import noun_phrases

            return noun_phrases(sample.source_caption)
        if c.tags == "vocab":
            return list(c.vocab)
        return self._clip.tags(image)

    def annotate(self, image: Image.Image, sample: InputSample) -> Annotation:
        c = self.config
        extra: dict[str, Any] = {}
        if c.detector == "annotations":
            entry = self._index.lookup(_sample_names(sample))
            if entry is None:
                raise SkipSample("annotations", f"no entry for {sample.key} in {Path(c.annotations or '').name}")
            if entry.error:
                raise SkipSample("annotations", entry.error)
            objects = filter_objects(entry.objects(*image.size), c.limits)
            tags: list[str] = sorted({o.label for o in objects})
            extra["skipped_crowd"] = entry.skipped_crowd
        else:
            tags = self.tags_for(image, sample)
            objects = filter_objects(self._detector.detect(image, tags, c.limits), c.limits)
        if not objects and c.drop_empty:
            raise SkipSample("no_objects", f"nothing detected for tags {tags[:5]}")
        captions = build_captions(objects, sample.source_caption, lead_in=c.lead_in, also_lead_in=c.also_lead_in,
                                  tag_order=c.tag_order)
        chosen = pick_caption(captions, c.caption_format, c.caption_style)
        metadata = {
            "objects": [o.to_dict() for o in objects],
            "tags": tags,
            "tag_source": "annotations" if c.detector == "annotations" else c.tags,
            "detector": c.detector,
            **extra,
        }
        scores = [o.score for o in objects]
        return Annotation(
            default_caption=chosen["text"],
            captions=captions,
            metadata=metadata,
            n_objects=len(objects),
            mean_confidence=sum(scores) / len(scores) if scores else None,
        )

    def generator_info(self) -> dict[str, Any]:
        c = self.config
        info: dict[str, Any] = {
            "engine": "blip3-grounding",
            "version": ENGINE_VERSION,
            "detector": c.detector,
            "tags": "annotations" if c.detector == "annotations" else c.tags,
            "box_threshold": c.limits.box_threshold,
            "text_threshold": c.limits.text_threshold,
            "nms_iou": c.limits.nms_iou,
            "min_area": c.limits.min_area,
            "max_objects": c.limits.max_objects,
            "drop_empty": c.drop_empty,
            "caption_format": c.caption_format,
            "caption_style": c.caption_style,
            "lead_in": c.lead_in,
            "also_lead_in": c.also_lead_in,
            "tag_order": c.tag_order,
        }
        if c.model_dir:
            info["model"] = Path(c.model_dir).name
        if c.annotations:
            info["annotations"] = Path(c.annotations).name
        if c.clip_model:
            info["clip_model"] = Path(c.clip_model).name
        return info


def ground(
    input: str | Path,
    output: str | Path,
    config: GroundingConfig | None = None,
    job: JobOptions | None = None,
):
    """Run the grounding engine over `input` into caption shards in `output`.

    `config` comes from `make_config(...)` (default: Grounding DINO on caption noun phrases);
    `job` says how the job runs and writes (datagen.pipeline.JobOptions).
    """
    from blip3.datagen.pipeline import JobOptions, run_job

    return run_job(input, output, config or make_config(), job or JobOptions())

