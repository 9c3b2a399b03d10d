"""The frozen vision tower: an open_clip image encoder that returns patch tokens, no pooling.

open_clip builds two kinds of ViT: timm-backed ones (SigLIP so400m: `visual.trunk` is a timm
VisionTransformer, whose `forward_features` gives the normed last hidden state) and its own
`VisionTransformer` (`output_tokens=True` returns (pooled, tokens)). `patch_tokens` hides that.

SigLIP's weights were trained with the tanh approximation of GELU (big_vision's default; the
released xGen-MM tower is transformers' Siglip, `gelu_pytorch_tanh`), while timm builds its SigLIP
ViTs with the exact GELU. A SigLIP trunk gets its activation swapped back (`use_tanh_gelu`).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from .config import ModelConfig


def register_open_clip_config(name: str, cfg: dict) -> None:
    """Make a config dict buildable by name (tiny ViTs for tests); idempotent."""
    from open_clip import factory

    factory._MODEL_CONFIGS[name] = copy.deepcopy(cfg)


class _QuietRandomInit(logging.Filter):
    """open_clip warns on every build without weights; random weights are what we asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def build_vision_encoder(config: ModelConfig, checkpoint: str | None = None) -> nn.Module:
    """open_clip's `.visual` for `config.vision_model`, frozen and in eval mode.

    `checkpoint` is a local open_clip checkpoint file (weights of the whole CLIP model); without it
    the weights are random. Nothing is downloaded. Built on torch's current default device, so
    `with torch.device("meta")` builds shapes only.
    """
    import open_clip

    if config.vision_model_cfg is not None:
        register_open_clip_config(config.vision_model, config.vision_model_cfg)
    quiet = _QuietRandomInit()
    logging.getLogger().addFilter(quiet)
    try:
        clip = open_clip.create_model(
            config.vision_model,
            pretrained=checkpoint,
            pretrained_text=False,
            require_pretrained=checkpoint is not None,
            device=torch.get_default_device(),
        )
    finally:
        logging.getLogger().removeFilter(quiet)
    visual = clip.visual
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and "siglip" in config.vision_model.lower():
        use_tanh_gelu(trunk)
    if hasattr(visual, "output_tokens"):
        visual.output_tokens = True
    visual.requires_grad_(False)
    visual.eval()
    return visual


def use_tanh_gelu(trunk: nn.Module) -> nn.Module:
    """Every GELU of a timm ViT (the blocks' MLPs and the MAP head's) -> the tanh approximation,
    the activation SigLIP was trained with. No weights change; idempotent. Returns `trunk`."""
    for name, module in list(trunk.named_modules()):
        if isinstance(module, nn.GELU) and module.approximate != "tanh":
            parent, _, attr = name.rpartition(".")
            setattr(trunk.get_submodule(parent) if parent else trunk, attr, nn.GELU(approximate="tanh"))
    return trunk


def patch_tokens(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, P, vision_width) patch tokens (prefix/class tokens dropped)."""
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:  # timm-backed (SigLIP so400m)
        feats = trunk.forward_features(pixels)  # (B, prefix + P, C), final norm applied
        return feats[:, getattr(trunk, "num_prefix_tokens", 0) :]
    _, tokens = visual(pixels)  # open_clip VisionTransformer with output_tokens=True
    return tokens
