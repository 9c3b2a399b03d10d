"""Dense recaptioning with knowledge from the alt-text (the BLIP3-KALE recipe), and `recaption()`,
the Python API behind `blip3 recaption`.

Two stages per image, in one annotator (so it runs wherever the OCR and grounding annotators run,
with the same inputs, shards, sidecars, resume, catalog and audit):

1. the VLM writes a dense caption of the image (`--prompt`, datagen/recaption_prompts.py);
2. the LLM rewrites the dense caption together with the image's alt-text (`--merge-prompt`), so the
   caption keeps the alt-text's names, places and products. A sample without alt-text skips the
   call and keeps its dense caption (`metadata.merge = "no_alt_text"`); without `--llm` every
   sample keeps its dense caption (`"no_llm"`). A rewrite that is empty or a refusal is not used
   (`"empty"`, `"refused"`): the dense caption stays the caption and the scores say why.

Stored per sample (docs/formats.md): `<key>.txt` = the final caption; `captions` =
`[{"text", "style": "dense", "model"}, {"text", "style": "knowledge", "model"}]` (the second
when the LLM wrote it); `metadata = {"dense_caption", "alt_text", "merge", "scores"}` (scores:
datagen/recaption_quality.py). A dense caption that comes back empty is a failed row
`empty_caption: ...`. The shard's generator info names both models (directory name, kind,
revision), the prompts and the generation settings, so every caption is traceable.

Batches: the annotator captions a list of images at once (`annotate_batch`, `batch_size` images
per `generate` call, left padding); `annotate` is a batch of one. Greedy output does not depend on
the batch, so `batch_size` is not part of the generator info (changing it redoes no shard); with
sampling each batch is seeded from `seed` and its first sample key, and `batch_size` is recorded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from PIL import Image

from blip3.core.errors import UserError
from blip3.datagen.annotator import Annotation, AnnotatorConfig, SkipSample
from blip3.datagen.inputs import InputSample
from blip3.datagen.recaption_models import (LLM_ENV, VLM_ENV, GenerationSettings, ModelRef, check_backend,
                                            resolve_model, text_model, vision_model)
from blip3.datagen.recaption_prompts import (DEFAULT_MERGE_PROMPT, DEFAULT_VLM_PROMPT, check_merge_prompt,
                                             clean_slot, fill_merge_prompt)
from blip3.datagen.recaption_quality import caption_scores, is_refusal

if TYPE_CHECKING:
    from blip3.datagen.pipeline import JobOptions, JobResult

ENGINE_VERSION = "1"


@dataclass(frozen=True)
class RecaptionConfig(AnnotatorConfig):
    """Everything an actor needs (resolved models, prompts, settings); build it with `make_config`."""

    vlm: ModelRef
    llm: ModelRef | None = None
    prompt: str | None = DEFAULT_VLM_PROMPT  # None: a blip3 model's caption format (recaption_models.Blip3Vision)
    merge_prompt: str = DEFAULT_MERGE_PROMPT
    vlm_generation: GenerationSettings = field(default_factory=GenerationSettings)
    llm_generation: GenerationSettings = field(default_factory=GenerationSettings)
    backend: str = "transformers"
    device: str = "cpu"

    def __call__(self) -> "RecaptionAnnotator":
        return RecaptionAnnotator(self)


def make_config(
    *,
    vlm: str | Path | None = None,
    llm: str | Path | None = None,
    prompt: str | None = None,
    merge_prompt: str = DEFAULT_MERGE_PROMPT,
    vlm_generation: GenerationSettings = GenerationSettings(),
    llm_generation: GenerationSettings = GenerationSettings(),
    backend: str = "transformers",
    device: str = "cpu",
    use_llm: bool = True,
) -> RecaptionConfig:
    """Check the options and find the models (`--vlm` / $BLIP3_RECAPTION_VLM, `--llm` /
    $BLIP3_RECAPTION_LLM) in the driver, before any work; `use_llm=False` keeps dense captions.
    `prompt` None: DEFAULT_VLM_PROMPT for a Hugging Face VLM, the caption format for a blip3 one."""
    check_backend(backend)
    if prompt is not None and not prompt.strip():
        raise UserError("must not be empty", field="--prompt")
    vlm_ref = resolve_model(vlm, env=VLM_ENV, option="--vlm", what="captioning VLM")
    if prompt is None and vlm_ref.kind == "hf":
        prompt = DEFAULT_VLM_PROMPT
    llm_ref = resolve_model(llm, env=LLM_ENV, option="--llm", what="merge LLM") if use_llm else None
    if use_llm:
        check_merge_prompt(merge_prompt)
    config = RecaptionConfig(vlm=vlm_ref, llm=llm_ref, prompt=prompt, merge_prompt=merge_prompt,
                             vlm_generation=vlm_generation.check("--"),
                             llm_generation=llm_generation.check("--merge-"), backend=backend, device=device)
    vision_model(config.vlm, config.vlm_generation, backend)  # a kind the backend cannot run fails here
    if config.llm is not None:
        text_model(config.llm, config.llm_generation, backend)
    return config


def batch_seed(seed: int, key: str) -> int:
    """The seed of a sampled batch: from `seed` and its first key, so a re-run draws the same."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:4], "big")


