"""The one interface every datagen engine implements (OCR, grounding, ...).

The pipeline (`datagen.pipeline.run_job`) owns reading, validation, sharding, writing and the
catalog; an annotator only turns one upright RGB image into captions and metadata.

Every engine comes in two parts, in one style:

- its config (`AnnotatorConfig`): a frozen dataclass holding every setting, checked in the driver
  before any work starts; it is what travels to the Ray actors (small, picklable, never holding a
  loaded model), and calling it builds one unloaded annotator;
- its annotator: built from the config once per actor, `load()`ed once, then `annotate()`d per
  image. The driver also builds one (without `load()`) to ask `generator_info()` for the shard
  stats, so `generator_info` must not need the loaded model.

Keeping settings and loaded state apart is what lets a config be compared, hashed into the
shard fingerprint and shipped to any number of actors without copying a model by accident.

An annotator whose model gains from batches (a VLM's `generate`) also has
`annotate_batch(images, samples) -> [Annotation | SkipSample, ...]`, one outcome per image in
order; the pipeline (`datagen.pipeline.annotate_steps`) hands it a shard's images at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from blip3.datagen.inputs import InputSample


@dataclass
class Annotation:
    """What an annotator says about one image.

    - `default_caption` becomes `<key>.txt`.
    - `captions` (all variants) and `metadata` go into `<key>.json` under those names.
    - `record` holds extra top-level fields of `<key>.json` (e.g. grounding's `objects`).
    - the counts feed the sidecar parquet (`n_ocr`, `n_objects`, `mean_confidence`).
    """

    default_caption: str
    captions: list[dict[str, Any]]
    metadata: dict[str, Any]
    n_ocr: int = 0
    n_objects: int = 0
    mean_confidence: float | None = None
    record: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Annotator(Protocol):
    name: str  # "ocr" | "grounding"; goes into the shard stats' generator

    def load(self) -> None:
        """Load the heavy model; called once per Ray actor."""

    def annotate(self, image: Image.Image, sample: InputSample) -> Annotation:
        """Annotate one upright RGB image; raise only for programming errors."""

    def generator_info(self) -> dict[str, Any]:
        """Engine name, version and thresholds, for the stats json (no model load needed)."""


class SkipSample(Exception):
    """Raised by `annotate` to drop a sample on purpose; recorded as failed with `reason: detail`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.error = f"{reason}: {detail}"


class AnnotatorConfig(ABC):
    """Base of every engine's config: subclasses are `@dataclass(frozen=True)` and build their
    annotator in `__call__` (the zero-argument factory the pipeline's actors call)."""

    @abstractmethod
    def __call__(self) -> Annotator:
        """A fresh, unloaded annotator with these settings."""
