"""The mixture loader: determinism, exact resume, rank/worker splitting, proportions, epochs."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blip3.core.errors import UserError
from blip3.mixture.build import build_manifest
from blip3.mixture.loader import MixtureLoader, _SourceStream
from blip3.mixture.manifest import ManifestSource, ShardRef
from blip3.mixture.tar_index import index_tar
from tests.mixture_fixtures import inline, tiny_sources  # noqa: F401  (fixture)

WEIGHTS = {"caption-ocr": 0.5, "caption-grounding": 0.3, "interleaved": 0.15, "sft": 0.0375, "dpo": 0.0125}


@pytest.fixture(scope="module")
def manifest(tiny_sources):  # noqa: F811
    spec = {"name": "loader-test", "seed": 11, "sources": inline(tiny_sources, WEIGHTS)}
    return build_manifest(spec)


def _ids(samples):
    return [(s["source"], s["key"], s["epoch"]) for s in samples]


def test_deterministic_for_a_seed_and_different_across_seeds(manifest):
    a = MixtureLoader(manifest, shuffle_buffer=16).take(300)
    b = MixtureLoader(manifest, shuffle_buffer=16).take(300)
    assert _ids(a) == _ids(b)
    assert [s["images"] for s in a] == [s["images"] for s in b]
    c = MixtureLoader(manifest, seed=12, shuffle_buffer=16).take(300)
    assert _ids(a) != _ids(c)
    ca, cc = Counter(s["source"] for s in a), Counter(s["source"] for s in c)
    assert all(abs(ca[k] - cc[k]) <= 1 for k in WEIGHTS)  # same proportions, to one sample


def test_samples_are_decoded_per_kind(manifest):
    by_kind = {s["kind"]: s for s in MixtureLoader(manifest).take(200)}
    assert set(by_kind) == {"caption", "interleaved", "sft", "dpo"}
    cap = by_kind["caption"]
    assert cap["txt"] and list(cap["images"]) == ["jpg"] and cap["images"]["jpg"][:2] == b"\xff\xd8"
    doc = by_kind["interleaved"]
    assert sorted(doc["images"]) == sorted(n for n in doc["json"]["images"] if n)
    assert "conversations" in by_kind["sft"]["json"] and "chosen" in by_kind["dpo"]["json"]


def test_exact_resume_from_a_json_state(manifest):
    first = MixtureLoader(manifest, shuffle_buffer=16)
    first.take(157)  # mid-block for every source
    state = json.loads(json.dumps(first.state_dict()))  # small, plain data
    expected = first.take(250)
    resumed = MixtureLoader(manifest, shuffle_buffer=16)
    resumed.load_state_dict(state)
    got = resumed.take(250)
    assert _ids(got) == _ids(expected)
    assert [s["images"] for s in got] == [s["images"] for s in expected]


def test_resume_refuses_a_different_seed(manifest):
    state = MixtureLoader(manifest).state_dict()
    with pytest.raises(UserError, match="seed"):
        MixtureLoader(manifest, seed=99).load_state_dict(state)


@pytest.mark.parametrize("other, field", [({"shuffle_buffer": 8}, "shuffle_buffer"), ({"rank": 1}, "rank")])
def test_resume_refuses_another_shuffle_buffer_or_rank(manifest, other, field):
    first = MixtureLoader(manifest, shuffle_buffer=16, world_size=2)
    first.take(5)
    state = first.state_dict()
    assert state["shuffle_buffer"] == 16
    resumed = MixtureLoader(manifest, **{"shuffle_buffer": 16, "world_size": 2, **other})
    with pytest.raises(UserError, match=f"loader state has {field}=") as e:
        resumed.load_state_dict(state)
    assert e.value.field == field


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_through_dataloader_workers(manifest, workers):
    loader = MixtureLoader(manifest, shuffle_buffer=8, decode=False).dataloader(4, num_workers=workers)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    expected = [_ids(next(it)) for _ in range(6)]
    del it
    again = MixtureLoader(manifest, shuffle_buffer=8, decode=False).dataloader(4, num_workers=workers)
    again.load_state_dict(state)
    it2 = iter(again)
    assert [_ids(next(it2)) for _ in range(6)] == expected
    assert set(state["counts"]) == ({"0", "1"} if workers else {"0"})
    assert all(isinstance(s, dict) and "source" in s for s in next(it2))  # the state tag stays internal


def test_ranks_and_workers_cover_every_sample_once_per_epoch(manifest):
    """2 ranks x 2 DataLoader workers = 4 slots: epoch 0 of each source is read exactly once overall."""
    seen: dict[str, list[str]] = {s.name: [] for s in manifest.sources}
    per_slot = 420  # enough for every slot to finish epoch 0 of the three main sources
    for rank in range(2):
        dl = MixtureLoader(manifest, rank=rank, world_size=2, shuffle_buffer=8, decode=False).dataloader(
            10, num_workers=2)
        it = iter(dl)
        for _ in range(2 * per_slot // 10):
            for s in next(it):
                if s["epoch"] == 0:
                    seen[s["source"]].append(s["key"])
        del it
    for src in manifest.sources:
        if src.name in ("sft", "dpo"):
            continue  # too rare to finish an epoch in 420 samples per slot; covered by the index test below
        all_keys = [e.key for sh in src.shards for e in index_tar(sh.path)]
        assert sorted(seen[src.name]) == sorted(all_keys), src.name


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 120), shards=st.integers(1, 6), slots=st.integers(1, 9))
def test_slot_split_is_a_partition_of_each_epoch(n, shards, slots):
    shards = min(shards, n)
    sizes = [n // shards + (1 if i < n % shards else 0) for i in range(shards)]
    src = ManifestSource("s", "caption", 1.0, [ShardRef(f"/x/{i}.tar", "0" * 64, 1, k) for i, k in enumerate(sizes)],
                         n, 0, 1.0)
    for epoch in range(3):
        got = []
        for slot in range(slots):
            stream = _SourceStream(src, 5, slot, slots, shuffle_buffer=4)
            for local in range(3 * n + slots):
                e, shard, idx = stream.locate(local)
                if e == epoch:
                    got.append((shard, idx))
        assert sorted(got) == sorted((i, j) for i, k in enumerate(sizes) for j in range(k))


def test_proportions_within_one_percent_over_100k(manifest):
    counts = Counter(s["source"] for s in MixtureLoader(manifest, decode=False).take(100_000))
    for name, w in WEIGHTS.items():
        assert abs(counts[name] / 100_000 - w) / w < 0.01, (name, counts[name])


def test_up_weighted_small_source_runs_epochs_of_permutations(manifest):
    samples = [s for s in MixtureLoader(manifest, shuffle_buffer=8, decode=False).take(2000)
               if s["source"] == "caption-ocr"]
    by_epoch: dict[int, list[str]] = {}
    for s in samples:
        by_epoch.setdefault(s["epoch"], []).append(s["key"])
    src = manifest.source("caption-ocr")
    full = sorted(e.key for sh in src.shards for e in index_tar(sh.path))
    complete = [e for e in by_epoch if e < max(by_epoch)]
    assert len(complete) >= 10
    for e in complete:
        assert sorted(by_epoch[e]) == full
    assert by_epoch[0] != by_epoch[1]  # reshuffled per epoch


def test_shuffle_is_bounded_by_the_buffer(manifest):
    plain = [s["key"] for s in MixtureLoader(manifest, shuffle_buffer=1, decode=False).take(600)
             if s["source"] == "caption-ocr"]
    shuffled = [s["key"] for s in MixtureLoader(manifest, shuffle_buffer=8, decode=False).take(600)
                if s["source"] == "caption-ocr"]
    assert plain != shuffled
    for b in range(0, 240, 8):  # each block of 8 is a permutation of the same 8 stream positions
        assert sorted(plain[b:b + 8]) == sorted(shuffled[b:b + 8])


def test_a_sample_is_read_only_when_it_is_emitted(manifest, monkeypatch):
    """With two slots each reads its share and nothing more: no block is read ahead, so stopping
    early (or a worker's share of a short run) costs exactly the samples delivered."""
    import blip3.mixture.loader as loader_mod

    reads = []
    real = loader_mod.read_members
    monkeypatch.setattr(loader_mod, "read_members", lambda f, entry: reads.append(entry.key) or real(f, entry))
    for rank in (0, 1):
        reads.clear()
        got = MixtureLoader(manifest, rank=rank, world_size=2, shuffle_buffer=64).take(10)
        assert reads == [s["key"] for s in got]


def test_a_plain_torch_dataloader_with_transform_or_collate(manifest):
    """The loader fits a standard torch loop: a transform per sample (run in the workers), the
    default collate, or `collate_samples` for raw dicts."""
    import torch
    from torch.utils.data import DataLoader

    from blip3.mixture.loader import collate_samples

    keys = [s["key"] for s in MixtureLoader(manifest, shuffle_buffer=8).take(8)]
    to_len = lambda s: torch.tensor(len(s["key"]))  # noqa: E731
    batch = next(iter(DataLoader(MixtureLoader(manifest, shuffle_buffer=8, transform=to_len), batch_size=8)))
    assert batch.tolist() == [len(k) for k in keys]
    raw = next(iter(DataLoader(MixtureLoader(manifest, shuffle_buffer=8), batch_size=8, collate_fn=collate_samples)))
    assert [s["key"] for s in raw] == keys and all(s["images"] is not None for s in raw if s["kind"] == "caption")


def test_construction_trusts_the_recorded_sha256(manifest, monkeypatch):
    """No shard is re-hashed unless asked (`verify="sha256"`): construction reads no shard bytes."""
    from blip3.core.storage import Location

    calls = []
    real = Location.sha256
    monkeypatch.setattr(Location, "sha256", lambda *a, **k: calls.append(a) or real(*a, **k))
    MixtureLoader(manifest)
    assert calls == []
    MixtureLoader(manifest, verify="sha256")
    assert calls  # asked for: every shard hashed


def _rank_keys(rank: int, init_file: str, path: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        loader = MixtureLoader(path, verify="none")  # rank and world size from the process group
        keys = [s["key"] for s in loader.take(16)]
        json.dump({"rank": loader.rank, "world": loader.world_size, "keys": keys}, open(f"{out}/{rank}.json", "w"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_rank_and_world_size_come_from_torch_distributed(manifest, tmp_path):
    import torch.multiprocessing as mp

    from blip3.mixture.manifest import write_manifest

    path = tmp_path / "m.yaml"
    write_manifest(manifest, path)
    mp.spawn(_rank_keys, args=(str(tmp_path / "init"), str(path), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert [(g["rank"], g["world"]) for g in got] == [(0, 2), (1, 2)]
    assert not set(got[0]["keys"]) & set(got[1]["keys"])
    want = [[s["key"] for s in MixtureLoader(manifest, rank=r, world_size=2).take(16)] for r in (0, 1)]
    assert [g["keys"] for g in got] == want
