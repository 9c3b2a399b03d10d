"""Unit checks of the trainer's parts: schedule, metrics, checkpoints, LoRA merge, packing, MFU."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from blip3.train.schedule import WarmupCosine, build_scheduler


def test_warmup_then_cosine_to_floor():
    f = WarmupCosine(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    vals = [f(s) for s in range(4, 15)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_scheduler_state_round_trips_through_json():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sch = build_scheduler(opt, 2, 10, 0.0)
    for _ in range(3):
        opt.step()
        sch.step()
    state = json.loads(json.dumps(sch.state_dict()))
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sch2 = build_scheduler(opt2, 2, 10, 0.0)
    sch2.load_state_dict(state)
    assert sch2.get_last_lr() == sch.get_last_lr()
    opt.step(), sch.step(), opt2.step(), sch2.step()
    assert sch2.get_last_lr() == pytest.approx(sch.get_last_lr())


def test_metrics_resume_drops_lines_after_the_checkpoint(tmp_path):
    from blip3.train.metrics import MetricsWriter, read_metrics

    w = MetricsWriter(tmp_path)
    for s in range(1, 6):
        w.log(s, {"loss": float(s)})
    w.close()
    MetricsWriter(tmp_path, resume_from_step=3).log(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    MetricsWriter(tmp_path)  # a fresh (not resumed) run starts a new file
    assert read_metrics(tmp_path) == []


def test_checkpoint_round_trip_and_keep(tmp_path):
    from blip3.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # frozen: rebuilt from init, not saved
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sch = build_scheduler(opt, 1, 5, 0.0)
    model(torch.randn(3, 4)).sum().backward()
    opt.step(), sch.step()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sch, data_state={"pos": step},
                        meta={"tokens": 10 * step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    ckpt = latest_checkpoint(tmp_path)
    from safetensors import safe_open

    saved = {k for f in (ckpt / "state").glob("*.safetensors") for k in safe_open(str(f), "pt").keys()}
    assert {k for k in saved if k.startswith("model/")} == {"model/1.weight", "model/1.bias"}
    expect_rand = (random.random(), np.random.rand(), torch.rand(1))

    torch.manual_seed(5)
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model2[0].load_state_dict(model[0].state_dict())
    model2[0].requires_grad_(False)
    opt2 = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=0.1)
    sch2 = build_scheduler(opt2, 1, 5, 0.0)
    meta = load_checkpoint(ckpt, model=model2, optimizer=opt2, scheduler=sch2)
    assert meta["step"] == 3 and meta["tokens"] == 30 and meta["data"] == [{"pos": 3}]
    assert torch.equal(model2[1].weight, model[1].weight)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == (expect_rand[0], expect_rand[1], expect_rand[2])


def test_lora_merge_equals_peft_merge_and_unload():
    from peft import LoraConfig, get_peft_model
    from transformers import Phi3Config, Phi3ForCausalLM

    from blip3.train.export import _split_lora, merge_lora

    torch.manual_seed(0)
    base = Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, pad_token_id=0))
    wrapped = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_()
    base_sd, adapter = _split_lora(dict(wrapped.state_dict()))
    ours = merge_lora(base_sd, adapter, 8 / 4)
    ref = wrapped.merge_and_unload().state_dict()
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.allclose(ours[k], ref[k], atol=1e-6), k


class _TinyProcessor:
    """Only what BatchStream's packing needs: `pack` as the real processor lays rows out."""

    def pack(self, samples, seq_len):
        from blip3.model.processor import XGenMMProcessor

        return XGenMMProcessor.pack(self, samples, seq_len)

    pad_id = 0

    def _images_batch(self, samples):
        return {}


class _ListLoader:
    def __init__(self, lengths):
        self.lengths, self.pos = lengths, 0

    def __iter__(self):
        while True:
            n = self.lengths[self.pos % len(self.lengths)]
            self.pos += 1
            yield n

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def test_packing_fills_rows_and_carries_the_overflow(monkeypatch):
    from blip3.model.processor import Encoded
    from blip3.train import data

    monkeypatch.setattr(data, "encode_sample", lambda proc, n: Encoded(list(range(1, n + 1)), list(range(1, n + 1))))
    stream = data.BatchStream(_ListLoader([5, 4, 6, 3, 12, 7]), _TinyProcessor(), stage="pretrain",
                              micro_batch_size=2, seq_len=10, pack=True)
    b = stream.next()
    seg = b.inputs["segment_ids"]
    assert seg.tolist() == [[1] * 5 + [2] * 4 + [0], [1] * 6 + [2] * 3 + [0]]
    assert b.skipped == 1  # the 12-token sample is longer than a row: dropped and counted
    assert [len(e) for e, _ in stream._pending] == [7]  # the overflow waits for the next batch
    assert stream.state_dict() == {"loader": {"pos": 5}}  # resume re-reads the overflowing sample
    state = stream.state_dict()
    nxt = stream.next()
    assert nxt.inputs["segment_ids"].tolist()[0] == [1] * 7 + [0] * 3
    stream.load_state_dict(state)
    again = stream.next()
    assert torch.equal(again.inputs["input_ids"], nxt.inputs["input_ids"])  # exact resume incl. pending


def test_stage_kinds_are_checked():
    from types import SimpleNamespace

    from blip3.core.errors import UserError
    from blip3.train.data import check_kinds

    m = SimpleNamespace(sources=[SimpleNamespace(name="cap", kind="caption"), SimpleNamespace(name="p", kind="dpo")])
    with pytest.raises(UserError, match=r"sources\[1\].kind"):
        check_kinds("pretrain", m, "x.yaml")
    check_kinds("dpo", SimpleNamespace(sources=[m.sources[1]]), "x.yaml")


def test_mfu_counts_six_n_for_trained_and_two_n_for_frozen_vit():
    from blip3.model.config import get_config
    from blip3.model.xgenmm import XGenMM
    from blip3.model.flops import flops_model, mfu

    torch.manual_seed(0)
    model = XGenMM(get_config("tiny"))
    model.vision_encoder.requires_grad_(False)
    fm = flops_model(model)
    lm = model.lang_model
    emb = lm.get_input_embeddings().weight.numel()
    n_llm = sum(p.numel() for p in lm.parameters()) - emb
    assert fm.llm_per_token == pytest.approx(6 * n_llm)
    cfg = lm.config
    assert fm.attn_per_token_per_ctx == 12 * cfg.num_hidden_layers * cfg.hidden_size
    n_vit = sum(p.numel() for p in model.vision_encoder.parameters())
    assert fm.vit_per_crop == pytest.approx(2 * n_vit * model.config.num_patches)
    lm.requires_grad_(False)  # frozen LLM (LoRA stages without adapters here): fwd + input grads
    assert flops_model(model).llm_per_token == pytest.approx(4 * n_llm)
    assert mfu(1e12, 1.0, 1e12) == 1.0 and mfu(1.0, 1.0, None) is None


def test_token_budget_becomes_steps():
    from blip3.train.config import load_stage
    from blip3.train.loop import total_steps
    from tests.train_fixtures import ROOT

    cfg = load_stage(ROOT / "manifests/xgenmm/pretrain.yaml")  # tokens: 100B, 8 x 2048 x accum 4 per rank
    assert total_steps(cfg, world_size=8) == -(-100_000_000_000 // (8 * 2048 * 4 * 8))
    assert total_steps(load_stage(ROOT / "manifests/tiny/sft.yaml"), world_size=1) == 12
