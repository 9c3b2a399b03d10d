"""Exact resume: interrupting after step k and resuming gives the run that was never interrupted.

Also the litgpt habit: a stored loss curve of a tiny run guards the trainer against silent change.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from tests.train_fixtures import tiny_stage, tiny_vars
from blip3.train.config import InitConfig
from blip3.train.loop import train_stage
from blip3.train.metrics import read_metrics

pytestmark = pytest.mark.slow
os.environ.setdefault("BLIP3_NO_PROGRESS", "1")

#: Losses of `_pretrain(8 steps)` below, recorded with torch 2.14.1 on CPU (1 thread); data order
#: from the stage's `seed` (0), the loss normalised by the step's labelled tokens.
PRETRAIN_LOSSES = [6.27597, 5.82777, 5.48657, 4.87633, 4.39051, 3.97611, 3.57987, 3.33708]


def _pretrain(tmp, **kw):
    return tiny_stage("pretrain", tmp, steps=8, checkpoint_every=4, eval_every=0, **kw)


def _pretrain_ac(tmp):
    """Activation checkpointing wraps each decoder block: names in checkpoints must not change."""
    from dataclasses import replace

    cfg = _pretrain(tmp)
    cfg.runtime = replace(cfg.runtime, activation_checkpointing=True)
    return cfg


def _pretrain_workers(tmp):
    """Samples read and encoded by 2 DataLoader workers: the resumed run reads on where it stopped."""
    cfg = _pretrain(tmp)
    cfg.data.num_workers = 2
    return cfg


def _dpo(tmp):
    # DPO from a from-scratch tiny model: LoRA, the reference forward and the noised-image pairs
    # (which draw from the RNG) all have to come back identically after a resume.
    return tiny_stage("dpo", tmp, model="tiny", init=InitConfig(), steps=4, checkpoint_every=2)


def _weights(result):
    return load_file(str(result.final_dir / "model.safetensors"))


def _assert_same_run(full, parts, out_full, out_parts):
    assert torch.tensor(full.losses).allclose(torch.tensor(parts), rtol=1e-5, atol=1e-6), (full.losses, parts)
    a, b = _weights(full), _weights(out_parts)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
    curve = lambda d: [r["loss"] for r in read_metrics(d) if "loss" in r]  # noqa: E731
    assert curve(out_full.output_dir) == pytest.approx(curve(out_parts.output_dir), rel=1e-5)


@pytest.mark.parametrize(
    "make, k", [(_pretrain, 4), (_pretrain, 3), (_pretrain_ac, 4), (_pretrain_workers, 3), (_dpo, 2)],
    ids=["pretrain-k4", "pretrain-k3", "pretrain-ac-k4", "pretrain-2-workers-k3", "dpo-k2"],
)
def test_interrupt_and_resume_is_exact(tmp_path, make, k):
    full = train_stage(make(tmp_path / "full"), record=False, data_vars=tiny_vars())
    cfg = make(tmp_path / "parts")
    first = train_stage(cfg, max_steps=k, record=False, data_vars=tiny_vars())
    assert first.final_dir is None and first.steps == k  # interrupted: checkpoint only
    second = train_stage(cfg, resume=True, record=False, data_vars=tiny_vars())
    assert second.steps == full.steps
    _assert_same_run(full, first.losses + second.losses, full, second)


@pytest.mark.parametrize("make", [_pretrain, _pretrain_ac], ids=["plain", "activation-checkpointing"])
def test_stored_loss_curve(tmp_path, make):
    result = train_stage(make(tmp_path), record=False, data_vars=tiny_vars())
    assert result.losses == pytest.approx(PRETRAIN_LOSSES, rel=2e-3)


def test_resume_after_a_real_kill(tmp_path):
    """SIGKILL the training process once a checkpoint exists; `--resume` finishes the same run."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from tests.train_fixtures import ROOT, TINY
    from blip3.train.config import load_stage

    stage = yaml.safe_load((TINY / "pretrain.yaml").read_text())
    # 48 steps after the first checkpoint at 4: the kill lands mid-run even on a busy machine.
    stage.update(steps=48, checkpoint_every=4, eval_every=0, output_dir=str(tmp_path / "killed"))
    stage["data"]["spec"] = str(TINY / "mixtures" / "pretrain.yaml")
    cfg_path = tmp_path / "stage.yaml"
    cfg_path.write_text(yaml.safe_dump(stage))
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "BLIP3_NO_PROGRESS": "1", "PYTHONPATH": path}
    proc = subprocess.Popen([sys.executable, "-m", "blip3.train", str(cfg_path), "--db", str(tmp_path / "c.duckdb")],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_ckpt = tmp_path / "killed" / "checkpoints" / "step_000004"
    deadline = time.time() + 120
    while not first_ckpt.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first_ckpt.is_dir() and not (tmp_path / "killed" / "final").exists()  # really interrupted mid-run

    cfg = load_stage(cfg_path)
    resumed = train_stage(cfg, resume=True, record=False, data_vars=tiny_vars())
    full_cfg = load_stage(cfg_path)
    full_cfg.output_dir = str(tmp_path / "full")
    full = train_stage(full_cfg, record=False, data_vars=tiny_vars())
    curve = lambda d: [r["loss"] for r in read_metrics(d) if "loss" in r]  # noqa: E731
    assert len(curve(full.output_dir)) == 48
    assert curve(resumed.output_dir) == pytest.approx(curve(full.output_dir), rel=1e-5)
    a, b = _weights(full), _weights(resumed)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
