"""Write a stage's output model dir from the (possibly sharded, compiled, LoRA-wrapped) model.

One path for every case: gather the full state dict (`torch.distributed.checkpoint.state_dict`,
collective under FSDP2), strip the wrappers' name prefixes, then on rank 0:
- plain model: the weights as `XGenMM.save_pretrained` lays them out;
- LoRA, `merge: true`: W += (alpha / r) * B @ A folded into each adapted projection;
- LoRA, `merge: false`: the base weights, plus `adapter/` in peft's own format
  (`adapter_config.json` + `adapter_model.safetensors`), which `PeftModel.from_pretrained` reads
  and `model.directory.load_model_dir` merges when the next stage starts.
The directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from blip3.model.directory import ADAPTER_DIR
from blip3.model.runtime import DistInfo
from blip3.train.builders import unwrap
from blip3.train.checkpoint import _strip

PEFT_PREFIX = "base_model.model."


def _split_lora(sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    base, adapter = {}, {}
    for k, v in sd.items():
        k = k.removeprefix(PEFT_PREFIX)
        if ".lora_A." in k or ".lora_B." in k:
            adapter[k] = v
        else:
            base[k.replace(".base_layer.", ".")] = v
    return base, adapter


def merge_lora(base: dict, adapter: dict, scale: float, adapter_name: str = "default") -> dict:
    """Fold each adapter into its base weight: W + scale * B @ A."""
    merged = dict(base)
    for k, a in adapter.items():
        if f".lora_A.{adapter_name}.weight" not in k:
            continue
        module = k.split(".lora_A.")[0]
        b = adapter[f"{module}.lora_B.{adapter_name}.weight"]
        w = merged[f"{module}.weight"]
        merged[f"{module}.weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return merged


TRAIN_INFO = "train_info.json"


def export_model(model, processor, final: Path, *, merge: bool, info: DistInfo, about: dict | None = None) -> None:
    """`about` (stage, init, steps, loss, trainable share) goes to `train_info.json` beside the weights."""
    from safetensors.torch import save_file

    from blip3.model.xgenmm import CONFIG_FILE, WEIGHTS_FILE

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if info.is_main:
        sd = {_strip(k): v.contiguous() for k, v in sd.items()}
        peft_cfg = getattr(model, "peft_config", None)
        tmp = final.with_name(final.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        if peft_cfg:
            pc = peft_cfg["default"]
            base, adapter = _split_lora(sd)
            if merge:
                base = merge_lora(base, adapter, pc.lora_alpha / pc.r)
            else:
                (tmp / ADAPTER_DIR).mkdir()
                pc.save_pretrained(str(tmp / ADAPTER_DIR))
                peft_keys = {PEFT_PREFIX + k.replace(".default.", "."): v for k, v in adapter.items()}
                save_file(peft_keys, str(tmp / ADAPTER_DIR / "adapter_model.safetensors"))
        else:
            base = sd
        (tmp / CONFIG_FILE).write_text(json.dumps(unwrap(model).config.to_dict(), indent=2))
        save_file(base, str(tmp / WEIGHTS_FILE))
        processor.save_pretrained(tmp)
        (tmp / TRAIN_INFO).write_text(json.dumps(about or {}, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    if info.distributed:
        dist.barrier()
