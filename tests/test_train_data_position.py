"""Fast guards of a resumed stage (the exact loss-curve comparisons are the slow tests of
test_train_resume.py): it reads on from the saved data position, its optimiser comes back with the
saved learning rate and its schedule goes on from there, and `data.num_workers` reaches the stream
and its saved state."""

from __future__ import annotations

import pytest
import torch

from blip3.train.distributed import DistInfo
from blip3.train.loop import build_run, train_stage
from blip3.train.schedule import WarmupCosine
from tests.train_fixtures import tiny_stage, tiny_vars

STEPS = 6


def _cfg(tmp, **changes):
    return tiny_stage("pretrain", tmp, steps=STEPS, checkpoint_every=0, eval_every=0, **changes)


def _build(cfg, *, resume: bool):
    return build_run(cfg, init_path=None, resume=resume, db=None, info=DistInfo(), record=False,
                     data_vars=tiny_vars())


def test_a_resumed_stage_reads_on_from_the_saved_position_with_the_saved_learning_rate(tmp_path):
    cfg = _cfg(tmp_path / "parts")
    first = train_stage(cfg, max_steps=2, record=False, data_vars=tiny_vars())
    assert first.steps == 2 and first.final_dir is None  # stopped: the checkpoint of step 2 only

    never_stopped = _build(_cfg(tmp_path / "whole"), resume=False)
    expected = [never_stopped.stream.next().inputs["input_ids"] for _ in range(4)][2:]  # steps 3 and 4

    resumed = _build(cfg, resume=True)
    assert resumed.resumed and resumed.step == 2
    got = [resumed.stream.next().inputs["input_ids"] for _ in range(2)]
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert not torch.equal(expected[0], expected[1])  # two different steps: a position, not a repeat

    o = cfg.optim
    lr_at = lambda n: o.lr * WarmupCosine(o.warmup_steps, STEPS, o.min_lr_ratio)(n)  # noqa: E731
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx([lr_at(2)] * len(
        resumed.optimizer.param_groups))  # what the optimiser held when it was saved, after 2 steps
    resumed.scheduler.step()
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(3))  # and the schedule goes on
    assert lr_at(2) != pytest.approx(lr_at(0)) and lr_at(3) != pytest.approx(lr_at(1))


def test_data_num_workers_reaches_the_stream_and_its_saved_state(tmp_path):
    run = _build(_cfg(tmp_path, **{"data.num_workers": 2}), resume=False)
    (stream,) = run.stream.streams
    assert stream.num_workers == 2
    for _ in range(2):
        run.stream.next()
    loader = run.stream.state_dict()["ranks"]["0"]["loader"]
    assert loader["num_workers"] == 2
    assert sorted(loader["counts"]) == ["0", "1"]  # both workers read samples
