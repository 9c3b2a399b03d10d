"""`runtime.meta_init`: a stage starting from a model dir builds it on the meta device and loads the
weights into the parameters after parallelism (sharded under FSDP2). The result equals the eager
load: the same weights, the same logits (the rotary tables, absent from the file, rebuilt)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.model_fixtures import build_tiny_model, noise_image, tiny_config, tiny_processor  # noqa: F401
from tests.train_fixtures import tiny_stage


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_config, tiny_processor) -> Path:
    """A model dir with seeded random weights (what a previous stage's `final/` holds)."""
    d = tmp_path_factory.mktemp("meta") / "final"
    build_tiny_model(tiny_config, seed=7).save_pretrained(d)
    tiny_processor.save_pretrained(d)
    return d


def _full_state(model) -> dict[str, torch.Tensor]:
    """Whole tensors under the plain names (through checkpoint / compile wrappers and FSDP2 shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_meta_build_equals_the_eager_load(tmp_path, saved, tiny_processor):
    from blip3.model.weights import materialize
    from blip3.model.directory import load_model_dir
    from blip3.train.builders import build_model
    from blip3.train.distributed import parallelize

    cfg = tiny_stage("sft", tmp_path, **{"init.path": str(saved)})
    model, _, info = build_model(cfg)
    assert info["weights_file"] == saved / "model.safetensors"
    assert all(p.is_meta for p in model.parameters())  # nothing allocated, nothing initialised
    parallelize(model, ac=True, compile=False, fsdp=False, bf16=False)  # wrapped names, as in a run
    materialize(model, info["weights_file"], torch.device("cpu"))
    eager, _ = load_model_dir(saved)
    _assert_same_weights(_full_state(model), eager.state_dict())
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())

    batch = tiny_processor.collate([tiny_processor.encode_caption("a photo of a cat", noise_image(40, 40, 1))])
    with torch.no_grad():
        got, want = model.eval()(**batch).logits, eager.eval()(**batch).logits
    assert torch.equal(got, want)


def test_lora_stages_and_the_switch_off_load_eagerly(tmp_path, saved):
    from blip3.train.builders import build_model

    lora = tiny_stage("sft", tmp_path, **{"init.path": str(saved), "lora.enabled": True})
    off = tiny_stage("sft", tmp_path, **{"init.path": str(saved), "runtime.meta_init": False})
    for cfg in (lora, off):
        model, _, info = build_model(cfg)
        assert info["weights_file"] is None and not any(p.is_meta for p in model.parameters())


def _sharded_worker(rank: int, init_file: str, model_dir: str, out: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from blip3.model.weights import materialize
    from blip3.model.xgenmm import XGenMM
    from blip3.train.distributed import parallelize

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model, weights = XGenMM.empty_from_pretrained(model_dir)
        parallelize(model, ac=True, compile=False, fsdp=True, bf16=False)
        materialize(model, weights, torch.device("cpu"), from_rank0=True)  # rank 1 never reads the file
        embed = dict(model.named_parameters())["lang_model.model.embed_tokens.weight"]
        assert embed.to_local().shape[0] == embed.shape[0] // 2  # each rank holds its half only
        state = _full_state(model)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in state.items()}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_load_the_weights_into_their_shards(tmp_path, saved):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from blip3.model.xgenmm import XGenMM

    out = tmp_path / "gathered.safetensors"
    mp.spawn(_sharded_worker, args=(str(tmp_path / "init"), str(saved), str(out)), nprocs=2, join=True)
    _assert_same_weights(load_file(str(out)), XGenMM.from_pretrained(saved).state_dict())


@pytest.mark.parametrize("damage", ["truncated", "other-names", "config"])
def test_a_damaged_model_dir_is_one_line_either_way(tmp_path, saved, damage):
    """A model dir on disk is user input: a truncated or foreign weights file, or a config that is
    not one, is one UserError naming the file, eager load and meta build alike."""
    import shutil

    from safetensors.torch import save_file

    from blip3.core.errors import UserError
    from blip3.model.weights import materialize
    from blip3.model.xgenmm import XGenMM

    d = tmp_path / "final"
    shutil.copytree(saved, d)
    weights = d / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "other-names":
        save_file({"not.a.weight": torch.zeros(2)}, str(weights))
    else:
        (d / "config.json").write_text('["not", "a", "config"]')
    with pytest.raises(UserError) as e:
        XGenMM.from_pretrained(d)
    assert "\n" not in str(e.value) and str(d) in str(e.value) and "UserError" not in str(e.value)
    if damage != "config":
        model, file = XGenMM.empty_from_pretrained(d)
        with pytest.raises(UserError) as e:
            materialize(model, file, torch.device("cpu"))
        assert "\n" not in str(e.value) and "model.safetensors" in str(e.value)
