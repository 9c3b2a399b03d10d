"""Vision tokens per image come from the model (its resampler latents) or the spec, never a
hard-coded 128: the tiny model has 16, and its mixtures' token counts must say so."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from blip3.core.errors import UserError
from blip3.mixture.build import build_manifest, validate_spec
from blip3.mixture.manifest import load_manifest
from blip3.model.config import get_config
from tests.mixture_fixtures import inline, tiny_sources, write_spec  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def test_shipped_tiny_mixtures_declare_the_tiny_models_vision_tokens():
    specs = sorted((REPO / "manifests/tiny/mixtures").glob("*.yaml"))
    assert specs
    for f in specs:
        spec = validate_spec(yaml.safe_load(f.read_text()), str(f))
        assert spec["vision_tokens_per_crop"] == get_config("tiny").num_latents == 16, f


def test_declared_vision_tokens_set_the_token_counts(tmp_path, tiny_sources):  # noqa: F811
    entries = inline(tiny_sources, {"sft": 1})  # one image per sample
    tiny = build_manifest(write_spec(tmp_path / "a.yaml", entries, vision_tokens_per_crop=16), record=False)
    default = build_manifest(write_spec(tmp_path / "b.yaml", entries), record=False)
    assert tiny.vision_tokens_per_image == 16
    assert default.vision_tokens_per_image == get_config("phi3-mini").num_latents == 128
    (src_tiny,), (src_default,) = tiny.sources, default.sources
    assert src_default.tokens - src_tiny.tokens == (128 - 16) * src_tiny.samples


def test_the_caller_model_counts_unless_the_spec_says_otherwise(tmp_path, tiny_sources):  # noqa: F811
    entries = inline(tiny_sources, {"dpo": 1})
    plain = write_spec(tmp_path / "a.yaml", entries)
    assert build_manifest(plain, vision_tokens_per_crop=16, record=False).vision_tokens_per_image == 16
    declared = write_spec(tmp_path / "b.yaml", entries, vision_tokens_per_crop=16)
    with pytest.raises(UserError, match=re.escape("vision_tokens_per_crop: the spec declares 16 vision tokens per "
                                                  "crop, the model has 128")):
        build_manifest(declared, vision_tokens_per_crop=128, record=False)
    bad = write_spec(tmp_path / "c.yaml", entries, vision_tokens_per_crop=0)
    with pytest.raises(UserError, match="vision_tokens_per_crop: must be an integer >= 1"):
        build_manifest(bad, record=False)


def test_mix_build_takes_vision_tokens_on_the_command_line(tmp_path, tiny_sources):  # noqa: F811
    spec = write_spec(tmp_path / "spec.yaml", inline(tiny_sources, {"sft": 1}))
    out = tmp_path / "m.yaml"
    r = subprocess.run([sys.executable, "-m", "blip3.cli", "mix", "build", str(spec), "-o", str(out),
                        "--vision-tokens-per-crop", "16", "--db", str(tmp_path / "c.duckdb")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert load_manifest(out).vision_tokens_per_image == 16


def _stage(tmp_path: Path, spec: Path, **extra):
    from blip3.train.config import stage_from_dict

    raw = {"stage": "sft", "name": "s", "model": "tiny", "data": {"spec": str(spec)}, "steps": 1,
           "output_dir": str(tmp_path / "run"), **extra}
    return stage_from_dict(raw, tmp_path / "stage.yaml")


def test_the_trainer_counts_vision_tokens_with_its_own_models_resampler(tmp_path, tiny_sources):  # noqa: F811
    """A spec that declares nothing gets the stage model's num_latents, not the 128 default."""
    from blip3.train.builders import resolve_manifest

    spec = write_spec(tmp_path / "spec.yaml", inline(tiny_sources, {"sft": 1}))
    out = tmp_path / "run"
    out.mkdir()
    built = resolve_manifest(_stage(tmp_path, spec), out, None, True, {})
    assert load_manifest(built).vision_tokens_per_image == get_config("tiny").num_latents == 16
    # a stage starting from a saved model counts with that model's resampler
    init = tmp_path / "prev" / "final"
    init.mkdir(parents=True)
    (init / "config.json").write_text(json.dumps(dict(get_config("tiny").to_dict(), num_latents=8)))
    built = resolve_manifest(_stage(tmp_path, spec), out, None, True, {}, init_path=str(tmp_path / "prev"))
    assert load_manifest(built).vision_tokens_per_image == 8
