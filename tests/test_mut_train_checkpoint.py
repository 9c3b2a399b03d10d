"""Checkpoints on disk: what is kept and pruned, what a resume reads back, and how each kind of
damage becomes one clear line (real files through torch.distributed.checkpoint, no doubles)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from blip3.core.errors import UserError
from blip3.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from blip3.train.schedule import build_scheduler
from tests.train_fixtures import small_trained


def _save(out: Path, step: int, model, opt, sched, **kw) -> Path:
    return save_checkpoint(out, step, model=model, optimizer=opt, scheduler=sched, data_state={"pos": step},
                           meta={}, **kw)


def test_no_checkpoint_yet_is_none(tmp_path):
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_000007").write_text("a file, not a checkpoint")
    (tmp_path / "checkpoints" / "notes").mkdir()
    assert latest_checkpoint(tmp_path) is None


def test_the_trainer_default_keeps_the_newest_two(tmp_path):
    model, opt, sched = small_trained()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, opt, sched)  # no `keep`: the trainer's default
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]


def test_keep_one_and_keep_zero(tmp_path):
    model, opt, sched = small_trained()
    for step in (1, 2, 3):
        _save(tmp_path / "one", step, model, opt, sched, keep=1)
        _save(tmp_path / "all", step, model, opt, sched, keep=0)  # 0: never prune
    assert [p.name for p in list_checkpoints(tmp_path / "one")] == ["step_000003"]
    assert len(list_checkpoints(tmp_path / "all")) == 3


def test_steps_sort_by_number_not_by_name(tmp_path):
    model, opt, sched = small_trained()
    for step in (999_999, 1_000_001, 5):
        _save(tmp_path, step, model, opt, sched, keep=0)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000005", "step_999999", "step_1000001"]
    assert latest_checkpoint(tmp_path).name == "step_1000001"


def test_saving_a_step_again_replaces_it_and_a_stale_tmp_is_cleared(tmp_path):
    model, opt, sched = small_trained()
    first = _save(tmp_path, 2, model, opt, sched)
    stale = tmp_path / "checkpoints" / "step_000003.tmp"
    stale.mkdir()
    (stale / "junk").write_text("left by a killed run")
    with torch.no_grad():
        model[1].weight.add_(1.0)
    again = _save(tmp_path, 2, model, opt, sched)
    assert again == first
    third = _save(tmp_path, 3, model, opt, sched)
    assert not (third / "junk").exists() and not stale.exists()
    fresh, opt2, sched2 = small_trained(seed=3)
    load_checkpoint(again, model=fresh, optimizer=opt2, scheduler=sched2)
    assert torch.equal(fresh[1].weight, model[1].weight)  # the second save of step 2, not the first


def test_one_process_resumes_a_two_rank_checkpoint_with_rank_zeros_rng_and_every_ranks_data(tmp_path):
    """A checkpoint written by two ranks (meta says so; rank1.json holds the other rank's RNG and
    data position) is resumed by one process: rank 0's RNG, both ranks' data positions in order."""
    from blip3.train.checkpoint import rng_state

    model, opt, sched = small_trained()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, data_state={"pos": 10}, meta={})
    want = (random.random(), float(np.random.rand()), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    (ckpt / "rank1.json").write_text(json.dumps({"rng": rng_state(), "data": {"pos": 11}}))
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "world_size": 2}))
    fresh, opt2, sched2 = small_trained(seed=4)
    got = load_checkpoint(ckpt, model=fresh, optimizer=opt2, scheduler=sched2)
    assert got["data"] == [{"pos": 10}, {"pos": 11}]
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == want


def test_a_checkpoint_without_world_size_is_one_rank(tmp_path):
    """Checkpoints written before the world size was recorded load as written by one rank."""
    model, opt, sched = small_trained()
    ckpt = _save(tmp_path, 1, model, opt, sched)
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["world_size"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    fresh, opt2, sched2 = small_trained(seed=4)
    assert load_checkpoint(ckpt, model=fresh, optimizer=opt2, scheduler=sched2)["data"] == [{"pos": 1}]


def test_a_folder_without_state_is_not_a_checkpoint_and_no_pickle_is_mentioned(tmp_path):
    model, opt, sched = small_trained()
    with pytest.raises(UserError) as e:
        load_checkpoint(tmp_path, model=model, optimizer=opt, scheduler=sched)
    assert "not a checkpoint" in str(e.value) and "pickle" not in str(e.value)


def _damage(kind: str, ckpt: Path) -> str:
    """Damage `ckpt` one way; returns the exception type name the reader meets."""
    if kind == "missing rank file":
        (ckpt / "rank0.json").unlink()
        return "FileNotFoundError"
    if kind == "rank file not an object":
        (ckpt / "rank0.json").write_text("[]")
        return "TypeError"
    if kind == "rank file without data":
        (ckpt / "rank0.json").write_text("{}")
        return "KeyError"
    if kind == "meta not json":
        (ckpt / "meta.json").write_text("{")
        return "JSONDecodeError"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing rank file", "rank file not an object", "rank file without data",
                                  "meta not json"])
def test_each_kind_of_damage_is_one_line_naming_the_checkpoint(tmp_path, kind):
    model, opt, sched = small_trained()
    ckpt = _save(tmp_path, 1, model, opt, sched)
    error = _damage(kind, ckpt)
    with pytest.raises(UserError) as e:
        load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched)
    msg = str(e.value)
    assert f"({error}" in msg and "\n" not in msg and str(ckpt) in msg and "delete it" in msg


def test_a_checkpoint_of_another_model_is_one_line(tmp_path):
    """Shapes that do not match the model being resumed: the reader's error, one line."""
    model, opt, sched = small_trained()
    ckpt = _save(tmp_path, 1, model, opt, sched)
    torch.manual_seed(0)
    other = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    opt2 = torch.optim.AdamW(other.parameters(), lr=0.1)
    with pytest.raises(UserError, match="cannot be read") as e:
        load_checkpoint(ckpt, model=other, optimizer=opt2, scheduler=build_scheduler(opt2, 1, 5, 0.0))
    assert "\n" not in str(e.value)


