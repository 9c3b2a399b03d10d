"""The training loop pinned to exact values: the step's gradient is that of the token mean, the
optimiser step, the step's timings, the held-out evaluation, what a fresh run clears, and the
cadence of metrics, evaluation and checkpoints of one real stopped-then-resumed tiny run (its
metrics, catalog rows and `train_info.json`)."""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import replace
from pathlib import Path

import duckdb
import pytest
import torch

from blip3.core.errors import UserError
from blip3.train.data import Batch, count_crops, count_tokens
from tests.model_fixtures import build_tiny_model
from tests.test_train_objective import _objective, _stream
from tests.train_fixtures import tiny_stage, tiny_vars

os.environ.setdefault("BLIP3_NO_PROGRESS", "1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the tiny stages ask (`runtime.cpu_threads: 1`): tiny matmuls on a
    busy machine are much slower with more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """The tiny model (trainable, as the pretrain stage leaves it) and its pretrain objective."""
    from blip3.model.config import get_config

    model = build_tiny_model(get_config("tiny")).train()
    model.vision_encoder.requires_grad_(False)
    return model, _objective("pretrain", model)


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    """Two real packed micro-batches of the tiny pretrain mixture."""
    s = _stream("pretrain", tmp_path_factory.mktemp("stream"), 2)
    return [s.next(), s.next()]


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])


def _reference(model, objective, batches) -> tuple[float, int, torch.Tensor]:
    """Loss and gradient of the token mean over every micro-batch, computed in one expression."""
    model.zero_grad(set_to_none=True)
    items = sum(objective.items(b) for b in batches)
    total = sum(objective(model, b)[0] for b in batches)
    (total / items).backward()
    total = total.detach()
    grads = _grads(model).clone()
    model.zero_grad(set_to_none=True)
    return float(total) / items, items, grads


def test_the_step_gradient_is_that_of_the_token_mean(tiny, batches):
    from blip3.train.loop import train_step

    model, objective = tiny
    loss, items, g_ref = _reference(model, objective, batches)
    s = train_step(model, objective, batches)
    assert s.items == items > 0
    assert s.loss == pytest.approx(loss, rel=1e-6)
    assert float((_grads(model) - g_ref).norm() / g_ref.norm()) < 1e-5
    assert s.tokens == sum(count_tokens(b.inputs) for b in batches) > 0
    assert s.crops == sum(count_crops(b.inputs, model.config) for b in batches) > 0
    assert s.skipped == sum(b.skipped for b in batches)
    assert s.grad_norm is None and math.isnan(s.lr) and s.extras == {}  # no optimiser: gradients only
    model.zero_grad(set_to_none=True)


def test_a_step_without_labelled_items_is_one_clear_line(tiny, batches):
    from blip3.train.loop import train_step

    model, objective = tiny
    b = batches[0]
    unlabelled = Batch({**b.inputs, "labels": torch.full_like(b.inputs["labels"], -100)}, b.n_pairs, b.skipped)
    with pytest.raises(UserError, match="no labelled item"):
        train_step(model, objective, [unlabelled])


def _sgd(model, lr: float):
    from blip3.train.schedule import build_scheduler

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    return opt, build_scheduler(opt, 2, 10, 0.0)  # warm-up: the lr changes after each step


def test_the_optimiser_step_unclipped_and_clipped(tiny, batches):
    from blip3.train.loop import train_step

    model, objective = tiny
    params = [p for p in model.parameters() if p.requires_grad]
    _, _, g_ref = _reference(model, objective, batches)
    before = torch.cat([p.detach().flatten() for p in params]).clone()

    opt, sched = _sgd(model, 0.5)
    lr = sched.get_last_lr()[0]
    s = train_step(model, objective, batches, optimizer=opt, scheduler=sched, grad_clip=0.0)
    after = torch.cat([p.detach().flatten() for p in params])
    # grad_clip 0: no clipping, no norm; SGD moves every weight by -lr * gradient
    assert s.grad_norm is None and s.lr == lr > 0
    assert torch.allclose(after, before - lr * g_ref, rtol=1e-4, atol=1e-7)
    assert sched.get_last_lr()[0] != lr  # the schedule stepped
    assert all(p.grad is None for p in params)  # gradients freed, not zeroed
    with torch.no_grad():
        for p, v in zip(params, before.split([p.numel() for p in params])):
            p.copy_(v.view_as(p))

    opt, sched = _sgd(model, 0.5)
    clip = min(float(g_ref.norm()), 1.0) / 2  # below the norm (clips) and below 1
    s = train_step(model, objective, batches, optimizer=opt, scheduler=sched, grad_clip=clip)
    after = torch.cat([p.detach().flatten() for p in params])
    assert s.grad_norm == pytest.approx(float(g_ref.norm()), rel=1e-4)  # the norm before clipping
    assert float((after - before).norm()) == pytest.approx(lr * clip, rel=1e-3)
    with torch.no_grad():
        for p, v in zip(params, before.split([p.numel() for p in params])):
            p.copy_(v.view_as(p))


