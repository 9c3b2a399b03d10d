"""Model FLOPs utilisation: achieved model FLOPs per second over the device's peak.

Counted as nanoGPT / PaLM do (matmul FLOPs only, no recompute from activation checkpointing):

- LLM, per sequence position: 2N forward. Trained weights add 4N backward (grad of inputs and of
  weights): 6N. Frozen base weights under LoRA still need input grads: 4N, plus 6N_lora for the
  adapters. Attention scores and values: 12 * L * d * T_ctx per position (fwd+bwd), where T_ctx is
  the attended length (a packed segment's own length, not the row length, is what is computed by
  a block-diagonal kernel; we use the row length, an upper bound the kernel may not reach).
- Resampler, per crop: its weights see `num_latents` query rows and `n_media + num_latents`
  key/value rows; 6x if trained, 2x when frozen (nothing upstream needs its input grads).
- ViT (frozen, forward only): 2 N_vit per patch token.

Peak: bf16 dense tensor-core FLOP/s of the GPU (H100/H200 SXM 989 TFLOP/s, A100 312), or
$BLIP3_PEAK_TFLOPS; on CPU MFU is reported as None unless that variable is set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def _count(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


@dataclass
class FlopsModel:
    """Per-unit FLOP counts derived once from the model and what trains."""

    llm_per_token: float  # without attention
    attn_per_token_per_ctx: float  # times the attended length
    resampler_per_crop: float
    vit_per_crop: float

    def step_flops(self, tokens: int, seq_len: int, crops: int) -> float:
        """FLOPs of one optimiser step that processed `tokens` positions in rows of `seq_len`."""
        return tokens * (self.llm_per_token + self.attn_per_token_per_ctx * seq_len) + crops * (
            self.resampler_per_crop + self.vit_per_crop
        )


def flops_model(model: torch.nn.Module) -> FlopsModel:
    """Build the FLOP counts from an XGenMM-shaped model (vision_encoder / vision_tokenizer / lang_model)."""
    llm = model.lang_model
    cfg = llm.config
    n_frozen = _count(llm, trainable=False)
    n_train = _count(llm, trainable=True)
    emb = cfg.vocab_size * cfg.hidden_size  # the embedding lookup is not a matmul
    n_frozen_mm = max(n_frozen - emb, 0) if not _embed_trainable(llm) else n_frozen
    n_train_mm = n_train - (emb if _embed_trainable(llm) else 0)
    res = model.vision_tokenizer
    res_train = any(p.requires_grad for p in res.parameters())
    # frozen LLM weights still pass gradients to their inputs when LoRA or the resampler trains
    frozen_mult = 4.0 if (n_train or res_train) else 2.0
    llm_tok = frozen_mult * n_frozen_mm + 6.0 * n_train_mm
    attn = 12.0 * cfg.num_hidden_layers * cfg.hidden_size
    n_lat = int(model.config.num_latents)
    n_media = int(model.config.num_patches)  # ViT patch tokens per crop
    n_res = _count(res)
    kv = sum(p.numel() for n, p in res.named_parameters() if "to_kv" in n)
    res_flops = (6.0 if res_train else 2.0) * ((n_res - kv) * n_lat + kv * (n_media + n_lat))
    n_vit = _count(model.vision_encoder)
    return FlopsModel(llm_tok, attn, res_flops, 2.0 * n_vit * n_media)


def _embed_trainable(llm: torch.nn.Module) -> bool:
    return llm.get_input_embeddings().weight.requires_grad


def peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak FLOP/s of `device`, from $BLIP3_PEAK_TFLOPS or the GPU's name; None if unknown."""
    env = os.environ.get("BLIP3_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def mfu(step_flops: float, seconds: float, peak: float | None, world_size: int = 1) -> float | None:
    if peak is None or seconds <= 0:
        return None
    return step_flops / seconds / (peak * world_size)
