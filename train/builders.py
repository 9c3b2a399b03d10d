"""Builders from a stage config: model + processor (init, freezing, LoRA), optimiser, data.

The loop receives built components and does not know which stage it runs, the torchtitan habit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch

from blip3.core.errors import UserError
from blip3.model.directory import ADAPTER_DIR, load_model_dir, model_dir
from blip3.train.config import StageConfig

if TYPE_CHECKING:
    from blip3.model.config import ModelConfig
    from blip3.train.objective import Objective


def build_model(cfg: StageConfig, init_path: str | None = None):
    """The stage's starting model and processor, frozen groups frozen, LoRA attached if asked.

    Returns (model, processor, info) where info reports parameter counts and the trainable share,
    and `weights_file`: None when the weights are in place, else the file that
    `model.weights.materialize` loads once parallelism is applied. That is the `runtime.meta_init`
    build of a model dir: built on the meta device, so under FSDP2 each rank only ever allocates its
    shards. A LoRA stage or a dir holding an unmerged adapter loads eagerly (peft builds and
    merges adapters on real tensors).
    """
    from blip3.model.attention import set_attention
    from blip3.model.config import get_config
    from blip3.model.processor import XGenMMProcessor
    from blip3.model.xgenmm import XGenMM

    path = init_path or cfg.init.path
    weights_file = None
    if path is not None and cfg.runtime.meta_init and not cfg.lora.enabled and not (model_dir(path) / ADAPTER_DIR).is_dir():
        model, weights_file = XGenMM.empty_from_pretrained(model_dir(path))
        processor = XGenMMProcessor.from_pretrained(model_dir(path), model.config)
    elif path is not None:
        model, processor = load_model_dir(path)
    else:
        config = get_config(cfg.model)
        if config.tokenizer != "tiny":
            raise UserError(
                f"a {cfg.model} model is not built from scratch: give init.path (a model dir assembled from "
                "the released SigLIP and Phi-3 weights)", field="init.path", file=cfg.source,
            )
        torch.manual_seed(cfg.init.seed)
        model = XGenMM(config)
        processor = XGenMMProcessor.from_config(config)
    set_attention(model.lang_model, cfg.runtime.attention)
    processor.anyres = cfg.anyres
    processor.max_text_tokens = min(cfg.batch.seq_len, model.config.max_text_tokens)

    model.requires_grad_(True)
    for group in cfg.freeze:
        getattr(model, group).requires_grad_(False)
    if cfg.lora.enabled:
        model = attach_lora(model, cfg)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info = {"params": total, "trainable_params": trainable, "trainable_share": trainable / total,
            "weights_file": weights_file}
    return model, processor, info


def attach_lora(model, cfg: StageConfig):
    """peft LoRA on the LLM's projections only; groups not frozen by the stage keep training."""
    from peft import LoraConfig, get_peft_model

    lc = cfg.lora
    peft_cfg = LoraConfig(r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                          bias="none")
    wrapped = get_peft_model(model, peft_cfg)
    if not any("lora_" in n for n, _ in wrapped.named_parameters()):
        raise UserError(f"LoRA target pattern matched no module: {lc.target_modules!r}", field="lora.target_modules",
                        file=cfg.source)
    base = wrapped.get_base_model()
    if "vision_tokenizer" not in cfg.freeze:
        base.vision_tokenizer.requires_grad_(True)
    return wrapped


def unwrap(model):
    """The XGenMM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def build_optimizer(model, cfg: StageConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, biases, latents' 1-D vectors)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=device.type == "cuda")


def build_objective(cfg: StageConfig, model_config) -> "Objective":
    """The stage's loss: DPO for `dpo`, next-token cross-entropy for every other stage."""
    from blip3.train.objective import CrossEntropy, Dpo

    if cfg.stage == "dpo":
        return Dpo(beta=cfg.dpo.beta, impl=cfg.runtime.loss)
    return CrossEntropy(placeholder_id=model_config.image_placeholder_id, impl=cfg.runtime.loss)


def data_seed(cfg: StageConfig) -> int:
    """The seed of the training data order: the stage's `seed`, so changing it reshuffles the data
    (the mixture's own `seed` serves readers outside training: `mix sample`, audits)."""
    return cfg.seed


def build_stream(cfg: StageConfig, manifest, processor, info, *, verify: str, seed_offset: int = 0):
    """This rank's micro-batches of the stage's mixture (`seed_offset` 1: the held-out eval order)."""
    from blip3.mixture.loader import MixtureLoader
    from blip3.train.data import BatchStream, check_kinds

    loader = MixtureLoader(manifest, seed=data_seed(cfg) + seed_offset, rank=info.rank, world_size=info.world_size,
                           shuffle_buffer=cfg.data.shuffle_buffer, verify=verify)
    check_kinds(cfg.stage, loader.manifest, cfg.source)
    return BatchStream(loader, processor, stage=cfg.stage, micro_batch_size=cfg.batch.micro_batch_size,
                       seq_len=cfg.batch.seq_len, pack=cfg.batch.pack,
                       noised_image_chosen_as_rejected=cfg.dpo.noised_image_chosen_as_rejected and seed_offset == 0,
                       noise_std=cfg.dpo.noise_std, num_workers=cfg.data.num_workers if seed_offset == 0 else 0,
                       pin_memory=info.device.type == "cuda")


def stage_model_config(cfg: StageConfig, init_path: str | None = None) -> "ModelConfig":
    """The configuration of the model the stage trains, read without building the model: the
    init dir's `config.json`, else the named preset (what `build_model` will build)."""
    from blip3.model.config import ModelConfig, get_config
    from blip3.model.xgenmm import CONFIG_FILE

    path = init_path or cfg.init.path
    if path is None:
        return get_config(cfg.model)
    file = model_dir(path) / CONFIG_FILE
    try:
        return ModelConfig.from_dict(json.loads(file.read_text()))
    except FileNotFoundError:
        raise UserError(f"no {CONFIG_FILE} in {model_dir(path)} (run the previous stage first)", field="init.path",
                        file=cfg.source) from None
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{file} is not a model config: {e}"[:300], field="init.path", file=cfg.source) from None


def resolve_manifest(cfg: StageConfig, out_dir: Path, db: str | Path | None, is_main: bool,
                     variables: Mapping[str, str], init_path: str | None = None):
    """The stage's manifest: the given one, or the spec built into `out_dir/mixture.yaml`, its
    `${VAR}`s taken from `variables` (the prepared data) before the environment.

    A built manifest counts each image as the stage model's resampler output (`num_latents`
    tokens per crop), so its token budget is the one this model trains on; a spec that declares
    another value is refused by `build_manifest`."""
    from blip3.mixture.build import build_manifest

    if cfg.data.manifest is not None:
        return Path(cfg.data.manifest)
    built = out_dir / "mixture.yaml"
    if is_main:
        vision = stage_model_config(cfg, init_path).num_latents
        build_manifest(cfg.data.spec, db=db, out=built, variables=variables, vision_tokens_per_crop=vision)
    return built
