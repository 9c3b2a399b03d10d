"""FLOPs of a training step and model FLOPs utilisation (MFU): achieved model FLOPs per second over
the device's peak. The one count used by the trainer and the benchmarks.

Counted as nanoGPT / PaLM do (matmul FLOPs only, no recompute from activation checkpointing), and
according to what trains:

- LLM, per sequence position: 2N forward. Trained weights add 4N backward (grad of inputs and of
  weights): 6N. Frozen weights still pass gradients to their inputs when anything upstream or
  inside trains (LoRA adapters, the resampler): 4N; 2N when nothing trains. The input embedding is
  a lookup and is left out. Attention scores and values: 12 * layers * hidden * T_ctx per position
  (fwd+bwd), where T_ctx is the attended length: the row length by default (what a dense mask
  computes), or each token's own packed segment (`attended`: the sum of squared segment lengths,
  what a block-diagonal kernel such as FlexAttention needs to compute). Both are reported.
- Resampler, per crop: its matmuls for P patch tokens -> L latents (projections, attention, feed-
  forward, output projection); x3 for forward + backward if trained, x1 when frozen (nothing
  upstream needs its input grads).
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
class StepFlops:
    """One step's FLOPs by component."""

    llm: float
    resampler: float
    vit: float

    @property
    def total(self) -> float:
        return self.llm + self.resampler + self.vit


@dataclass
class FlopsModel:
    """Per-unit FLOP counts derived once from the model and what trains."""

    llm_per_token: float  # without attention
    attn_per_token_per_ctx: float  # times the attended length
    resampler_per_crop: float
    vit_per_crop: float

    def breakdown(self, tokens: int, seq_len: int, crops: int, attended: int | None = None) -> StepFlops:
        """FLOPs of one optimiser step that processed `tokens` positions (image tokens included) in
        rows of `seq_len`, with `crops` crops through the ViT and the resampler.

        `attended` is the sum over positions of the context each attends to; None counts every
        position against its whole row (`tokens * seq_len`). For packed rows pass
        `attended_positions(segment_ids)` to count attention within each segment only."""
        ctx = tokens * seq_len if attended is None else attended
        return StepFlops(
            llm=float(tokens * self.llm_per_token + self.attn_per_token_per_ctx * ctx),
            resampler=float(crops * self.resampler_per_crop),
            vit=float(crops * self.vit_per_crop),
        )

    def step_flops(self, tokens: int, seq_len: int, crops: int, attended: int | None = None) -> float:
        return self.breakdown(tokens, seq_len, crops, attended).total


def attended_positions(segment_ids: torch.Tensor) -> int:
    """Sum over positions of the length of the packed segment each belongs to (sum of squared
    segment lengths per row); padding (segment 0) attends to nothing."""
    total = 0
    for row in segment_ids:
        _, counts = torch.unique(row[row > 0], return_counts=True)
        total += int((counts.long() ** 2).sum())
    return total


def resampler_forward_flops(cfg) -> float:
    """Forward FLOPs for one crop (P patch tokens -> L latents)."""
    P, L, D = cfg.num_patches, cfg.num_latents, cfg.vision_width
    inner = cfg.resampler_heads * cfg.resampler_dim_head
    per_layer = (
        2 * L * D * inner  # to_q
        + 2 * (P + L) * D * 2 * inner  # to_kv over concat(media, latents)
        + 2 * 2 * L * (P + L) * inner  # scores + weighted sum
        + 2 * L * inner * D  # to_out
        + 2 * 2 * L * D * D * cfg.resampler_ff_mult  # feed-forward
    )
    return cfg.resampler_depth * per_layer + 2 * L * D * cfg.hidden_size  # + projection


def flops_model(model: torch.nn.Module) -> FlopsModel:
    """Build the FLOP counts from an XGenMM-shaped model (vision_encoder / vision_tokenizer / lang_model)."""
    llm = model.lang_model
    cfg = llm.config
    emb = llm.get_input_embeddings().weight
    n_frozen = _count(llm, trainable=False) - (0 if emb.requires_grad else emb.numel())
    n_train = _count(llm, trainable=True) - (emb.numel() if emb.requires_grad else 0)
    res_train = any(p.requires_grad for p in model.vision_tokenizer.parameters())
    frozen_mult = 4.0 if (n_train or res_train) else 2.0
    llm_tok = frozen_mult * n_frozen + 6.0 * n_train
    attn = 12.0 * cfg.num_hidden_layers * cfg.hidden_size
    res_flops = (3.0 if res_train else 1.0) * resampler_forward_flops(model.config)
    n_vit = _count(model.vision_encoder)
    return FlopsModel(llm_tok, attn, res_flops, 2.0 * n_vit * int(model.config.num_patches))


def step_flops(model: torch.nn.Module, *, tokens: int, seq_len: int, crops: int) -> StepFlops:
    """FLOPs of one forward+backward of `model` as it is set to train, by component."""
    return flops_model(model).breakdown(tokens, seq_len, crops)


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


def mfu(step_flops: float, seconds: float, peak: float | None) -> float | None:
    """One device's FLOPs per second over its peak; None when the peak is unknown."""
    if peak is None or seconds <= 0:
        return None
    return step_flops / seconds / peak
