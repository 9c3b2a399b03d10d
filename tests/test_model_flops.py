"""FLOP formulas for MFU checked against torch's FlopCounterMode on the tiny model.

The counter may or may not see inside the fused attention kernel (it depends on the backend), so
each count must lie between our matmul-only part and our total with the attention term.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from blip3.model.flops import attended_positions, flops_model, resampler_forward_flops, step_flops
from tests.model_fixtures import tiny_config, tiny_model  # noqa: F401


def counted(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_resampler_forward_flops(tiny_model, tiny_config):
    c = tiny_config
    x = torch.randn(1, c.num_patches, c.vision_width)
    got = counted(lambda: tiny_model.vision_tokenizer(x))
    attn = c.resampler_depth * 4 * c.num_latents * (c.num_patches + c.num_latents) * c.resampler_heads * c.resampler_dim_head
    ours = resampler_forward_flops(c)
    assert ours - attn <= got <= ours


def test_llm_step_flops_are_6n_per_token_plus_attention(tiny_config):
    from tests.model_fixtures import build_tiny_model

    model = build_tiny_model(tiny_config).train()
    T = 128
    ids = torch.randint(10, 500, (2, T))
    got = counted(lambda: model(ids, labels=ids).loss.backward())
    ours = step_flops(model, tokens=2 * T, seq_len=T, crops=0)
    lm = model.lang_model.config
    attn = 2 * T * 12 * lm.num_hidden_layers * lm.hidden_size * T
    assert ours.vit == ours.resampler == 0
    assert abs(got - (ours.llm - attn)) / got < 0.01 or abs(got - ours.llm) / got < 0.01


def test_attention_counted_over_each_packed_segment(tiny_config):
    """Segments of 3 and 5 plus 2 padding positions attend over 3*3 + 5*5 positions, not 10*10."""
    from tests.model_fixtures import build_tiny_model

    seg = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 2, 0, 0]])
    assert attended_positions(seg) == 34
    assert attended_positions(torch.tensor([[1, 1], [1, 0]])) == 4 + 1
    fm = flops_model(build_tiny_model(tiny_config).train())
    row, per_seg = fm.breakdown(10, 10, 0), fm.breakdown(10, 10, 0, attended=34)
    assert row.llm - per_seg.llm == fm.attn_per_token_per_ctx * (100 - 34)
