"""The parallelism recipe, applied in one place (joining the torchrun process group is
`model.runtime.init_distributed`).

Order, as torchtitan does it: activation checkpointing per decoder block -> torch.compile per
block -> FSDP2 `fully_shard` per decoder block, then the resampler, then the root. The frozen ViT
is sharded as its own unit before the root, so its (never-updated) parameters never share a flat
group with trainable ones; mixed precision keeps bf16 parameters for compute and fp32 reductions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The Phi-3 decoder layers inside `model.lang_model` (through a peft wrapper if present)."""
    for name, module in model.named_modules():
        if name.endswith("lang_model.model.layers") and isinstance(module, torch.nn.ModuleList):
            return module
    raise ValueError("no lang_model.model.layers in the model")


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: torch.nn.Module) -> None:
    """Compile each decoder block on its own (fast compile, reused across identical blocks)."""
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        blocks[i] = torch.compile(block, dynamic=False)


def apply_fsdp(model: torch.nn.Module, *, bf16: bool, reduce_dtype: str = "fp32",
               reshard_after_forward: bool = True) -> None:
    """bf16: parameters gathered in bf16 for compute (the sharded masters stay fp32);
    reduce_dtype: the gradient reduction's dtype; reshard_after_forward: free a block's gathered
    parameters after its forward (the last block always stays: backward needs it at once)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                              reduce_dtype=torch.bfloat16 if reduce_dtype == "bf16" else torch.float32)
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(_find(model, "vision_encoder"), mp_policy=mp)
    fully_shard(_find(model, "vision_tokenizer"), mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def _find(model: torch.nn.Module, suffix: str) -> torch.nn.Module:
    for name, module in model.named_modules():
        if name.split(".")[-1] == suffix:
            return module
    raise ValueError(f"no {suffix} in the model")


def parallelize(model: torch.nn.Module, *, ac: bool, compile: bool, fsdp: bool, bf16: bool,
                reduce_dtype: str = "fp32", reshard_after_forward: bool = True) -> torch.nn.Module:
    """The fixed order: activation checkpointing, per-block compile, FSDP2 blocks then root."""
    if ac:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if fsdp:
        apply_fsdp(model, bf16=bf16, reduce_dtype=reduce_dtype, reshard_after_forward=reshard_after_forward)
    return model


def all_reduce_mean(value: float, info: DistInfo) -> float:
    return all_reduce_sum(value, info) / info.world_size


def all_reduce_sum(value: float, info: DistInfo) -> float:
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.item()