def test_step_timings_partition_the_step(tiny, batches):
    from blip3.train.loop import train_step

    model, objective = tiny
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt, sched = _sgd(model, 0.0)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    s = train_step(model, objective, batches, optimizer=opt, scheduler=sched, timings=timings)
    elapsed = time.perf_counter() - t0
    assert s.grad_norm is None  # grad_clip defaults to no clipping
    assert set(timings) == {"transfer", "forward", "backward", "optimizer"}
    assert all(v >= 0 for v in timings.values())
    # consecutive laps of one clock: together no longer than the call
    assert sum(timings.values()) <= elapsed
    with torch.no_grad():
        for p, v in zip(params, before):
            p.copy_(v)


def _build(cfg, **kw):
    from blip3.model.runtime import DistInfo
    from blip3.train.loop import build_run

    return build_run(cfg, init_path=None, resume=kw.pop("resume", False), db=None, info=DistInfo(), record=False,
                     data_vars=tiny_vars(), **kw)


def test_a_fresh_run_clears_what_an_earlier_run_left(tmp_path):
    cfg = tiny_stage("pretrain", tmp_path, steps=2)
    out = Path(cfg.output_dir)
    (out / "checkpoints" / "step_000099").mkdir(parents=True)
    (out / "final").mkdir()
    (out / "final" / "model.safetensors").write_text("stale")
    (out / "metrics.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    (out / "notes.txt").write_text("the user's")
    _build(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["mixture.yaml", "notes.txt"]  # the run's own mixture
    _build(cfg)  # nothing left to clear: no error
    # a new output folder, parents included
    cfg.output_dir = str(tmp_path / "a" / "b" / "pretrain")
    _build(cfg)
    assert Path(cfg.output_dir).is_dir()


def test_missing_init_model_is_one_clear_line(tmp_path):
    cfg = tiny_stage("pretrain", tmp_path, steps=2)
    cfg.init = replace(cfg.init, path=str(tmp_path / "no-such-model"))
    with pytest.raises(UserError, match="no model at") as e:
        _build(cfg)
    assert e.value.field == "init.path"
    assert not Path(cfg.output_dir).exists()


def test_precision_and_cpu_threads_reach_the_run(tmp_path):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cfg = tiny_stage("pretrain", tmp_path / "a", steps=2)  # runtime.cpu_threads: 1
        assert _build(cfg).bf16 is False
        cfg = tiny_stage("pretrain", tmp_path / "auto", steps=2)
        cfg.runtime = replace(cfg.runtime, precision="auto")
        assert _build(cfg).bf16 is False  # auto: bf16 on a GPU only, fp32 on CPU
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        cfg = tiny_stage("pretrain", tmp_path / "b", steps=2)
        cfg.runtime = replace(cfg.runtime, precision="bf16", cpu_threads=0)
        assert _build(cfg).bf16 is True
        assert torch.get_num_threads() == 2  # 0: torch's default, left alone
    finally:
        torch.set_num_threads(threads)


def test_evaluate_is_the_token_mean_of_the_held_out_batches(tmp_path):
    from blip3.train.builders import build_stream
    from blip3.train.loop import evaluate

    cfg = tiny_stage("pretrain", tmp_path, steps=2, eval_batches=2)
    run = _build(cfg)
    rng = torch.random.get_rng_state()
    got = evaluate(run)
    assert torch.equal(torch.random.get_rng_state(), rng) and run.model.training
    ev = build_stream(cfg, run.manifest, run.processor, run.info, verify="none", seed_offset=1)
    run.model.eval()
    loss, items = 0.0, 0
    with torch.no_grad():
        for _ in range(2):
            b = ev.next()
            items += run.objective.items(b)
            loss += float(run.objective(run.model, b)[0])
    assert set(got) == {"eval_loss"} and items > 0
    assert got["eval_loss"] == pytest.approx(loss / items, rel=1e-6)


class _Stage:
    """One tiny pretrain stage of 5 steps (metrics, evaluation and checkpoints every 2), stopped
    after 4 by `max_steps`, then resumed to its end; recorded in a catalog. Its output folder
    first holds a `final/` of an earlier run, which the first (fresh) run must clear."""

    def __init__(self, tmp: Path):
        import logging

        from blip3.train.checkpoint import list_checkpoints
        from blip3.train.loop import train_stage
        from blip3.train.metrics import read_metrics

        self.cfg = tiny_stage("pretrain", tmp, steps=5, log_every=2, eval_every=2, checkpoint_every=2, eval_batches=1)
        self.out, self.db = Path(self.cfg.output_dir), tmp / "catalog.duckdb"
        (self.out / "final").mkdir(parents=True)
        (self.out / "final" / "stale.txt").write_text("an earlier run's")
        ckpts = lambda: [int(p.name.split("_")[1]) for p in list_checkpoints(self.out)]  # noqa: E731
        self.log: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: self.log.append(record.getMessage())
        logger = logging.getLogger("blip3.train")
        logger.addHandler(handler)
        try:
            t0 = time.perf_counter()
            self.first = train_stage(self.cfg, max_steps=4, db=self.db, data_vars=tiny_vars())
            self.wall = [time.perf_counter() - t0]
            self.first_ckpts, self.first_runs = ckpts(), self.runs()
            self.final_after_first = (self.out / "final").exists()
            t0 = time.perf_counter()
            self.second = train_stage(self.cfg, resume=True, db=self.db, data_vars=tiny_vars())
            self.wall.append(time.perf_counter() - t0)
        finally:
            logger.removeHandler(handler)
        self.ckpts, self.metrics = ckpts(), read_metrics(self.out)

    def runs(self) -> list[tuple]:
        with duckdb.connect(str(self.db), read_only=True) as con:
            return con.execute("SELECT run_id, kind, steps, tokens, final_loss, checkpoint, status, config_path, "
                               "metrics_path FROM runs").fetchall()


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    return _Stage(tmp_path_factory.mktemp("stage"))


def test_metrics_evaluation_and_checkpoints_follow_their_cadence(stage):
    loss_rows = [r["step"] for r in stage.metrics if "loss" in r]
    eval_rows = [r["step"] for r in stage.metrics if "eval_loss" in r]
    assert loss_rows == eval_rows == [2, 4, 5]  # every 2 steps, and the last step
    # every 2 steps before the stop, then the stop's own; the newest 2 kept
    assert stage.first_ckpts == [2, 4] and stage.ckpts == [4, 5]
    assert not stage.final_after_first  # the fresh run cleared the old final/, and a stopped run writes none


def test_the_stopped_run_and_the_resumed_one(stage):
    first, second = stage.first, stage.second
    assert (first.steps, second.steps) == (4, 5) and (len(first.losses), len(second.losses)) == (4, 1)
    assert first.final_dir is None and second.final_dir == stage.out / "final"
    assert first.final_loss == first.losses[-1] != first.losses[-2] and second.final_loss == second.losses[-1]
    assert re.fullmatch(r"tiny-pretrain-[0-9a-f]{8}", first.run_id)
    assert second.run_id == first.run_id  # the resumed run continues the same catalog row
    assert any(f"resumed from {stage.out / 'checkpoints' / 'step_000004'} at step 4" in m for m in stage.log)
    assert not any("continue the data of" in m for m in stage.log)  # one process, as before
    rows = {r["step"]: r for r in stage.metrics if "loss" in r}
    assert rows[4]["tokens"] == first.tokens and rows[5]["tokens"] == second.tokens > first.tokens > 0
    assert rows[4]["loss"] == pytest.approx(first.losses[-1]) and rows[5]["loss"] == pytest.approx(second.losses[-1])
    config = str(Path(stage.cfg.source).resolve())
    metrics = str((stage.out / "metrics.jsonl").resolve())
    (run_id, kind, steps, tokens, loss, ckpt, status, config_path, metrics_path), = stage.first_runs
    assert (run_id, kind, steps, tokens, ckpt, status) == (first.run_id, "full", 4, first.tokens, None, "stopped")
    assert (config_path, metrics_path) == (config, metrics) and loss == pytest.approx(first.final_loss)
    (run_id, kind, steps, tokens, loss, ckpt, status, config_path, metrics_path), = stage.runs()
    assert (run_id, kind, steps, tokens, status) == (first.run_id, "full", 5, second.tokens, "finished")
    assert ckpt == str(second.final_dir.resolve()) and loss == pytest.approx(second.final_loss)
    about = json.loads((second.final_dir / "train_info.json").read_text())
    assert {k: about[k] for k in ("run_id", "stage", "steps", "tokens", "lora", "merged", "init")} == {
        "run_id": first.run_id, "stage": "pretrain", "steps": 5, "tokens": second.tokens, "lora": False,
        "merged": False, "init": None}
    assert about["final_loss"] == pytest.approx(second.final_loss)
    assert not (second.final_dir / "eval").exists()  # no benchmarks named: none run


def test_metric_rows_measure_the_step(stage, batches):
    rows = {r["step"]: r for r in stage.metrics if "loss" in r}
    # the stage's first two steps are the stream's first two micro-batches: tokens count from 0
    assert rows[2]["tokens"] == sum(count_tokens(b.inputs) for b in batches)
    for step, wall in ((2, stage.wall[0]), (4, stage.wall[0]), (5, stage.wall[1])):
        assert 0 <= rows[step]["data_wait_s"] <= rows[step]["step_time_s"] <= wall
    # tokens/s: the step's tokens (the cumulative count's increase) over its time
    r = rows[5]
    assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(r["tokens"] - rows[4]["tokens"], rel=1e-6)
    for r in rows.values():
        assert r["skipped"] == 0  # 256-token rows hold every tiny sample
        assert "max_memory_gb" not in r  # a CUDA figure: never written on CPU
        assert r["grad_norm"] > 0 and r["lr"] > 0 and math.isfinite(r["loss"])


def test_dpo_metrics_are_means_per_pair_in_the_step_and_the_evaluation(tmp_path):
    """DPO's margin and reward accuracy: summed per micro-batch, divided by the step's pairs."""
    from blip3.train.builders import build_stream
    from blip3.train.config import InitConfig
    from blip3.train.loop import evaluate, train_step

    cfg = tiny_stage("dpo", tmp_path, model="tiny", init=InitConfig(), steps=1, eval_batches=2)
    run = _build(cfg)
    model, objective = run.model.train(), run.objective
    torch.manual_seed(1)
    with torch.no_grad():  # adapters start at zero (policy = reference, margin 0): move them
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    batches = [run.stream.next(), run.stream.next()]
    pairs = sum(objective.items(b) for b in batches)

    def summed(bs) -> dict[str, float]:
        out: dict[str, float] = {}
        with torch.no_grad():
            for b in bs:
                for k, v in objective(model, b)[1].items():
                    out[k] = out.get(k, 0.0) + float(v)
        return out

    torch.manual_seed(0)  # the noised-image pairs draw from the RNG: the same draws both ways
    ref = summed(batches)
    torch.manual_seed(0)
    s = train_step(model, objective, batches)
    assert set(s.extras) == {"margin", "reward_acc"} and s.items == pairs > 1
    assert s.extras == pytest.approx({k: v / pairs for k, v in ref.items()}, rel=1e-5)
    assert 0 <= s.extras["reward_acc"] <= 1 and s.extras["margin"] != 0

    state = torch.random.get_rng_state()
    got = evaluate(run)
    torch.random.set_rng_state(state)
    ev = build_stream(cfg, run.manifest, run.processor, run.info, verify="none", seed_offset=1)
    held_out = [ev.next(), ev.next()]
    model.eval()
    ref = summed(held_out)
    model.train()
    n = sum(objective.items(b) for b in held_out)
    assert set(got) == {"eval_loss", "eval_margin", "eval_reward_acc"}
    assert {k: got[f"eval_{k}"] for k in ref} == pytest.approx({k: v / n for k, v in ref.items()}, rel=1e-5)


def test_benchmark_data_is_the_stage_field_then_the_variable_then_eval_data(tmp_path, monkeypatch):
    from blip3.train.loop import _benchmark_data

    cfg = tiny_stage("pretrain", tmp_path, steps=1)
    monkeypatch.delenv("BLIP3_EVAL_DATA", raising=False)
    assert _benchmark_data(cfg, check=False) == Path("eval-data")
    monkeypatch.setenv("BLIP3_EVAL_DATA", str(tmp_path / "env"))
    assert _benchmark_data(cfg, check=False) == tmp_path / "env"
    cfg.benchmarks = replace(cfg.benchmarks, data=str(tmp_path / "field"))
    assert _benchmark_data(cfg, check=False) == tmp_path / "field"
