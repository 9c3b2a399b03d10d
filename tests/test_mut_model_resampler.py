"""The Perceiver Resampler computes what Flamingo / xGen-MM write down, checked against a reference
written here from the formulas (softmax attention in plain einsum, pre-norm residual layers), on
the module's own weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blip3.model.resampler import PerceiverResampler


def _reference(r: PerceiverResampler, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """latents <- latents + attn(norm(x), norm(latents)); latents <- latents + ff(latents); then
    LayerNorm and the projection. Attention: softmax(q k^T / sqrt(dh)) v over [media; latents]."""
    B, N, D = x.shape
    lat = r.latents.expand(B, -1, -1)
    L = lat.shape[1]
    for attn, ff in r.layers:
        h = attn.heads
        xm = F.layer_norm(x, (D,), attn.norm_media.weight, attn.norm_media.bias)
        ln = F.layer_norm(lat, (D,), attn.norm_latents.weight, attn.norm_latents.bias)
        q = ln @ attn.to_q.weight.T
        kv = torch.cat([xm, ln], dim=1) @ attn.to_kv.weight.T
        k, v = kv[..., : kv.shape[-1] // 2], kv[..., kv.shape[-1] // 2 :]
        dh = q.shape[-1] // h
        q, k, v = (t.reshape(B, t.shape[1], h, dh).permute(0, 2, 1, 3) for t in (q, k, v))
        scores = torch.einsum("bhld,bhnd->bhln", q, k) / dh**0.5
        if mask is not None:
            keep = torch.cat([mask, torch.ones(B, L, dtype=torch.bool)], dim=1)
            scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        out = torch.einsum("bhln,bhnd->bhld", scores.softmax(-1), v).permute(0, 2, 1, 3).reshape(B, L, h * dh)
        lat = out @ attn.to_out.weight.T + lat
        lat = ff(lat) + lat
    return F.layer_norm(lat, (D,), r.norm.weight, r.norm.bias) @ r.projection.weight.T + r.projection.bias


def _resampler() -> PerceiverResampler:
    torch.manual_seed(0)
    r = PerceiverResampler(dim=16, dim_inner=24, depth=2, dim_head=8, heads=2, num_latents=5, ff_mult=2).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm shows
        for name, p in r.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return r


def test_resampler_matches_the_written_formula():
    r = _resampler()
    x = torch.randn(2, 7, 16)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.no_grad():
        assert torch.allclose(r(x, mask), _reference(r, x, mask), atol=1e-5)
        assert torch.allclose(r(x), _reference(r, x, None), atol=1e-5)


def test_resampler_keeps_the_input_dtype():
    r = _resampler().to(torch.float64)
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        out = r(x)
    assert out.dtype == torch.float64
    assert torch.allclose(out, _reference(r, x, None), atol=1e-10)
