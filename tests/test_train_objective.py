"""The step's objective: chunked log-probs equal the dense loss, one mean whatever the split of the
step into micro-batches, accumulation and ranks, the stage seed orders the data, a non-finite loss
stops the stage and keeps the last good checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from blip3.core.errors import UserError
from blip3.train.config import InitConfig
from tests.model_fixtures import build_tiny_model
from tests.train_fixtures import rank_rows, tiny_stage, tiny_vars

os.environ.setdefault("BLIP3_NO_PROGRESS", "1")


def _stream(stage: str, tmp: Path, micro_batch_size: int, seed: int = 0):
    """A real BatchStream of a tiny stage's mixture, built the way the trainer builds it."""
    from blip3.model.config import get_config
    from blip3.model.processor import XGenMMProcessor
    from blip3.train.builders import build_stream, resolve_manifest
    from blip3.model.runtime import DistInfo

    # the tiny preset from scratch, whatever the stage's init.path says (the stream only needs the
    # model's config, and the tests build that model themselves)
    cfg = tiny_stage(stage, tmp, seed=seed, model="tiny", init=InitConfig())
    cfg.batch.micro_batch_size = micro_batch_size
    tmp.mkdir(parents=True, exist_ok=True)
    manifest = resolve_manifest(cfg, tmp, None, True, tiny_vars())
    processor = XGenMMProcessor.from_config(get_config("tiny"))
    processor.anyres = cfg.anyres
    processor.max_text_tokens = cfg.batch.seq_len
    return build_stream(cfg, manifest, processor, DistInfo(), verify="none")


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])


def _objective(stage: str, model):
    from blip3.train.builders import build_objective

    return build_objective(tiny_stage(stage, Path("unused")), model.config)


