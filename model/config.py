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
        """A config from its JSON form. A model dir on disk is untrusted input: a value of the wrong
        kind or size is a TypeError / ValueError / KeyError naming the field, here, not a
        traceback from deep in the build (`xgenmm.read_model_config` words it as one line)."""
        if not isinstance(d, dict):
            raise TypeError(f"a model config is a JSON object, not {type(d).__name__}")
        d = dict(d)
        d["anyres_grids"] = _grids(d.get("anyres_grids", RELEASED_GRIDS_384))
        d["image_mean"] = _numbers(d.get("image_mean", (0.5, 0.5, 0.5)), "image_mean")
        d["image_std"] = _numbers(d.get("image_std", (0.5, 0.5, 0.5)), "image_std")
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        for name, value in d.items():
            if not _is_kind(value, fields[name]):
                raise TypeError(f"ModelConfig field {name!r} must be {fields[name]}, not {type(value).__name__}")
        config = cls(**d)
        config.check()
        return config

    def check(self) -> None:
        """Sizes a model can be built with: every size > 0, pixels normalised by a positive std,
        grids a whole number of crops, a `lang_model` Phi3Config can take (`_check_lang_model`)."""
        for name in POSITIVE_FIELDS:
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig field {name!r} must be > 0, not {getattr(self, name)}")
        if self.image_placeholder_id < 0:
            raise ValueError(f"ModelConfig field 'image_placeholder_id' must be >= 0, not {self.image_placeholder_id}")
        if any(v <= 0 for v in self.image_std):
            raise ValueError(f"ModelConfig field 'image_std' must be > 0, not {list(self.image_std)}")
        if not self.anyres_grids:
            raise ValueError("ModelConfig field 'anyres_grids' needs at least one grid")
        for grid in self.anyres_grids:
            if any(side <= 0 or side % self.image_size for side in grid):
                raise ValueError(f"ModelConfig field 'anyres_grids': {list(grid)} is not whole {self.image_size}-pixel crops")
        _check_lang_model(self.lang_model)


# Fields that are sizes: 0 or less builds nothing (or divides by zero).
POSITIVE_FIELDS = ("image_size", "patch_size", "vision_width", "num_latents", "resampler_depth", "resampler_heads",
                   "resampler_dim_head", "resampler_ff_mult", "max_text_tokens")
# Phi3Config kwargs we check: required sizes, optional sizes, positive reals, token ids.
LM_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
LM_OPTIONAL_SIZES = ("num_key_value_heads", "max_position_embeddings", "original_max_position_embeddings", "sliding_window")
LM_REALS = ("rms_norm_eps", "rope_theta")
LM_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(value: Any, name: str) -> tuple[float, float, float]:
    """image_mean / image_std: three numbers, one per RGB channel."""
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(_is_real(v) for v in value):
        raise TypeError(f"ModelConfig field {name!r} must be 3 numbers (R, G, B), not {value!r}"[:200])
    return tuple(float(v) for v in value)


def _grids(value: Any) -> tuple[tuple[int, int], ...]:
    """anyres_grids: a list of [width, height] pairs of integers."""
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(g, (list, tuple)) and len(g) == 2 and all(_is_int(v) for v in g) for g in value)
    if not ok:
        raise TypeError(f"ModelConfig field 'anyres_grids' must be [width, height] pairs of integers, not {value!r}"[:200])
    return tuple((int(w), int(h)) for w, h in value)


def _check_lang_model(lm: dict[str, Any]) -> None:
    """The Phi3Config kwargs of `lang_model` that shape the network, each of its kind and > 0."""
    for name in LM_SIZES:
        if name not in lm:
            raise KeyError(f"lang_model needs {name!r}")
    for name in LM_SIZES + LM_OPTIONAL_SIZES:
        if name in lm and not (name == "sliding_window" and lm[name] is None):
            if not _is_int(lm[name]):
                raise TypeError(f"lang_model {name!r} must be an integer, not {type(lm[name]).__name__}")
            if lm[name] <= 0:
                raise ValueError(f"lang_model {name!r} must be > 0, not {lm[name]}")
    for name in LM_REALS:
        if name in lm and not (_is_real(lm[name]) and lm[name] > 0):
            raise TypeError(f"lang_model {name!r} must be a number > 0, not {lm[name]!r}"[:200])
    for name in LM_TOKEN_IDS:  # an id, or a list of ids (transformers allows several eos ids)
        ids = lm.get(name) if isinstance(lm.get(name), list) else [lm.get(name)]
        if lm.get(name) is not None and not all(_is_int(i) and 0 <= i < lm["vocab_size"] for i in ids):
            raise ValueError(f"lang_model {name!r} must be a token id below vocab_size {lm['vocab_size']}, not {lm[name]!r}"[:200])
    if "tie_word_embeddings" in lm and not isinstance(lm["tie_word_embeddings"], bool):
        raise TypeError(f"lang_model 'tie_word_embeddings' must be true or false, not {lm['tie_word_embeddings']!r}"[:200])
    heads, kv = lm["num_attention_heads"], lm.get("num_key_value_heads", lm["num_attention_heads"])
    if lm["hidden_size"] % heads or heads % kv:
        raise ValueError(f"lang_model: hidden_size {lm['hidden_size']} / num_attention_heads {heads} / "
                         f"num_key_value_heads {kv} do not divide evenly")


def _is_kind(value: Any, annotation: str) -> bool:
    """Whether a config.json value fits its field's annotation (a model dir on disk is untrusted: a
    `lang_model` that is not a dict must be one clear error, not a traceback from deep in the build).
    Tuple fields are converted by `from_dict` before this runs."""
    if value is None:
        return annotation.endswith("| None")
    kind = annotation.removesuffix(" | None")
    if kind == "int":
        return _is_int(value)
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
