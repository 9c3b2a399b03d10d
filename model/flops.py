"""FLOPs of one training step, nanoGPT-style, for MFU.

LLM: 6N per token (forward + backward over the trained weights; the input embedding is a lookup
and is left out) plus the attention term 12 * layers * hidden * seq_len. Resampler: its matmuls
per crop, x3 for forward + backward. Frozen ViT: 2N per patch token, forward only.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def vit_patch_params(visual: nn.Module) -> int:
    """ViT weights a patch token goes through (the pooling head is never run)."""
    skip = ("attn_pool", "head.", "proj")
    return sum(p.numel() for n, p in visual.named_parameters() if not any(s in n for s in skip))


@dataclass
class StepFlops:
    llm: float
    resampler: float
    vit: float

    @property
    def total(self) -> float:
        return self.llm + self.resampler + self.vit


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


def step_flops(model, *, tokens: int, seq_len: int, crops: int) -> StepFlops:
    """FLOPs of one forward+backward over `tokens` sequence positions (image tokens included)
    in rows of `seq_len`, with `crops` crops through the ViT and the resampler."""
    cfg = model.config
    lm = model.lang_model
    n_llm = _params(lm) - lm.get_input_embeddings().weight.numel()
    layers, hidden = lm.config.num_hidden_layers, lm.config.hidden_size
    llm = tokens * (6 * n_llm + 12 * layers * hidden * seq_len)
    resampler = crops * 3 * resampler_forward_flops(cfg)
    vit = crops * cfg.num_patches * 2 * vit_patch_params(model.vision_encoder)
    return StepFlops(llm=float(llm), resampler=float(resampler), vit=float(vit))
