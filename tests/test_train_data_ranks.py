"""The data position across a change of world size: a run resumed on fewer processes plays on
the data ranks of the run it continues (`train.data.DataRanks`), sample for sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blip3.core.errors import UserError
from tests.train_fixtures import tiny_stage, tiny_vars


@pytest.fixture(scope="module")
def make(tmp_path_factory):
    """`make(rank, world)`: the BatchStream the trainer builds for one data rank of the tiny pretrain stage."""
    from blip3.model.config import get_config
    from blip3.model.processor import XGenMMProcessor
    from blip3.train.builders import build_stream, resolve_manifest
    from blip3.model.runtime import DistInfo

    tmp = tmp_path_factory.mktemp("ranks")
    cfg = tiny_stage("pretrain", tmp)
    manifest = resolve_manifest(cfg, tmp, None, True, tiny_vars())
    processor = XGenMMProcessor.from_config(get_config("tiny"))
    processor.anyres, processor.max_text_tokens = cfg.anyres, cfg.batch.seq_len
    return lambda rank, world: build_stream(cfg, manifest, processor, DistInfo(rank=rank, world_size=world),
                                            verify="none")


def _saved_by_two(make, steps: int):
    """Two processes' DataRanks after `steps` micro-batches each, their states as a checkpoint
    holds them (through JSON), and the micro-batches each would read next."""
    from blip3.train.data import DataRanks

    ranks = [DataRanks(make, r, 2) for r in (0, 1)]
    for _ in range(steps):
        for dr in ranks:
            dr.next()
    states = [json.loads(json.dumps(dr.state_dict())) for dr in ranks]
    after = [[dr.next().inputs["input_ids"] for _ in range(2)] for dr in ranks]
    return states, after


def test_one_process_continues_the_data_of_two_ranks(make):
    from blip3.train.data import DataRanks

    states, (r0, r1) = _saved_by_two(make, steps=3)
    one = DataRanks(make, 0, 1, grad_accum=2)
    one.load_state_dict(states)
    assert one.data_ranks == [0, 1] and one.data_world_size == 2
    got = [one.next().inputs["input_ids"] for _ in range(4)]
    # a step of grad_accum 2 on one process holds the micro-batches rank 0 and rank 1 would have used
    for mine, want in zip(got, [r0[0], r1[0], r0[1], r1[1]]):
        assert torch.equal(mine, want)
    assert not torch.equal(r0[0], r1[0])  # the two ranks really read different samples
    # and it saves as the two ranks it plays: a later resume on two processes takes it from there
    again = one.state_dict()
    assert again["data_world_size"] == 2 and sorted(again["ranks"]) == ["0", "1"]


def test_the_same_world_size_resumes_each_rank_where_it_stopped(make):
    from blip3.train.data import DataRanks

    states, after = _saved_by_two(make, steps=2)
    for rank in (0, 1):
        dr = DataRanks(make, rank, 2)
        dr.load_state_dict(states)
        assert dr.data_ranks == [rank]
        assert torch.equal(dr.next().inputs["input_ids"], after[rank][0])


def test_a_resume_the_data_ranks_cannot_carry_is_one_line(make):
    from blip3.train.data import DataRanks

    states, _ = _saved_by_two(make, steps=1)
    with pytest.raises(UserError, match="divides 2, not 3"):
        DataRanks(make, 0, 3).load_state_dict(states)
    with pytest.raises(UserError, match="ranks \\[0\\] of 2"):
        DataRanks(make, 0, 1, grad_accum=2).load_state_dict(states[:1])  # a rank's file missing
    with pytest.raises(UserError, match="grad_accum must be a multiple of 2") as e:
        DataRanks(make, 0, 1, grad_accum=3).load_state_dict(states)  # a step would straddle the two ranks
    assert "\n" not in str(e.value)
    mid = DataRanks(make, 0, 1, grad_accum=2)
    mid.load_state_dict(states)
    mid.next()  # half a step of the two ranks
    with pytest.raises(UserError, match="middle of a step"):
        DataRanks(make, 0, 2).load_state_dict([mid.state_dict()])  # saved by one process


@pytest.mark.parametrize("damage", ["zero-ranks", "turn-out-of-range", "turn-text", "ranks-a-list", "not-objects",
                                    "no-states"])
def test_a_crafted_data_position_is_one_line(make, damage):
    """The data position comes from the checkpoint's rank files: odd values in them are one
    UserError, never a ZeroDivisionError or an IndexError at the next micro-batch."""
    from blip3.train.data import DataRanks

    states, _ = _saved_by_two(make, steps=1)
    if damage == "zero-ranks":
        for st in states:
            st["data_world_size"] = 0
    elif damage == "turn-out-of-range":
        states[0]["turn"] = 5
    elif damage == "turn-text":
        states[0]["turn"] = "x"
    elif damage == "ranks-a-list":
        states[0]["ranks"] = [1, 2]
    elif damage == "not-objects":
        states = [[1], [2]]
    else:
        states = []
    dr = DataRanks(make, 0, 2)
    with pytest.raises(UserError) as e:
        dr.load_state_dict(states)
    assert "\n" not in str(e.value)
