"""Two processes under torchrun on CPU (gloo): FSDP2 `fully_shard` per decoder block, then root.

FSDP2 works on CPU with gloo in torch 2.14: the sharded run trains, checkpoints (full state
dicts gathered through torch.distributed.checkpoint), resumes exactly (same curve and weights as
the run never interrupted), and exports a loadable model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.train_fixtures import ROOT, TINY, tiny_vars

pytestmark = pytest.mark.slow


def _torchrun(args, cwd, env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "blip3.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=150)


def test_fsdp2_two_ranks_train_checkpoint_resume_export(tmp_path):
    stage = yaml.safe_load((TINY / "pretrain.yaml").read_text())
    stage.update(steps=4, checkpoint_every=2, eval_every=0, output_dir=str(tmp_path / "out"))
    stage["data"]["spec"] = str(TINY / "mixtures" / "pretrain.yaml")
    stage["runtime"] = {"cpu_threads": 1, "fsdp": True}
    cfg = tmp_path / "stage.yaml"
    cfg.write_text(yaml.safe_dump(stage))
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "BLIP3_NO_PROGRESS": "1", "PYTHONPATH": path}
    db = str(tmp_path / "c.duckdb")
    first = _torchrun([str(cfg), "--max-steps", "2", "--db", db], tmp_path, env)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _torchrun([str(cfg), "--resume", "--db", db], tmp_path, env)
    assert second.returncode == 0, second.stderr[-3000:]
    ckpt = tmp_path / "out" / "checkpoints" / "step_000002"
    assert (ckpt / "rank0.json").is_file() and (ckpt / "rank1.json").is_file()  # per-rank data + RNG state
    rows = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[0]["tokens"] > 2 * 256  # tokens summed over both ranks

    # the same stage never interrupted: same curve and weights (resume is exact under FSDP2 too)
    stage["output_dir"] = str(tmp_path / "full")
    cfg_full = tmp_path / "full.yaml"
    cfg_full.write_text(yaml.safe_dump(stage))
    full = _torchrun([str(cfg_full), "--db", db], tmp_path, env)
    assert full.returncode == 0, full.stderr[-3000:]
    full_rows = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in full_rows], rel=1e-5)

    import torch
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "out" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)

    from blip3.model.directory import load_model_dir

    model, _ = load_model_dir(tmp_path / "out")
    assert model.num_params() > 0


def test_ranks_read_disjoint_samples():
    """The data split under world_size=2: each rank its own slice of the mixture."""
    import tempfile

    from blip3.mixture.build import build_manifest
    from blip3.mixture.loader import MixtureLoader
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.yaml")
        build_manifest(str(TINY / "mixtures" / "sft.yaml"), out=path, variables=tiny_vars())
        keys = [{s["key"] for s in MixtureLoader(path, rank=r, world_size=2, verify="none").take(16)} for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 16 and not keys[0] & keys[1]


def test_saved_by_two_ranks_resumed_by_one_process_with_the_same_loss_curve(tmp_path):
    """DCP checkpoint of two gloo ranks, resumed by one process with grad_accum x2: the weights,
    the optimiser AND the data position (which samples each rank had consumed) carry over, so the
    loss curve is the one of the run that kept its two ranks."""
    import shutil

    stage = yaml.safe_load((TINY / "pretrain.yaml").read_text())
    stage.update(steps=4, checkpoint_every=2, eval_every=0, log_every=1, output_dir=str(tmp_path / "two"))
    stage["data"]["spec"] = str(TINY / "mixtures" / "pretrain.yaml")
    stage["runtime"] = {"cpu_threads": 1, "fsdp": True}
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump(stage))
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "BLIP3_NO_PROGRESS": "1", "PYTHONPATH": path}
    db = str(tmp_path / "c.duckdb")
    full = _torchrun([str(two), "--db", db], tmp_path, env)
    assert full.returncode == 0, full.stderr[-3000:]
    full_rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]

    # the same run stopped after step 2 (its checkpoint), continued by a single process
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step_000004")
    stage.update(output_dir=str(tmp_path / "two"))
    stage["batch"]["grad_accum"] = 2 * stage["batch"]["grad_accum"]
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump(stage))
    resumed = subprocess.run([sys.executable, "-m", "blip3.train", str(one), "--resume", "--db", db],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=150)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in full_rows], rel=1e-5)
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in full_rows]  # the very same samples

