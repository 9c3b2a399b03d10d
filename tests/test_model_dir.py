"""A model directory on disk is user input: each malformed part (config.json values of the wrong
kind or size, processor_config.json, the tokenizer files) is one line naming the file, never a
traceback from deep in the build. Loaded through `model.directory.load_model_dir`, the one loader
training and evaluation share."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from blip3.core.errors import UserError
from blip3.model.directory import load_model_dir
from tests.model_fixtures import tiny_config, tiny_processor  # noqa: F401


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_config, tiny_processor):  # noqa: F811
    from blip3.model.xgenmm import XGenMM

    d = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    XGenMM(tiny_config).save_pretrained(d)
    tiny_processor.save_pretrained(d)
    return d


def _broken(saved, tmp_path, name: str, text: str):
    d = shutil.copytree(saved, tmp_path / "m")
    (d / name).write_text(text)
    return d


def _one_line(d, file: str, match: str):
    with pytest.raises(UserError, match=match) as e:
        load_model_dir(d)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(str(d / file) if file else str(d))


def test_the_saved_dir_loads(saved):
    model, proc = load_model_dir(saved)
    assert proc.max_text_tokens == model.config.max_text_tokens


@pytest.mark.parametrize("text, match", [
    ("{not json", "not a processor config .JSONDecodeError"),
    ("[1]", "a processor config is a JSON object, not list"),
    ("{}", "'anyres' must be true or false, not None"),
    ('{"anyres": "yes", "max_text_tokens": 8}', "'anyres' must be true or false"),
    ('{"anyres": true, "max_text_tokens": 0}', "'max_text_tokens' must be an integer > 0, not 0"),
    ('{"anyres": true, "max_text_tokens": "8"}', "'max_text_tokens' must be an integer > 0"),
])
def test_a_malformed_processor_config(saved, tmp_path, text, match):
    _one_line(_broken(saved, tmp_path, "processor_config.json", text), "processor_config.json", match)


@pytest.mark.parametrize("text", ["{not json", "[]", "{}"])
def test_a_malformed_tokenizer_json(saved, tmp_path, text):
    _one_line(_broken(saved, tmp_path, "tokenizer.json", text), "", "tokenizer files cannot be read")


def _config_with(saved, tmp_path, edit):
    config = json.loads((saved / "config.json").read_text())
    edit(config)
    return _broken(saved, tmp_path, "config.json", json.dumps(config))


@pytest.mark.parametrize("key, value, match", [
    ("hidden_size", "128", "lang_model 'hidden_size' must be an integer, not str"),
    ("num_attention_heads", 4.5, "'num_attention_heads' must be an integer, not float"),
    ("vocab_size", [512], "'vocab_size' must be an integer, not list"),
    ("rms_norm_eps", None, "'rms_norm_eps' must be a number > 0, not None"),
    ("rope_theta", "x", "'rope_theta' must be a number > 0"),
    ("tie_word_embeddings", "no", "'tie_word_embeddings' must be true or false"),
    ("pad_token_id", 9999, "'pad_token_id' must be a token id below vocab_size 512"),
    ("num_key_value_heads", 3, "do not divide evenly"),
])
def test_a_lang_model_value_of_the_wrong_kind(saved, tmp_path, key, value, match):
    _one_line(_config_with(saved, tmp_path, lambda c: c["lang_model"].__setitem__(key, value)), "config.json", match)


@pytest.mark.parametrize("field, value, match", [
    ("anyres_grids", "abc", "'anyres_grids' must be .width, height. pairs of integers"),
    ("anyres_grids", [[32, "64"]], "'anyres_grids' must be"),
    ("anyres_grids", [[32, 64, 1]], "'anyres_grids' must be"),
    ("anyres_grids", [], "'anyres_grids' needs at least one grid"),
    ("anyres_grids", [[48, 32]], r"\[48, 32\] is not whole 32-pixel crops"),
    ("image_mean", [0.5, 0.5], r"'image_mean' must be 3 numbers"),
    ("image_mean", "abc", r"'image_mean' must be 3 numbers"),
    ("image_std", [0.5, True, 0.5], r"'image_std' must be 3 numbers"),
    ("image_std", [0.5, 0, 0.5], r"'image_std' must be > 0"),
])
def test_a_tuple_field_of_the_wrong_kind(saved, tmp_path, field, value, match):
    _one_line(_config_with(saved, tmp_path, lambda c: c.__setitem__(field, value)), "config.json", match)


SIZES = ["image_size", "patch_size", "vision_width", "num_latents", "resampler_depth", "resampler_heads",
         "resampler_dim_head", "resampler_ff_mult", "max_text_tokens"]
LM_SIZES = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "max_position_embeddings"]


@pytest.mark.parametrize("value", [0, -3])
@pytest.mark.parametrize("field", SIZES + [f"lang_model.{k}" for k in LM_SIZES])
def test_a_size_of_zero_or_less(saved, tmp_path, field, value):
    def edit(c):
        *outer, key = field.split(".")
        (c[outer[0]] if outer else c)[key] = value

    _one_line(_config_with(saved, tmp_path, edit), "config.json", f"'{field.split('.')[-1]}' must be > 0, not {value}")


def test_the_cli_says_it_in_one_line(saved, tmp_path):
    import subprocess
    import sys

    d = _config_with(saved, tmp_path, lambda c: c["lang_model"].__setitem__("num_hidden_layers", 0))
    r = subprocess.run([sys.executable, "-m", "blip3.cli", "model", "generate", str(d), "--prompt", "hi"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "'num_hidden_layers' must be > 0, not 0" in r.stderr and "Traceback" not in r.stderr
