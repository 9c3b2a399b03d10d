"""Model configuration: one flat dataclass and the named presets.

`phi3-mini` is xGen-MM phi3-mini r-v1.5 as released (SigLIP so400m-14-384, a 6-layer Perceiver
Resampler with 128 latents, Phi-3-mini-4k). `tiny` keeps the same architecture at a few million
parameters so every stage runs on a CPU in seconds (tests, the tiny training chain).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# Special tokens the processor relies on (added to whichever tokenizer is used).
PAD_TOKEN = "<pad>"
IMAGE_TOKEN = "<image>"
PLACEHOLDER_TOKEN = "<image placeholder>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
IGNORE_INDEX = -100  # label of positions without loss (transformers' cross-entropy default)

# Released any-resolution grids, (width, height) in pixels of 384x384 crops.
RELEASED_GRIDS_384: tuple[tuple[int, int], ...] = ((384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152))


@dataclass
class ModelConfig:
    """Everything needed to build an `XGenMM` with random weights (saved as config.json)."""

    name: str
    # --- vision tower (open_clip, frozen) ---
    vision_model: str  # open_clip model name, e.g. "ViT-SO400M-14-SigLIP-384"
    vision_model_cfg: dict[str, Any] | None  # open_clip config registered under vision_model (tiny)
    image_size: int  # square crop side in pixels
    patch_size: int
    vision_width: int  # patch-token dimension
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # --- Perceiver Resampler ---
    num_latents: int = 128
    resampler_depth: int = 6
    resampler_heads: int = 16
    resampler_dim_head: int = 96
    resampler_ff_mult: int = 4
    # --- language model: kwargs of transformers.Phi3Config ---
    lang_model: dict[str, Any] = field(default_factory=dict)
    # The released head has a bias (the authors' decoupled head); Phi-3's own has none.
    lm_head_bias: bool = False
    # --- tokenizer: "tiny" (trained on the fly) or "phi3" (from the Phi-3 directory) ---
    tokenizer: str = "phi3"
    image_placeholder_id: int = 32013  # id of `<image placeholder>` in that tokenizer
    # --- any-resolution ---
    anyres_grids: tuple[tuple[int, int], ...] = RELEASED_GRIDS_384
    max_text_tokens: int = 2048  # text budget before image tokens are spliced in

    @property
    def num_patches(self) -> int:
        """Patch tokens per crop (the ViT's conv drops a remainder: 384 // 14 = 27 -> 729)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def hidden_size(self) -> int:
        return int(self.lang_model["hidden_size"])

    @property
    def max_crops(self) -> int:
        """Base image + the largest grid's crops (5 for the released grids)."""
        return 1 + max((w // self.image_size) * (h // self.image_size) for w, h in self.anyres_grids)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise TypeError(f"a model config is a JSON object, not {type(d).__name__}")
        d = dict(d)
        d["anyres_grids"] = tuple(tuple(g) for g in d.get("anyres_grids", RELEASED_GRIDS_384))
        d["image_mean"] = tuple(d.get("image_mean", (0.5, 0.5, 0.5)))
        d["image_std"] = tuple(d.get("image_std", (0.5, 0.5, 0.5)))
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        for name, value in d.items():
            if not _is_kind(value, fields[name]):
                raise TypeError(f"ModelConfig field {name!r} must be {fields[name]}, not {type(value).__name__}")
        return cls(**d)


def _is_kind(value: Any, annotation: str) -> bool:
    """Whether a config.json value fits its field's annotation (a model dir on disk is untrusted: a
    `lang_model` that is not a dict must be one clear error, not a traceback from deep in the build).
    Tuple fields are converted by `from_dict` before this runs."""
    if value is None:
        return annotation.endswith("| None")
    kind = annotation.removesuffix(" | None")
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    simple = {"str": str, "bool": bool, "dict[str, Any]": dict}
    return isinstance(value, simple[kind]) if kind in simple else True


def _phi3_mini() -> ModelConfig:
    return ModelConfig(
        name="phi3-mini",
        vision_model="ViT-SO400M-14-SigLIP-384",
        vision_model_cfg=None,
        image_size=384,
        patch_size=14,
        vision_width=1152,
        num_latents=128,
        resampler_depth=6,
        resampler_heads=16,
        resampler_dim_head=96,
        resampler_ff_mult=4,
        # Phi-3-mini-4k-instruct's config.json (the fields that shape the network).
        lang_model=dict(
            vocab_size=32064,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            original_max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            bos_token_id=1,
            eos_token_id=32000,
            pad_token_id=32000,
            tie_word_embeddings=False,
            sliding_window=2047,
        ),
        tokenizer="phi3",
        image_placeholder_id=32013,  # Phi-3 ids: <pad> 32011, <image> 32012, <image placeholder> 32013
        anyres_grids=RELEASED_GRIDS_384,
        max_text_tokens=2048,
    )


TINY_VOCAB = 512  # BPE vocabulary of the tiny tokenizer (special tokens included)


def _tiny() -> ModelConfig:
    s = 32  # crop side; grids are the released ones scaled to it
    return ModelConfig(
        name="tiny",
        vision_model="blip3-tiny-vit",
        vision_model_cfg={
            "embed_dim": 32,
            "vision_cfg": {"image_size": s, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8, "mlp_ratio": 2.0},
            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
        },
        image_size=s,
        patch_size=8,
        vision_width=64,
        num_latents=16,
        resampler_depth=2,
        resampler_heads=4,
        resampler_dim_head=32,
        resampler_ff_mult=4,
        lang_model=dict(
            vocab_size=TINY_VOCAB,
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            original_max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            pad_token_id=0,  # ids fixed by model/tokenizer.py SPECIAL_TOKENS
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        ),
        tokenizer="tiny",
        image_placeholder_id=4,
        anyres_grids=tuple((w // 384 * s, h // 384 * s) for w, h in RELEASED_GRIDS_384),
        max_text_tokens=512,
    )


PRESETS = {"phi3-mini": _phi3_mini, "tiny": _tiny}


def get_config(name: str) -> ModelConfig:
    """A fresh copy of a named preset ("tiny" or "phi3-mini")."""
    if name not in PRESETS:
        from blip3.core.errors import UserError

        raise UserError(f"unknown model config {name!r} (known: {', '.join(PRESETS)})", field="config")
    return PRESETS[name]()
