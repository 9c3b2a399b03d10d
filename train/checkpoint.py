"""Checkpoints for exact resume, and the stage output the next stage starts from.

Layout under a stage's `output_dir`:

    checkpoints/step_000010/   state/      trainable parameters and optimiser state, sharded:
                                           each rank writes its own shards as safetensors
                                           (torch.distributed.checkpoint, Hugging Face layout;
                                           during training written by a thread, `dcp.async_save`)
                               meta.json   step, tokens, scheduler state, optimiser param groups
                               rank0.json  per rank: RNG states, data-stream position
                               ...
    final/                     the model dir (`save_pretrained`), loadable by the next stage;
                               with unmerged LoRA also `adapter/` (peft) on top of it

Only trainable parameters are saved: frozen weights are rebuilt from the stage's init, which is
deterministic (a saved dir or a seeded preset), so a resumed run has the very same model.
Nothing in a checkpoint is a pickle: tensors are safetensors (raw numbers and a JSON header) and
everything else JSON, so loading a checkpoint someone else crafted cannot run code. The shards
carry their offsets, so a checkpoint saved by N ranks loads under any number of ranks, one
included; every rank's data position is handed back, so a run resumed on fewer processes plays
on the data ranks of the run it continues (`train.data.DataRanks`).
A checkpoint directory is written under a temporary name and renamed when complete; one that
cannot be read is one clear error naming it.
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    StateDictOptions,
)

from blip3.core.errors import UserError

_STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_DIR = "state"
_MODEL, _OPTIM = "model/", "optim/"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _tensor_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().contiguous().numpy().tobytes()).decode("ascii")


def _b64_tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, as JSON-able values."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": _tensor_b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_tensor_b64(t) for t in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_b64_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_b64_tensor(s) for s in state["cuda"]])


def _flat_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """Trainable parameters and optimiser state as one flat {name: tensor} (sharded DTensors under
    FSDP2, as each rank holds them), plus the optimiser's param groups (plain values, for JSON)."""
    names = _trainable_names(model)
    msd = {k: v for k, v in get_model_state_dict(model).items() if _strip(k) in names}
    if len(msd) != len(names):  # a silently missing tensor would make resume inexact
        raise RuntimeError(f"checkpoint holds {len(msd)} of {len(names)} trainable tensors")
    osd = get_optimizer_state_dict(model, optimizer)
    flat = {_MODEL + k: v for k, v in msd.items()}
    for fqn, state in osd["state"].items():
        for key, value in state.items():
            flat[f"{_OPTIM}{fqn}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat, osd["param_groups"]


def _unflat(flat: dict[str, torch.Tensor], param_groups: list) -> tuple[dict, dict]:
    msd = {k[len(_MODEL):]: v for k, v in flat.items() if k.startswith(_MODEL)}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        if k.startswith(_OPTIM):
            fqn, key = k[len(_OPTIM):].rsplit("/", 1)
            state.setdefault(fqn, {})[key] = v
    return msd, {"state": state, "param_groups": param_groups}


class PendingCheckpoint:
    """A checkpoint being written: its tensors were copied to host memory when it was started, and
    a thread writes them while training goes on (`dcp.async_save`). `wait()`, called by every
    rank, finishes it: the writes done everywhere, the directory renamed to its final name (so a
    run killed meanwhile leaves only a `.tmp` directory, never a checkpoint half written), old ones
    pruned. A synchronous checkpoint is a pending one already written."""

    def __init__(self, out_dir: Path, tmp: Path, final: Path, keep: int, future=None):
        self.out_dir, self.tmp, self.final, self.keep = out_dir, tmp, final, keep
        self._future = future

    def wait(self) -> Path:
        if self._future is not None:
            self._future.result()
            self._future = None
        _barrier()
        if _rank() == 0 and self.tmp.exists():
            if self.final.exists():
                shutil.rmtree(self.final)
            self.tmp.rename(self.final)
            for old in list_checkpoints(self.out_dir)[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old)
        _barrier()
        return self.final


_ASYNC_GROUP = None


def _async_group():
    """A gloo group of its own for the writer thread's collectives, which must not interleave
    with the training step's on the default group (and need a CPU backend under NCCL)."""
    global _ASYNC_GROUP
    if _ASYNC_GROUP is None and _distributed():
        _ASYNC_GROUP = dist.new_group(backend="gloo")
    return _ASYNC_GROUP


def save_checkpoint(out_dir: str | Path, step: int, **parts) -> Path:
    """Write `checkpoints/step_<step>` now (all ranks call this); see `start_checkpoint`."""
    return start_checkpoint(out_dir, step, **parts).wait()


def start_checkpoint(
    out_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    data_state: dict,
    meta: dict,
    keep: int = 2,
    asynchronous: bool = False,
) -> PendingCheckpoint:
    """Start `checkpoints/step_<step>` (all ranks call this); keep the newest `keep` checkpoints.

    Everything but the tensors (RNG, data position, scheduler) is written before this returns;
    with `asynchronous` the tensors are staged to host memory and written by a thread, so the
    caller may train on at once and must `wait()` the result before the next checkpoint."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    root = Path(out_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    flat, param_groups = _flat_state(model, optimizer)
    rank = _rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / STATE_DIR).mkdir(parents=True)
    _barrier()
    writer = HuggingFaceStorageWriter(str(tmp / STATE_DIR), save_distributed=True)
    future = None
    if asynchronous:
        # the writer stages (copies) every tensor to host memory before this returns, so the
        # optimiser steps that follow cannot change what it writes
        future = dcp.async_save(flat, storage_writer=writer, process_group=_async_group(), no_dist=not _distributed())
    else:
        dcp.save(flat, storage_writer=writer, no_dist=not _distributed())
    (tmp / f"rank{rank}.json").write_text(json.dumps({"rng": rng_state(), "data": data_state}))
    if rank == 0:
        world = dist.get_world_size() if _distributed() else 1
        (tmp / "meta.json").write_text(json.dumps({"step": step, "world_size": world,
                                                   "scheduler": scheduler.state_dict(),
                                                   "param_groups": param_groups, **meta}, default=str))
    return PendingCheckpoint(Path(out_dir), tmp, final, keep, future)


def _trainable_names(model: torch.nn.Module) -> set[str]:
    """Names as state dicts give them (wrapper prefixes of compile / checkpointing removed)."""
    return {_strip(n) for n, p in model.named_parameters() if p.requires_grad}


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
    """Restore model, optimiser, scheduler and RNG; returns meta plus `data`: the data state every
    saving rank wrote, in rank order.

    Each rank reads the parts of the shards it holds (whatever world size wrote them) and the RNG
    state of the saving rank with its number."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    ckpt = Path(ckpt)
    if not (ckpt / STATE_DIR).is_dir():
        old = " (an older pickle format, not loaded: it could run code)" if (ckpt / "trainable.pt").exists() else ""
        raise UserError(f"not a checkpoint{old}; delete it to resume from the one before", file=ckpt)
    # every part below comes from the files (meta.json is hostile too): whatever is wrong in them
    # is the one line below, not a traceback from the middle of a restore
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        world = meta.get("world_size", 1)
        if not (isinstance(world, int) and world >= 1
                and all(isinstance(meta.get(k, 0), int) for k in ("step", "tokens"))):
            raise ValueError("meta.json: world_size, step or tokens is not a whole number")
        per_rank = [json.loads((ckpt / f"rank{r}.json").read_text()) for r in range(world)]
        data = [r["data"] for r in per_rank]
        flat, _ = _flat_state(model, optimizer)
        dcp.load(flat, storage_reader=HuggingFaceStorageReader(str(ckpt / STATE_DIR)), no_dist=not _distributed())
        msd, osd = _unflat(flat, meta["param_groups"])
        set_model_state_dict(model, msd, options=StateDictOptions(strict=False))
        set_optimizer_state_dict(model, optimizer, osd)
        scheduler.load_state_dict(meta["scheduler"])
        set_rng_state(per_rank[min(_rank(), world - 1)]["rng"])
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError,
            dcp.api.CheckpointException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"checkpoint cannot be read ({type(e).__name__}: {first[:200]}); delete it to resume "
                        "from the one before", file=ckpt) from None
    meta["data"] = data
    return meta
