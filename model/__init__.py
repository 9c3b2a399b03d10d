"""xGen-MM architecture: frozen open_clip ViT, Perceiver Resampler, Phi-3 with spliced image tokens.

Public API: `get_config`, `ModelConfig`, `XGenMM`, `XGenMMProcessor`, `PerceiverResampler`.
Imports are lazy so `import model` stays light (the CLI imports this package at start-up).
"""

from __future__ import annotations

__all__ = ["ModelConfig", "get_config", "XGenMM", "XGenMMProcessor", "PerceiverResampler", "Encoded"]


def __getattr__(name: str):
    if name in ("ModelConfig", "get_config"):
        from . import config

        return getattr(config, name)
    if name == "XGenMM":
        from .xgenmm import XGenMM

        return XGenMM
    if name in ("XGenMMProcessor", "Encoded"):
        from . import processor

        return getattr(processor, name)
    if name == "PerceiverResampler":
        from .resampler import PerceiverResampler

        return PerceiverResampler
    raise AttributeError(name)