def _chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


class RecaptionAnnotator:
    """The `Annotator` of the recaptioning engine (see datagen/annotator.py)."""

    name = "recaption"

    def __init__(self, config: RecaptionConfig):
        self.config = config
        self.vision: Any = None
        self.text: Any = None
        self._special: list[str] | None = None

    def load(self) -> None:
        c = self.config
        self.vision = vision_model(c.vlm, c.vlm_generation, c.backend, c.device)
        self.vision.load()
        if c.llm is not None:
            self.text = text_model(c.llm, c.llm_generation, c.backend, c.device)
            self.text.load()

    def generator_info(self) -> dict[str, Any]:
        c = self.config

        def settings(g: GenerationSettings) -> dict[str, Any]:
            info = g.info()
            if not g.do_sample:
                info.pop("batch_size")  # greedy output does not depend on it (module doc)
            return info

        info: dict[str, Any] = {
            "engine": "blip3-recaption", "version": ENGINE_VERSION, "backend": c.backend,
            "dtype": "bfloat16" if c.device.startswith("cuda") else "float32",
            "vlm": {**c.vlm.info(), "prompt": c.prompt, "format": "caption" if c.prompt is None else "chat",
                    **settings(c.vlm_generation)},
            "llm": None,
        }
        if c.llm is not None:
            info["llm"] = {**c.llm.info(), "prompt": c.merge_prompt, **settings(c.llm_generation)}
        return info

    def annotate(self, image: Image.Image, sample: InputSample) -> Annotation:
        (result,) = self.annotate_batch([image], [sample])
        if isinstance(result, SkipSample):
            raise result
        return result

    def annotate_batch(self, images: Sequence[Image.Image], samples: Sequence[InputSample]
                       ) -> list[Annotation | SkipSample]:
        """One outcome per image, in order: an Annotation, or the SkipSample that records it as failed."""
        if self.vision is None:
            raise RuntimeError("call load() first")
        c = self.config
        dense: list[str] = []
        for part in _chunks(len(images), c.vlm_generation.batch_size):
            self._seed(c.vlm_generation, samples[part[0]].key)
            dense += self.vision.generate([images[i] for i in part], c.prompt)
        alts = [clean_slot(s.source_caption or "", self._specials()) for s in samples]
        merged: dict[int, str] = {}
        if self.text is not None:
            todo = [i for i in range(len(samples)) if alts[i] and dense[i].strip()]
            for part in _chunks(len(todo), c.llm_generation.batch_size):
                idx = [todo[j] for j in part]
                self._seed(c.llm_generation, samples[idx[0]].key)
                prompts = [fill_merge_prompt(c.merge_prompt, clean_slot(dense[i], self._specials()), alts[i])
                           for i in idx]
                merged.update(zip(idx, self.text.generate(prompts)))
        return [self._annotation(dense[i], alts[i], merged.get(i)) for i in range(len(samples))]

    def _specials(self) -> list[str]:
        """Both models' special-token strings, removed from the data put into prompts (read once)."""
        if self._special is None:
            self._special = self.vision.special_tokens() + (self.text.special_tokens() if self.text is not None else [])
        return self._special

    @staticmethod
    def _seed(g: GenerationSettings, key: str) -> None:
        if g.do_sample:
            import torch

            torch.manual_seed(batch_seed(g.seed, key))

    def _annotation(self, dense: str, alt: str, merged: str | None) -> Annotation | SkipSample:
        c = self.config
        if not dense.strip():
            return SkipSample("empty_caption", f"{c.vlm.name} wrote nothing for the prompt")
        if c.llm is None:
            status = "no_llm"
        elif not alt:
            status = "no_alt_text"
        elif merged is None or not merged.strip():
            status = "empty"
        elif is_refusal(merged):
            status = "refused"
        else:
            status = "merged"
        final = merged if status == "merged" else dense
        captions: list[dict[str, Any]] = [{"text": dense, "style": "dense", "model": c.vlm.name}]
        if status in ("merged", "refused") and c.llm is not None:
            captions.append({"text": merged, "style": "knowledge", "model": c.llm.name})
        scores = caption_scores(final, alt, merged=status == "merged", empty=status == "empty",
                                refusal=is_refusal(dense) or status == "refused")
        metadata = {"dense_caption": dense, "alt_text": alt or None, "merge": status, "scores": scores}
        return Annotation(default_caption=final, captions=captions, metadata=metadata)


