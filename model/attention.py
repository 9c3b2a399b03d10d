"""The language model's attention implementation, chosen per stage (`runtime.attention`).

- `dense`: transformers' SDPA. Packed rows carry a (B, 1, T, T) additive mask
  (`xgenmm.packing_mask`), which keeps SDPA off its flash kernel and costs T x T memory per row.
- `flex`: FlexAttention. Packed rows carry a `BlockMask` built from `segment_ids` (same segment,
  causal, padding sees itself: the dense mask's rule), so whole blocks outside every segment are
  skipped and no T x T tensor is kept. Rows without packing get transformers' own flex mask.

FlexAttention is compiled once on a GPU (the fused kernel, forward and backward). Elsewhere it runs
torch's eager reference implementation, and torch has no FlexAttention backward on CPU: there
`flex` serves forward passes (eval, logits) only, and a CPU training run is refused at build time.
Registered under our own name rather than transformers' `flex_attention`, whose wrapper always
compiles (and whose CPU backward fails to compile).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ATTENTION = ("dense", "flex")
FLEX_NAME = "blip3_flex"  # the name registered with transformers' attention interfaces
_IMPL = {"dense": "sdpa", "flex": FLEX_NAME}
_compiled_flex: Any = None


def _flex_attention():
    """The fused (compiled) kernel on a GPU; inside an enclosing compile, the plain op (dynamo
    traces it into the block's graph)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask, scaling: float | None = None, dropout: float = 0.0,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q, k, v (B, H, T, d) -> (B, T, H, d), no weights."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if dropout > 0:
        raise ValueError("flex attention has no attention dropout; set attention_dropout to 0")
    if attention_mask is not None and not isinstance(attention_mask, BlockMask):
        raise TypeError(f"flex attention takes a BlockMask, got {type(attention_mask).__name__}")
    attend = _flex_attention() if query.device.type == "cuda" else flex_attention
    out = attend(query, key, value, block_mask=attention_mask, scale=scaling,
                 enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    """Make `FLEX_NAME` known to transformers: our attention function, and transformers' own flex
    mask builder for rows without packing (padding masks, generation)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, flex_attention_mask

    if FLEX_NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(FLEX_NAME, flex_attention_forward)
        AttentionMaskInterface.register(FLEX_NAME, flex_attention_mask)


def set_attention(lang_model: nn.Module, attention: str) -> None:
    """Switch a Phi-3 model (`XGenMM.lang_model`) to `attention` ("dense" or "flex"), in place."""
    if attention not in ATTENTION:
        raise ValueError(f"attention is one of {', '.join(ATTENTION)}, got {attention!r}")
    if attention == "flex":
        _register()
    lang_model.config._attn_implementation = _IMPL[attention]


def attention_of(lang_model: nn.Module) -> str:
    """"flex" when `lang_model` runs `FLEX_NAME`, else "dense"."""
    return "flex" if lang_model.config._attn_implementation == FLEX_NAME else "dense"


def packed_block_mask(segment_ids: torch.Tensor):
    """segment_ids (B, T) -> a FlexAttention `BlockMask` with `packing_mask`'s rule: a token sees
    earlier tokens of its own segment; segment 0 (padding) sees itself only. Built compiled on a
    GPU (no (B, T, T) tensor), eagerly elsewhere."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = segment_ids.shape
    seg = segment_ids

    def mask_mod(b, h, q, kv):
        same = (seg[b, q] == seg[b, kv]) & (q >= kv) & (seg[b, q] > 0)
        return same | (q == kv)

    return create_block_mask(mask_mod, B, None, T, T, device=seg.device, _compile=seg.device.type == "cuda")
