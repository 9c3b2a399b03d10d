"""Tiny xGen-MM parts for model tests: config, processor (tokenizer trained once), model, images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from blip3.model.config import ModelConfig, get_config


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """Random RGB pixels, so every crop and patch carries a different signal."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return get_config("tiny")


@pytest.fixture(scope="session")
def tiny_processor(tiny_config):
    from blip3.model.processor import XGenMMProcessor

    return XGenMMProcessor.from_config(tiny_config)


def build_tiny_model(config: ModelConfig, seed: int = 0):
    """A fresh tiny model with fixed random weights, float32, eval mode."""
    from blip3.model.xgenmm import XGenMM

    torch.manual_seed(seed)
    return XGenMM(config).eval()


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    """Shared read-only model (tests that train or edit weights build their own)."""
    return build_tiny_model(tiny_config)
