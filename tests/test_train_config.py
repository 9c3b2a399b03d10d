"""Stage/pipeline YAML validation: every shipped recipe loads; each mistake names field and file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from blip3.core.errors import UserError
from blip3.train.config import load_any, load_stage

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "manifests" / "tiny").glob("*.yaml")) + sorted((ROOT / "manifests" / "xgenmm").glob("*.yaml"))
MIXTURE_SPECS = sorted((ROOT / "manifests" / "tiny" / "mixtures").glob("*.yaml")) + sorted(
    (ROOT / "manifests" / "xgenmm" / "mixtures").glob("*.yaml")
)


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"pipeline.yaml", "pretrain.yaml", "sft.yaml", "interleave.yaml", "dpo.yaml", "safety.yaml", "distill.yaml"} <= names
    assert len(RECIPES) == 13


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_recipe_validates(path):
    cfg = load_any(path)
    for stage in cfg.stages:
        assert Path(stage.data.spec or stage.data.manifest).is_file()
        if stage.stage in ("dpo", "safety"):
            assert stage.lora.enabled and "vision_encoder" in stage.freeze


@pytest.mark.parametrize("path", MIXTURE_SPECS, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_every_mixture_spec_is_well_formed(path):
    from blip3.mixture.build import validate_spec

    spec = validate_spec(yaml.safe_load(path.read_text()), str(path))
    assert spec["sources"] and all(s["weight"] > 0 for s in spec["sources"])


def test_pipeline_stage_order_and_chain():
    cfg = load_any(ROOT / "manifests/tiny/pipeline.yaml")
    assert [s.stage for s in cfg.stages] == ["pretrain", "sft", "interleave", "dpo", "safety"]
    assert cfg.stages[0].batch.pack and cfg.stages[1].anyres
    assert cfg.stages[4].lora.merge


def _write(tmp_path, body: dict) -> Path:
    base = yaml.safe_load((ROOT / "manifests/tiny/sft.yaml").read_text())
    base["data"]["spec"] = str(ROOT / "manifests/tiny/mixtures/sft.yaml")
    for k, v in body.items():
        if v is None:
            base.pop(k, None)
        elif isinstance(v, dict) and v and isinstance(base.get(k), dict):  # {} replaces
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    p = tmp_path / "stage.yaml"
    p.write_text(yaml.safe_dump(base))
    return p


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"stage": "finetune"}, "stage", "unknown stage kind"),
        ({"optim": {"lr": "fast"}}, "optim.lr", "expected a number"),
        ({"optim": {"lr": -1.0}}, "optim.lr", "> 0"),
        ({"batch": {"micro_batch_size": 0}}, "batch.micro_batch_size", "> 0"),
        ({"batch": {"seq_len": 2.5}}, "batch.seq_len", "integer"),
        ({"optim": {"learning_rate": 1e-3}}, "optim.learning_rate", "unknown field"),
        ({"steps": None}, "steps", "exactly one of"),
        ({"tokens": 100}, "steps", "exactly one of"),
        ({"freeze": ["lang_model"]}, "freeze", "vision encoder is frozen"),
        ({"freeze": ["vision_encoder", "decoder"]}, "freeze[1]", "unknown module group"),
        ({"stage": "dpo"}, "lora.enabled", "LoRA"),
        ({"batch": {"pack": True}}, "batch.pack", "pretrain"),
        ({"init": {}, "model": None}, "init.path", "preset"),
        ({"anyres": "yes"}, "anyres", "true or false"),
        ({"output_dir": None}, "output_dir", "required"),
        ({"data": {"spec": None}}, "data", "exactly one of"),
        ({"optim": {"lr": float("nan")}}, "optim.lr", "finite"),  # `lr: .nan` passes `lr <= 0`
        ({"optim": {"lr": "nan"}}, "optim.lr", "finite"),
        ({"dpo": {"beta": float("inf")}}, "dpo.beta", "finite"),
        ({"runtime": {"loss": "fused"}}, "runtime.loss", "chunked"),
        ({"runtime": {"attention": "flash"}}, "runtime.attention", "dense, flex"),
        ({"data": {"num_workers": -1}}, "data.num_workers", ">= 0"),
        ({"eval_every": 2, "eval_batches": 0}, "eval_batches", ">= 1 when eval_every"),
    ],
)
def test_bad_field_is_one_clear_error(tmp_path, change, field, words):
    p = _write(tmp_path, change)
    with pytest.raises(UserError) as e:
        load_stage(p)
    assert e.value.field == field and e.value.file == str(p)
    assert words in str(e.value) and str(p) in str(e.value)


def test_eval_batches_of_zero_is_fine_without_evaluation(tmp_path):
    assert load_stage(_write(tmp_path, {"eval_every": 0, "eval_batches": 0})).eval_batches == 0


def test_yaml_float_strings_and_relative_paths(tmp_path):
    p = _write(tmp_path, {"optim": {"lr": "3e-4"}})
    cfg = load_stage(p)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.output_dir == "runs/tiny/sft"  # run outputs: relative to the working directory


def test_pipeline_errors_name_the_stage_file(tmp_path):
    bad = _write(tmp_path, {"optim": {"lr": 0.0}})
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(yaml.safe_dump({"name": "p", "stages": [bad.name]}))
    with pytest.raises(UserError, match="optim.lr"):
        load_any(pipe)
    pipe.write_text(yaml.safe_dump({"name": "p", "stages": []}))
    with pytest.raises(UserError, match="stages"):
        load_any(pipe)


def test_fsdp_knobs_reach_the_sharded_blocks(tmp_path):
    """runtime.reduce_dtype / reshard_after_forward become each decoder block's FSDP2 settings
    (a one-rank gloo group: FSDP2 itself, not a stand-in)."""
    import torch
    import torch.distributed as dist

    from blip3.model.config import get_config
    from blip3.model.xgenmm import XGenMM
    from blip3.train.distributed import decoder_blocks, parallelize

    cfg = _write(tmp_path, {"runtime": {"reduce_dtype": "bf16", "reshard_after_forward": False}})
    rt = load_stage(cfg).runtime
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = parallelize(XGenMM(get_config("tiny")), ac=False, compile=False, fsdp=True, bf16=True,
                            reduce_dtype=rt.reduce_dtype, reshard_after_forward=rt.reshard_after_forward)
        for block in decoder_blocks(model):
            state = block._get_fsdp_state()
            assert state._mp_policy.reduce_dtype == torch.bfloat16 and state._mp_policy.param_dtype == torch.bfloat16
            assert state._fsdp_param_group.post_forward_mesh_info is None  # kept gathered after forward
    finally:
        dist.destroy_process_group()