@pytest.mark.parametrize("head_bias", [False, True], ids=["head", "biased-head"])
def test_chunked_token_logps_equal_the_dense_loss_and_its_gradients(tmp_path, monkeypatch, head_bias):
    """Chunks of 37 tokens (not a divisor of anything) against transformers' own mean loss."""
    from dataclasses import replace

    from blip3.model import loss as L
    from blip3.model.config import get_config

    model = build_tiny_model(replace(get_config("tiny"), lm_head_bias=head_bias)).train()
    assert (model.lang_model.lm_head.bias is not None) == head_bias
    batch = _stream("pretrain", tmp_path, 2).next()
    inputs = {**batch.inputs, "use_cache": False}
    model.zero_grad()
    hf = model(**inputs).loss
    hf.backward()
    g_hf = _grads(model)

    monkeypatch.setattr(L, "DEFAULT_CHUNK", 37)
    model.zero_grad()
    out = model(**inputs, token_logps="chunked")
    chunked = -out.logps.sum() / out.mask.sum()
    chunked.backward()
    g_chunked = _grads(model)
    model.zero_grad()
    dense_out = model(**inputs, token_logps="dense")
    dense = -dense_out.logps.sum() / dense_out.mask.sum()
    dense.backward()
    g_dense = _grads(model)
    assert chunked.item() == pytest.approx(hf.item(), rel=1e-5)
    assert dense.item() == pytest.approx(hf.item(), rel=1e-5)
    assert torch.allclose(g_chunked, g_hf, rtol=1e-4, atol=1e-6)
    assert torch.allclose(g_dense, g_hf, rtol=1e-4, atol=1e-6)
    # per-token values too (what DPO sums per sequence)
    assert torch.allclose(out.logps, dense_out.logps, atol=1e-5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
def test_micro_batch_4_equals_2_x_accumulation_2(tmp_path, stage):
    """The same samples as one micro-batch of 4 or two of 2: the same gradients (one objective)."""
    from blip3.model.config import get_config
    from blip3.train.builders import attach_lora
    from blip3.train.loop import train_step

    config = get_config("tiny")
    model = build_tiny_model(config).train()
    if stage == "dpo":
        model = attach_lora(model, tiny_stage("dpo", tmp_path))
    objective = _objective(stage, model)
    torch.manual_seed(0)  # dpo's noised-image pairs draw from the RNG: the same draws both ways
    one = [_stream(stage, tmp_path / "a", 4).next()]
    torch.manual_seed(0)
    s2 = _stream(stage, tmp_path / "b", 2)
    two = [s2.next(), s2.next()]
    model.zero_grad()
    a = train_step(model, objective, one)
    g1 = _grads(model)
    model.zero_grad()
    b = train_step(model, objective, two)
    g2 = _grads(model)
    assert a.items == b.items > 0
    assert a.loss == pytest.approx(b.loss, rel=1e-6)
    assert _rel(g2, g1) < 1e-5


def _rank_main(rank: int, world: int, init_file: str, out_dir: str, tmp: str) -> None:
    """One gloo rank under FSDP2: its half (2 rows) of the same 4 packed rows."""
    import torch.distributed as dist

    from blip3.model.config import get_config
    from blip3.model.runtime import DistInfo
    from blip3.train.distributed import parallelize
    from blip3.train.loop import train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        config = get_config("tiny")
        model = build_tiny_model(config).train()
        objective = _objective("pretrain", model)
        batch = _stream("pretrain", Path(tmp) / f"r{rank}", 4).next()
        half = rank_rows(batch, rank, world, config)
        model = parallelize(model, ac=False, compile=False, fsdp=True, bf16=False)
        stats = train_step(model, objective, [half], info=DistInfo(rank=rank, world_size=world))
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        if rank == 0:
            torch.save({"grads": grads, "loss": stats.loss, "items": stats.items}, Path(out_dir) / "ranks.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_micro_batch_of_4(tmp_path):
    import torch.multiprocessing as mp

    from blip3.model.config import get_config
    from blip3.train.loop import train_step

    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "ranks.pt", weights_only=True)
    model = build_tiny_model(get_config("tiny")).train()
    ref = train_step(model, _objective("pretrain", model), [_stream("pretrain", tmp_path / "one", 4).next()])
    assert got["items"] == ref.items and got["loss"] == pytest.approx(ref.loss, rel=1e-6)
    mine = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert mine.keys() == got["grads"].keys()
    g_ref = torch.cat([mine[k].flatten() for k in sorted(mine)])
    g_dist = torch.cat([got["grads"][k].flatten() for k in sorted(mine)])
    assert _rel(g_dist, g_ref) < 1e-5


def test_the_stage_seed_orders_the_data(tmp_path):
    keys = lambda stream: [s["key"] for s in stream.loader.take(12)]  # noqa: E731
    a = keys(_stream("sft", tmp_path / "a", 2, seed=0))
    b = keys(_stream("sft", tmp_path / "b", 2, seed=0))
    c = keys(_stream("sft", tmp_path / "c", 2, seed=1))
    assert a == b and a != c


def test_the_trainer_does_not_generate_data(tmp_path, monkeypatch):
    """Data is prepared by the CLI's explicit step; a stage run without it names the variable."""
    from blip3.train.loop import train_stage
    from blip3.train.prepare import TINY_VAR, prepare_data

    monkeypatch.delenv(TINY_VAR, raising=False)
    cfg = tiny_stage("sft", tmp_path, steps=1, checkpoint_every=0, eval_every=0, model="tiny", init=InitConfig())
    with pytest.raises(UserError, match=TINY_VAR):
        train_stage(cfg, record=False)
    assert prepare_data([cfg]) == tiny_vars()
    assert TINY_VAR not in os.environ


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(tmp_path):
    from blip3.core.catalog import Catalog
    from blip3.train.loop import NonFiniteLoss, train_stage

    cfg = tiny_stage("sft", tmp_path, steps=6, checkpoint_every=1, eval_every=0, model="tiny", init=InitConfig())
    cfg.optim.lr, cfg.optim.grad_clip, cfg.optim.warmup_steps = 1e30, 0.0, 0  # weights blow up after step 1
    db = tmp_path / "c.duckdb"
    with pytest.raises(NonFiniteLoss, match="loss became") as e:
        train_stage(cfg, record=True, db=db, data_vars=tiny_vars())
    assert "\n" not in str(e.value)
    out = Path(cfg.output_dir)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    failed_at = int(str(e.value).split("step ")[1].split(":")[0])
    assert ckpts and ckpts[-1] == f"step_{failed_at - 1:06d}"  # nothing saved from the bad step
    assert not (out / "final").exists()
    with Catalog(db) as cat:
        status, loss = cat.con.execute("SELECT status, final_loss FROM runs").fetchone()
    assert status.startswith("failed: non-finite loss") and loss is None
