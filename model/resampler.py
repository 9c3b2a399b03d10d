"""Perceiver Resampler: compress one crop's patch tokens to a fixed set of latents.

Flamingo-style, as in xGen-MM: learned latents cross-attend to concat(media, latents), then a
feed-forward; after `depth` such layers, LayerNorm and a projection to the LLM width. Module
names and shapes match the released checkpoint's `vision_tokenizer` (the table written out in `tests/test_model_resampler.py`), so it
loads with strict=True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PerceiverAttention(nn.Module):
    """Latents (queries) attend to media and themselves (keys/values); padded media keys masked."""

    def __init__(self, *, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.scale = dim_head**-0.5
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # x: (B, N, D) media, latents: (B, L, D), mask: (B, N) bool, True = real patch
        B, N, _ = x.shape
        L = latents.shape[1]
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)  # (B, L, H*Dh)
        k, v = self.to_kv(torch.cat((x, latents), dim=1)).chunk(2, dim=-1)  # (B, N+L, H*Dh) each
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, *, Dh)
        attn_mask = None
        if mask is not None:
            keep = torch.cat((mask.bool(), mask.new_ones(B, L, dtype=torch.bool)), dim=1)  # latents always visible
            attn_mask = keep[:, None, None, :]  # (B, 1, 1, N+L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)  # (B, H, L, Dh)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, L, D)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm, Linear, GELU, Linear (indices 0..3 are the checkpoint's names)."""
    inner = dim * mult
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False))


class PerceiverResampler(nn.Module):
    """`forward(x [B, N, dim], mask [B, N] bool | None) -> [B, num_latents, dim_inner]`."""

    def __init__(self, *, dim: int, dim_inner: int, depth: int, dim_head: int, heads: int, num_latents: int, ff_mult: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.projection = nn.Linear(dim, dim_inner)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        latents = self.latents.to(x.dtype).expand(x.shape[0], -1, -1)  # (B, L, dim)
        for attn, ff in self.layers:
            latents = attn(x, latents, mask) + latents
            latents = ff(latents) + latents
        return self.projection(self.norm(latents))  # (B, L, dim_inner)
