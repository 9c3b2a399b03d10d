"""Checkpoints for exact resume, and the stage output the next stage starts from.

Layout under a stage's `output_dir`:

    checkpoints/step_000010/   trainable.pt  (trainable parameters, full tensors, by name)
                               optim.pt      (optimiser state, keyed by parameter name)
                               rank0.pt ...  (per rank: RNG states, data-stream state)
                               meta.json     (step, tokens, scheduler state, config source)
    final/                     the model dir (`save_pretrained`), loadable by the next stage;
                               with unmerged LoRA also `adapter/` (peft) on top of it

Only trainable parameters are saved: frozen weights are rebuilt from the stage's init, which is
deterministic (a saved dir or a seeded preset), so a resumed run has the very same model.
State dicts go through `torch.distributed.checkpoint.state_dict` with full (unsharded) tensors,
so one code path serves a single process and FSDP2-sharded ranks alike.
A checkpoint directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_STEP_DIR = re.compile(r"^step_(\d+)$")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable_names(model: torch.nn.Module) -> set[str]:
    """Names as state dicts give them (wrapper prefixes of compile / checkpointing removed)."""
    return {_strip(n) for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    data_state: dict,
    meta: dict,
    keep: int = 2,
) -> Path:
    """Write `checkpoints/step_<step>` (all ranks call this); keep the newest `keep` checkpoints."""
    root = Path(out_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    names = _trainable_names(model)
    msd = {k: v for k, v in msd.items() if _strip(k) in names}
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    rank = _rank()
    # (full state dicts with cpu_offload live on rank 0 only)
    if rank == 0 and len(msd) != len(names):  # a silently missing tensor would make resume inexact
        raise RuntimeError(f"checkpoint holds {len(msd)} of {len(names)} trainable tensors")
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    torch.save({"rng": rng_state(), "data": data_state}, tmp / f"rank{rank}.pt")
    if rank == 0:
        torch.save(msd, tmp / "trainable.pt")
        torch.save(osd, tmp / "optim.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "scheduler": scheduler.state_dict(), **meta}, default=str))
    _barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    _barrier()
    return final


def _strip(name: str) -> str:
    """Parameter names as `named_parameters` gives them (compile/checkpoint wrappers removed)."""
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_checkpoint(ckpt: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Restore model, optimiser, scheduler and RNG; returns meta plus this rank's `data` state.

    Under several ranks only rank 0 reads the full state dicts and broadcasts them (one copy of
    the model in host memory, not one per rank)."""
    shared = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    read = not shared or _rank() == 0
    msd = torch.load(ckpt / "trainable.pt", map_location="cpu", weights_only=False) if read else {}
    set_model_state_dict(model, msd, options=StateDictOptions(full_state_dict=True, strict=False,
                                                              broadcast_from_rank0=shared))
    osd = torch.load(ckpt / "optim.pt", map_location="cpu", weights_only=False) if read else {}
    set_optimizer_state_dict(model, optimizer, osd,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=shared))
    meta = json.loads((ckpt / "meta.json").read_text())
    scheduler.load_state_dict(meta["scheduler"])
    per_rank = torch.load(ckpt / f"rank{_rank()}.pt", map_location="cpu", weights_only=False)
    set_rng_state(per_rank["rng"])
    meta["data"] = per_rank["data"]
    return meta
