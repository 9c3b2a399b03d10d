"""The tiny five-stage pipeline end to end on CPU, checked stage by stage (real model, real data)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.train_fixtures import ROOT, TINY, tiny_chain  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def _by_stage(results):
    return {r.stage: r for r in results}


def test_every_stage_leaves_a_checkpoint_the_next_one_loads(tiny_chain):
    from blip3.model.directory import load_model_dir

    results, out, _ = tiny_chain
    assert [r.stage for r in results] == ["pretrain", "sft", "interleave", "dpo", "safety"]
    prev = None
    for r in results:
        assert r.final_dir is not None and (r.final_dir / "model.safetensors").is_file()
        assert (r.output_dir / "checkpoints").is_dir() and list((r.output_dir / "checkpoints").iterdir())
        about = json.loads((r.final_dir / "train_info.json").read_text())
        assert about["init"] == (str(prev) if prev else None)  # started from the previous stage's output
        prev = r.final_dir
    # unmerged LoRA ships as an adapter beside the base; merge on request folds it in
    assert (out / "dpo" / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "safety" / "final" / "adapter").exists()
    model, processor = load_model_dir(out / "safety")
    assert processor.tokenizer.pad_token == "<pad>" and model.num_params() > 0


def test_pretrain_loss_goes_down(tiny_chain):
    losses = _by_stage(tiny_chain[0])["pretrain"].losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.3 * first, (first, last)
    rows = [json.loads(l) for l in (tiny_chain[1] / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert {"loss", "lr", "tokens_per_s", "mfu", "grad_norm"} <= set(train_rows[0])
    assert [r["eval_loss"] for r in rows if "eval_loss" in r][-1] < 0.5 * train_rows[0]["loss"]


def test_sft_labels_are_assistant_tokens_only(tiny_chain):
    from blip3.mixture.loader import MixtureLoader
    from blip3.model.directory import load_model_dir
    from blip3.train.data import BatchStream

    _, out, _ = tiny_chain
    _, processor = load_model_dir(out / "sft")
    stream = BatchStream(MixtureLoader(out / "sft" / "mixture.yaml", verify="none"), processor, stage="sft",
                         micro_batch_size=3, seq_len=256, pack=False)
    batch = stream.next().inputs
    tok = processor.tokenizer
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        trained = labels[labels != -100]
        assert torch.equal(trained, ids[labels != -100])  # labels are the ids where kept
        text = tok.decode(trained.tolist())
        assert text.startswith("I see a ") and text.count("<|end|>") == 1
        assert "What" not in text and "Describe" not in text and "<|user|>" not in text  # user turn masked
        assert (ids[labels == -100] == processor.placeholder_id).any()  # image tokens masked too


def test_dpo_increases_the_margin_and_lora_share_is_reported(tiny_chain):
    from peft import PeftModel

    from blip3.mixture.loader import MixtureLoader
    from blip3.model.processor import XGenMMProcessor
    from blip3.model.xgenmm import XGenMM
    from blip3.train.data import BatchStream
    from blip3.train.objective import Dpo

    results, out, _ = tiny_chain
    dpo = _by_stage(results)["dpo"]
    assert 0 < dpo.info["trainable_share"] < 0.1  # LoRA on the LLM only
    assert _by_stage(results)["sft"].info["trainable_share"] > 0.5
    d = out / "dpo" / "final"
    base = XGenMM.from_pretrained(d)
    processor = XGenMMProcessor.from_pretrained(d, base.config)
    policy = PeftModel.from_pretrained(base, str(d / "adapter")).eval()
    stream = BatchStream(MixtureLoader(out / "dpo" / "mixture.yaml", verify="none", seed=99), processor,
                         stage="dpo", micro_batch_size=12, seq_len=256, pack=False)
    batch = stream.next()
    objective, pairs = Dpo(beta=0.5), batch.n_pairs
    with torch.no_grad():
        loss, extra = objective(policy, batch)
        with policy.disable_adapter():  # before training, policy == reference: margin exactly 0
            _, before = objective(policy, batch)
    assert before["margin"].item() / pairs == pytest.approx(0.0, abs=1e-6)
    assert extra["margin"].item() / pairs > 0.1 and loss.item() / pairs < math.log(2)


def test_runs_are_in_the_catalog(tiny_chain):
    from blip3.core.sql import run_query

    _, _, db = tiny_chain
    rows = run_query("SELECT stage, kind, steps, status, final_loss, checkpoint, manifest FROM runs ORDER BY started_at", db)
    rows = rows.to_pylist()
    assert [r["stage"] for r in rows] == ["pretrain", "sft", "interleave", "dpo", "safety"]
    assert all(r["status"] == "finished" and r["final_loss"] is not None for r in rows)
    assert [r["kind"] for r in rows][-2:] == ["lora", "lora"]
    joined = run_query("SELECT r.stage, m.name FROM runs r JOIN mixtures m ON m.manifest_path = r.manifest "
                       "ORDER BY r.started_at", db).to_pylist()
    assert [(j["stage"], j["name"]) for j in joined][:2] == [("pretrain", "tiny-pretrain"), ("sft", "tiny-sft")]


def test_cli_runs_a_stage_and_reports_bad_files(tmp_path):
    env = {**os.environ, "BLIP3_NO_PROGRESS": "1"}
    blip3 = [sys.executable, "-m", "blip3.cli"]
    ok = subprocess.run([*blip3, "train", str(TINY / "pretrain.yaml"), "--max-steps", "2", "--out", str(tmp_path),
                         "--db", str(tmp_path / "c.duckdb")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "2 steps" in ok.stderr and "stopped" in ok.stderr
    assert (tmp_path / "pretrain" / "checkpoints" / "step_000002").is_dir()
    bad = tmp_path / "bad.yaml"
    bad.write_text((TINY / "sft.yaml").read_text().replace("seq_len: 256", "seq_len: long"))
    err = subprocess.run([*blip3, "train", str(bad)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert err.returncode == 2 and "batch.seq_len" in err.stderr and str(bad) in err.stderr
    assert "Traceback" not in err.stderr


def test_merge_lora_command_gives_the_adapted_model(tiny_chain, tmp_path):
    from peft import PeftModel

    from blip3.model.xgenmm import XGenMM
    from blip3.model.processor import XGenMMProcessor

    _, out, _ = tiny_chain
    env = {**os.environ, "BLIP3_NO_PROGRESS": "1"}
    r = subprocess.run([sys.executable, "-m", "blip3.cli", "merge-lora", str(out / "dpo"), "-o", str(tmp_path / "m")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    merged = XGenMM.from_pretrained(tmp_path / "m").eval()
    d = out / "dpo" / "final"
    adapted = PeftModel.from_pretrained(XGenMM.from_pretrained(d), str(d / "adapter")).eval()
    proc = XGenMMProcessor.from_pretrained(tmp_path / "m")
    enc = proc.encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a red circle"}])
    batch = proc.collate([enc])
    with torch.no_grad():
        a, b = merged(**batch).logits, adapted(**batch).logits
        with adapted.disable_adapter():
            base = adapted(**batch).logits
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, base, atol=1e-4)


def test_packed_rows_do_not_attend_across_samples(tiny_chain):
    """The loss of a packed batch equals the token-weighted loss of its samples run one by one."""
    from blip3.mixture.loader import MixtureLoader
    from blip3.model.directory import load_model_dir
    from blip3.train.data import BatchStream, encode_sample

    _, out, _ = tiny_chain
    model, processor = load_model_dir(out / "pretrain")
    processor.anyres = False
    model.eval()
    stream = BatchStream(MixtureLoader(out / "pretrain" / "mixture.yaml", verify="none"), processor,
                         stage="pretrain", micro_batch_size=2, seq_len=256, pack=True)
    packed = stream.next().inputs
    assert int(packed["segment_ids"].max()) >= 3  # several samples share each row
    singles = [encode_sample(processor, s) for s in MixtureLoader(out / "pretrain" / "mixture.yaml", verify="none")
               .take(int((packed["segment_ids"].amax(dim=1)).sum()))]
    with torch.no_grad():
        packed_loss = model(**packed, use_cache=False).loss.item()
        total, count = 0.0, 0
        for enc in singles:
            b = processor.collate([enc])
            n = int((b["labels"][:, 1:] != -100).sum())
            total += model(**b, use_cache=False).loss.item() * n
            count += n
    assert packed_loss == pytest.approx(total / count, rel=1e-4)