def recaption(input: str | Path, output: str | Path, config: RecaptionConfig,
              job: "JobOptions | None" = None) -> "JobResult":
    """Recaption `input` into caption shards in `output` (resumable; see datagen.pipeline), then
    put each sample's quality scores in the catalog (`job.register`)."""
    from blip3.datagen.pipeline import JobOptions, run_job
    from blip3.datagen.recaption_scores import register_scores

    job = job or JobOptions()
    result = run_job(input, output, config, job)
    if job.register and result.source:
        register_scores(job.db, result.source)
    return result


# -- the YAML settings file (`--config`) ------------------------------------------------------
#: Keys of a stage in the settings file, beside the GenerationSettings fields.
_STAGE_KEYS = ("model", "prompt")
_TOP_KEYS = ("vlm", "llm", "backend", "device")


def read_settings(path: str | Path) -> dict[str, Any]:
    """The settings file of `--config`, checked: one UserError naming the field and the file.

        backend: transformers          # or vllm
        vlm: {model: DIR, prompt: "...", max_new_tokens: 128, do_sample: false, temperature: 1.0,
              top_p: 1.0, seed: 0, batch_size: 8}
        llm: {model: DIR, prompt: "... {dense_caption} ... {alt_text} ...", max_new_tokens: 128, ...}
             # or `llm: null`: dense captions only

    Returns `{"backend", "device", "vlm": {...}, "llm": {...} | None}` with only the keys given;
    options given on the command line win over the file.
    """
    import dataclasses

    from blip3.core.yamlio import read_yaml

    raw = read_yaml(path, "settings file")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError("expected a mapping (backend, vlm, llm)", file=path)
    for key in raw:
        if key not in _TOP_KEYS:
            raise UserError(f"unknown field (known: {', '.join(_TOP_KEYS)})", field=str(key), file=path)
    fields = {f.name: f.type for f in dataclasses.fields(GenerationSettings)}
    out: dict[str, Any] = {k: raw[k] for k in ("backend", "device") if k in raw}
    for k in ("backend", "device"):
        if k in out and not isinstance(out[k], str):
            raise UserError("expected a string", field=k, file=path)
    for stage in ("vlm", "llm"):
        if stage not in raw:
            continue
        section = raw[stage]
        if section is None and stage == "llm":
            out["llm"] = None
            continue
        if not isinstance(section, dict):
            raise UserError("expected a mapping (model, prompt, max_new_tokens, ...)", field=stage, file=path)
        for key, value in section.items():
            where = f"{stage}.{key}"
            if key not in _STAGE_KEYS and key not in fields:
                raise UserError(f"unknown field (known: {', '.join([*_STAGE_KEYS, *fields])})", field=where, file=path)
            kind = "str" if key in _STAGE_KEYS else fields[key]
            ok = {"str": isinstance(value, str), "bool": isinstance(value, bool),
                  "int": isinstance(value, int) and not isinstance(value, bool),
                  "float": isinstance(value, (int, float)) and not isinstance(value, bool)}[kind]
            if not ok:
                raise UserError(f"expected a {kind}, got {value!r}", field=where, file=path)
        out[stage] = dict(section)
    return out
