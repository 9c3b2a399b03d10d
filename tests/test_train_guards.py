"""Guards of the trainer: configurations that would train something other than asked are refused
up front, and what the loop counts (skipped samples, seeds) reaches the metrics."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import yaml

from blip3.core.errors import UserError
from tests.train_fixtures import ROOT, tiny_stage, tiny_vars

os.environ.setdefault("BLIP3_NO_PROGRESS", "1")


def test_several_ranks_without_fsdp_are_refused_before_any_work(tmp_path):
    from blip3.model.runtime import DistInfo
    from blip3.train.loop import train_stage

    cfg = tiny_stage("pretrain", tmp_path, steps=1)
    cfg.runtime = replace(cfg.runtime, fsdp=False)
    with pytest.raises(UserError) as e:
        train_stage(cfg, dist_info=DistInfo(rank=0, world_size=2), record=False, data_vars=tiny_vars())
    assert e.value.field == "runtime.fsdp" and e.value.file == cfg.source
    assert not (tmp_path / "pretrain").exists()  # nothing was built or written


def test_flex_attention_training_off_gpu_is_refused_before_any_work(tmp_path):
    from blip3.model.runtime import DistInfo
    from blip3.train.loop import train_stage

    cfg = tiny_stage("pretrain", tmp_path, steps=1)
    cfg.runtime = replace(cfg.runtime, attention="flex")
    with pytest.raises(UserError) as e:
        train_stage(cfg, dist_info=DistInfo(), record=False, data_vars=tiny_vars())
    assert e.value.field == "runtime.attention" and "GPU" in str(e.value)
    assert not (tmp_path / "pretrain").exists()


def test_the_stage_attention_reaches_the_model(tmp_path):
    from blip3.model.attention import attention_of
    from blip3.train.builders import build_model

    cfg = tiny_stage("pretrain", tmp_path, steps=1)
    cfg.runtime = replace(cfg.runtime, attention="flex")
    model, _, _ = build_model(cfg)
    assert attention_of(model.lang_model) == "flex"
    cfg.runtime = replace(cfg.runtime, attention="dense")
    assert attention_of(build_model(cfg)[0].lang_model) == "dense"


def test_dpo_needs_a_frozen_resampler(tmp_path):
    from blip3.train.config import load_stage

    raw = yaml.safe_load((ROOT / "manifests/tiny/dpo.yaml").read_text())
    raw["data"]["spec"] = str(ROOT / "manifests/tiny/mixtures/dpo.yaml")
    raw["freeze"] = ["vision_encoder"]
    p = tmp_path / "dpo.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError) as e:
        load_stage(p)
    assert e.value.field == "freeze" and e.value.file == str(p) and "vision_tokenizer" in str(e.value)
    raw["freeze"] = ["vision_encoder", "vision_tokenizer"]
    p.write_text(yaml.safe_dump(raw))
    assert load_stage(p).stage == "dpo"


@pytest.mark.slow
def test_the_run_follows_cfg_seed_not_init_seed(tmp_path):
    """Building the model seeds init.seed; the RNG stream of the run must stay the one of `seed`."""
    import torch

    from blip3.train.loop import train_stage

    states = []
    for seed, init_seed in ((1, 0), (2, 0), (1, 5)):
        cfg = tiny_stage("pretrain", tmp_path / f"{seed}-{init_seed}", steps=1, checkpoint_every=0, eval_every=0,
                         seed=seed, **{"init.seed": init_seed})
        train_stage(cfg, record=False, data_vars=tiny_vars())
        states.append(torch.random.get_rng_state())
    assert not torch.equal(states[0], states[1])  # the run's seed drives the stream...
    assert torch.equal(states[0], states[2])  # ...and the init seed does not leak into it


@pytest.mark.slow
def test_samples_too_long_for_a_packed_row_are_reported(tmp_path):
    from blip3.train.loop import train_stage
    from blip3.train.metrics import read_metrics

    # 40-token rows: a caption image alone takes 16 placeholders, so longer documents cannot fit
    cfg = tiny_stage("pretrain", tmp_path, steps=2, checkpoint_every=0, eval_every=0, log_every=1)
    cfg.batch = replace(cfg.batch, seq_len=40)
    out = train_stage(cfg, record=False, data_vars=tiny_vars()).output_dir
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(isinstance(r["skipped"], int) and r["skipped"] >= 0 for r in rows)
    assert sum(r["skipped"] for r in rows) > 0