def test_a_long_reader_error_is_cut_at_200_characters(tmp_path):
    model, opt, sched = small_trained()
    deep = tmp_path / ("d" * 120) / ("e" * 120)
    ckpt = _save(deep, 1, model, opt, sched)
    (ckpt / "rank0.json").unlink()
    try:
        (ckpt / "rank0.json").read_text()
    except OSError as err:
        first = str(err)
    assert len(first) > 201
    with pytest.raises(UserError) as e:
        load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched)
    assert f"(FileNotFoundError: {first[:200]});" in str(e.value)


@pytest.mark.parametrize("rank, rng_of", [(1, 1), (2, 1)])
def test_each_resuming_rank_takes_its_own_rng_and_extra_ranks_the_last_ones(tmp_path, monkeypatch, rank, rng_of):
    """Rank r of the resumed run restores the RNG saved by rank r; a run resumed on more ranks than
    saved it gives the extra ranks the last saved rank's. (The rank is set by hand: the real
    two-process path is `test_saved_by_two_ranks_resumed_by_one_with_the_same_loss_curve`.)"""
    from blip3.train import checkpoint
    from blip3.train.checkpoint import rng_state

    model, opt, sched = small_trained()
    ckpt = _save(tmp_path, 1, model, opt, sched)
    draws = {}
    for r, seed in ((0, 10), (1, 11)):
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
        (ckpt / f"rank{r}.json").write_text(json.dumps({"rng": rng_state(), "data": {"pos": r}}))
        draws[r] = (random.random(), float(np.random.rand()), torch.rand(1).item())
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "world_size": 2}))
    monkeypatch.setattr(checkpoint, "_rank", lambda: rank)
    fresh, opt2, sched2 = small_trained(seed=4)
    assert load_checkpoint(ckpt, model=fresh, optimizer=opt2, scheduler=sched2)["data"] == [{"pos": 0}, {"pos": 1}]
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == draws[rng_of]


def test_a_garbage_shard_reports_the_readers_headline_not_its_traceback(tmp_path):
    """The reader's error spans many lines (its workers' tracebacks); the one line keeps the first."""
    model, opt, sched = small_trained()
    ckpt = _save(tmp_path, 1, model, opt, sched)
    for shard in (ckpt / "state").glob("*.safetensors"):
        shard.write_bytes(b"x" * 10)
    with pytest.raises(UserError) as e:
        load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched)
    msg = str(e.value)
    assert "(CheckpointException: CheckpointException ranks:" in msg and "\n" not in msg


def test_a_checkpoint_is_written_by_the_caller_unless_asked_to_write_in_the_background(tmp_path, monkeypatch):
    """By default the tensors are on disk when `start_checkpoint` returns (written by the calling
    thread); only `asynchronous=True` hands them to a writer thread."""
    import threading

    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from blip3.train.checkpoint import start_checkpoint

    writers = []
    real_write = HuggingFaceStorageWriter.write_data
    monkeypatch.setattr(HuggingFaceStorageWriter, "write_data",
                        lambda self, *a, **k: writers.append(threading.current_thread()) or real_write(self, *a, **k))
    model, opt, sched = small_trained()
    pending = start_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, data_state={}, meta={})
    assert writers == [threading.current_thread()]
    pending.wait()
    start_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched, data_state={}, meta={},
                     asynchronous=True).wait()
    assert len(writers) == 2 and writers[1] is not threading.current_thread()
