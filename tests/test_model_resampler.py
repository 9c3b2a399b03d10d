"""Perceiver Resampler: shapes, key masks, and the released checkpoint's names/shapes/count."""

from __future__ import annotations

import torch

from blip3.model.config import get_config
from blip3.model.resampler import PerceiverResampler

REAL = dict(dim=1152, dim_inner=3072, depth=6, dim_head=96, heads=16, num_latents=128, ff_mult=4)


def small(**over) -> PerceiverResampler:
    torch.manual_seed(0)
    kw = dict(dim=32, dim_inner=48, depth=2, dim_head=8, heads=4, num_latents=6, ff_mult=2) | over
    return PerceiverResampler(**kw).eval()


def spec_table() -> dict[str, tuple[int, ...]]:
    """The table of the released `vision_tokenizer` state dict, written out by hand."""
    t: dict[str, tuple[int, ...]] = {"latents": (128, 1152)}
    for i in range(6):
        for n in ("norm_media", "norm_latents"):
            t[f"layers.{i}.0.{n}.weight"] = (1152,)
            t[f"layers.{i}.0.{n}.bias"] = (1152,)
        t[f"layers.{i}.0.to_q.weight"] = (1536, 1152)
        t[f"layers.{i}.0.to_kv.weight"] = (3072, 1152)
        t[f"layers.{i}.0.to_out.weight"] = (1152, 1536)
        t[f"layers.{i}.1.0.weight"] = (1152,)
        t[f"layers.{i}.1.0.bias"] = (1152,)
        t[f"layers.{i}.1.1.weight"] = (4608, 1152)
        t[f"layers.{i}.1.3.weight"] = (1152, 4608)
    t |= {"norm.weight": (1152,), "norm.bias": (1152,), "projection.weight": (3072, 1152), "projection.bias": (3072,)}
    return t


def test_output_shape_and_dtype():
    r = small()
    out = r(torch.randn(3, 10, 32))
    assert out.shape == (3, 6, 48)
    out = r(torch.randn(1, 1, 32), torch.ones(1, 1, dtype=torch.bool))
    assert out.shape == (1, 6, 48)


def test_padding_keys_change_nothing():
    """Masked patches may hold anything; the output equals the run on the real patches alone."""
    r = small()
    x = torch.randn(2, 12, 32)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, :7] = True
    mask[1, 3:12] = True
    y = r(x, mask)
    x2 = x.clone()
    x2[~mask] = 1000.0 * torch.randn(int((~mask).sum()), 32)
    assert torch.allclose(r(x2, mask), y, atol=1e-5)
    assert torch.allclose(y[0:1], r(x[0:1, :7]), atol=1e-5)
    assert torch.allclose(y[1:2], r(x[1:2, 3:12]), atol=1e-5)
    # and the mask is really used: without it the padded values leak in
    assert not torch.allclose(r(x2), y, atol=1e-3)


def test_all_padding_crop_is_finite():
    """A crop that is all padding still has the latents as keys: no NaN."""
    r = small()
    out = r(torch.randn(1, 5, 32), torch.zeros(1, 5, dtype=torch.bool))
    assert torch.isfinite(out).all()


def test_real_size_names_shapes_and_count_on_meta():
    with torch.device("meta"):
        r = PerceiverResampler(**REAL)
    got = {k: tuple(v.shape) for k, v in r.state_dict().items()}
    assert got == spec_table()
    assert sum(p.numel() for p in r.parameters()) == 109_901_568


def test_config_preset_builds_the_spec_resampler():
    from blip3.model.xgenmm import XGenMM

    with torch.device("meta"):
        m = XGenMM(get_config("phi3-mini"))
    got = {k: tuple(v.shape) for k, v in m.vision_tokenizer.state_dict().items()}
    assert got == spec_table()
    # the timm-backed SigLIP so400m gives 729 patch tokens of width 1152 per 384x384 crop
    from blip3.model.vision import patch_tokens

    feats = patch_tokens(m.vision_encoder, torch.empty(2, 3, 384, 384, device="meta"))
    assert tuple(feats.shape) == (2, 729, 1152)
    assert m.lang_model.config.vocab_size == 32064 and m.lang_model.config.hidden_size == 3072
    assert type(m.lang_model).__name__ == "Phi3ForCausalLM"
