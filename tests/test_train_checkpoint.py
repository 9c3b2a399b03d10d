"""Checkpoints: sharded safetensors + JSON, nothing unpickled.

Saved by two gloo ranks under FSDP2, a checkpoint resumes in one process with the same loss curve
(the step objective does not depend on the number of ranks, so the curves can be compared); a
crafted pickle never runs; a truncated checkpoint is one clear line."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from blip3.core.errors import UserError
from tests.model_fixtures import build_tiny_model
from tests.train_fixtures import rank_rows, small_trained, tiny_stage, tiny_vars

STEPS_BEFORE, STEPS_AFTER = 2, 2


def _parts(model, tmp: Path):
    """Optimiser, scheduler, objective and the fixed stream of 4-row micro-batches (the same on every rank)."""
    from blip3.model.config import get_config
    from blip3.model.processor import XGenMMProcessor
    from blip3.train.builders import build_objective, build_optimizer, build_stream, resolve_manifest
    from blip3.model.runtime import DistInfo
    from blip3.train.schedule import build_scheduler

    cfg = tiny_stage("pretrain", tmp)
    cfg.batch.micro_batch_size = 4
    tmp.mkdir(parents=True, exist_ok=True)
    processor = XGenMMProcessor.from_config(get_config("tiny"))
    processor.anyres, processor.max_text_tokens = cfg.anyres, cfg.batch.seq_len
    stream = build_stream(cfg, resolve_manifest(cfg, tmp, None, True, tiny_vars()), processor, DistInfo(),
                          verify="none")
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    return opt, build_scheduler(opt, 1, 10, 0.1), build_objective(cfg, get_config("tiny")), stream


def _worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from blip3.model.config import get_config
    from blip3.train.checkpoint import save_checkpoint
    from blip3.model.runtime import DistInfo
    from blip3.train.distributed import parallelize
    from blip3.train.loop import train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        config = get_config("tiny")
        model = parallelize(build_tiny_model(config).train(), ac=False, compile=False, fsdp=True, bf16=False)
        opt, sched, objective, stream = _parts(model, Path(out) / f"data{rank}")
        info = DistInfo(rank=rank, world_size=2)
        losses = []
        for step in range(STEPS_BEFORE + STEPS_AFTER):
            if step == STEPS_BEFORE:
                save_checkpoint(out, step, model=model, optimizer=opt, scheduler=sched,
                                data_state=stream.state_dict(), meta={"tokens": 0})
            batch = rank_rows(stream.next(), rank, 2, config)
            losses.append(train_step(model, objective, [batch], optimizer=opt, scheduler=sched, grad_clip=1.0,
                                     info=info).loss)
        if rank == 0:
            (Path(out) / "losses.json").write_text(json.dumps(losses))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_saved_by_two_ranks_resumed_by_one_with_the_same_loss_curve(tmp_path):
    import torch.multiprocessing as mp

    from blip3.model.config import get_config
    from blip3.train.checkpoint import latest_checkpoint, load_checkpoint
    from blip3.train.loop import train_step

    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ckpt = latest_checkpoint(tmp_path)
    shards = sorted(p.name for p in (ckpt / "state").glob("*.safetensors"))
    assert len(shards) == 2, shards  # one file per rank: really sharded
    assert not list(ckpt.rglob("*.pt")) and not list(ckpt.rglob("*.metadata"))  # no pickle anywhere
    two_ranks = json.loads((tmp_path / "losses.json").read_text())

    # frozen weights come from the (deterministic) init; the trainable ones must come from the checkpoint
    model = build_tiny_model(get_config("tiny")).train()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    opt, sched, objective, stream = _parts(model, tmp_path / "one")
    meta = load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched)
    stream.load_state_dict(meta["data"][0])  # both ranks read the same (one-rank) stream here
    resumed = [train_step(model, objective, [stream.next()], optimizer=opt, scheduler=sched, grad_clip=1.0).loss
               for _ in range(STEPS_AFTER)]
    assert meta["step"] == STEPS_BEFORE and meta["world_size"] == 2
    assert resumed == pytest.approx(two_ranks[STEPS_BEFORE:], rel=1e-5)


class _Boom:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_crafted_pickle_checkpoint_never_runs(tmp_path):
    from blip3.train.checkpoint import load_checkpoint, save_checkpoint

    model, opt, sched = small_trained()
    ckpt = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, data_state={}, meta={})
    marker = tmp_path / "marker"
    payload = pickle.dumps({"x": _Boom(marker)})
    # the old layout's pickles, and a pickle in place of every file the loader reads
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("trainable.pt", "optim.pt", "rank0.pt"):
        (legacy / name).write_bytes(payload)
    with pytest.raises(UserError, match="pickle format, not loaded"):
        load_checkpoint(legacy, model=model, optimizer=opt, scheduler=sched)
    for f in [*(ckpt / "state").glob("*.safetensors"), ckpt / "meta.json", ckpt / "rank0.json"]:
        f.write_bytes(payload)
        with pytest.raises(UserError, match="cannot be read"):
            load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched)
    assert not marker.exists()


def test_a_truncated_checkpoint_is_one_line(tmp_path):
    from blip3.train.checkpoint import load_checkpoint, save_checkpoint

    model, opt, sched = small_trained()
    ckpt = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, data_state={}, meta={})
    shard = next((ckpt / "state").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(UserError) as e:
        load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched)
    msg = str(e.value)
    assert "\n" not in msg and str(ckpt) in msg and "delete it" in msg


def test_an_asynchronous_checkpoint_holds_the_state_of_when_it_started(tmp_path, monkeypatch):
    """The writer thread works on a copy: optimiser steps taken while it writes (in place, on the
    very tensors it was given) do not reach the checkpoint, and nothing is final before `wait()`."""
    import threading

    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from blip3.train.checkpoint import latest_checkpoint, load_checkpoint, start_checkpoint

    trained = threading.Event()  # the writer thread writes only once the steps below are taken
    real_write = HuggingFaceStorageWriter.write_data
    monkeypatch.setattr(HuggingFaceStorageWriter, "write_data",
                        lambda self, *a, **k: trained.wait(30) and real_write(self, *a, **k))
    model, opt, sched = small_trained()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    moment = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    pending = start_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, data_state={"pos": 1},
                               meta={}, asynchronous=True)
    for _ in range(3):  # train on at once
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    assert not torch.equal(model[0].weight, saved["0.weight"])
    trained.set()
    assert latest_checkpoint(tmp_path) is None  # not a checkpoint until finished
    ckpt = pending.wait()
    assert latest_checkpoint(tmp_path) == ckpt and not list(ckpt.parent.glob("*.tmp"))

    fresh, opt2, sched2 = small_trained(seed=1)
    meta = load_checkpoint(ckpt, model=fresh, optimizer=opt2, scheduler=sched2)
    assert meta["data"] == [{"pos": 1}]
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved[k]), k
    for k, v in opt2.state_dict()["state"][0].items():
        assert torch.equal(v, moment[k]), k


@pytest.mark.parametrize("field,value", [("world_size", 0), ("world_size", -3), ("world_size", "2"), ("step", "x"),
                                         ("scheduler", None), ("param_groups", 7), (None, [1, 2])])
def test_a_crafted_meta_json_is_one_line(tmp_path, field, value):
    """meta.json is read from disk like the rest: odd values in it (no rank files to read, a scheduler
    state that is not one, not even an object) are the same one line, never a traceback."""
    from blip3.train.checkpoint import load_checkpoint, save_checkpoint

    model, opt, sched = small_trained()
    ckpt = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, data_state={}, meta={})
    meta = json.loads((ckpt / "meta.json").read_text())
    if field is None:
        meta = value
    else:
        meta[field] = value
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="cannot be read") as e:
        load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched)
    assert "\n" not in str(e.value)


def test_a_crafted_rng_state_is_one_line(tmp_path):
    from blip3.train.checkpoint import load_checkpoint, save_checkpoint

    model, opt, sched = small_trained()
    ckpt = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, data_state={}, meta={})
    (ckpt / "rank0.json").write_text(json.dumps({"data": {}, "rng": {"python": [3, [1, 2], None]}}))
    with pytest.raises(UserError, match="cannot be read"):
        load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched)
