"""Per-token log-probabilities of the labels without materialising the full fp32 logits.

Every training objective we have needs only log p(label) at the labelled positions: cross-entropy
is minus their sum, DPO sums them per sequence. The LM head's logits are (tokens x vocabulary);
at phi3-mini size (vocab 32064) an fp32 copy of them for a 4 x 2048 micro-batch is 1 GB, plus as
much again for the softmax in backward. `token_logps` walks the tokens in chunks: each chunk's
logits are computed, reduced to one number per token and dropped; backward recomputes the chunk
(`torch.utils.checkpoint`), so peak memory holds one chunk of logits, whatever the batch. The
result is the same computation as the dense path (`dense_token_logps`), in a different order of
work only, which the tests check for values and gradients.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .config import IGNORE_INDEX

#: Tokens per chunk: 4096 x 32064 fp32 logits = 0.5 GB at phi3-mini size.
DEFAULT_CHUNK = 4096
LOSS_IMPLS = ("chunked", "dense")


def shift_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, mask) for hidden positions 0..T-2: position t predicts label t+1; mask = labelled."""
    target = labels[:, 1:]
    return target.clamp(min=0), target != IGNORE_INDEX


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 target: torch.Tensor) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    picked = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias: torch.Tensor | None = None,
                chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (B, T, D), LM-head weight (V, D) and bias (V) or None, labels (B, T) unshifted ->
    (log p of each next label (B, T-1) float32, 0 where unlabelled; the labelled mask (B, T-1))."""
    chunk = chunk or DEFAULT_CHUNK
    target, mask = shift_targets(labels)
    h = hidden[:, :-1]
    B, T1, D = h.shape
    flat_h, flat_t = h.reshape(B * T1, D), target.reshape(B * T1)
    parts = []
    for s in range(0, flat_h.shape[0], chunk):
        hs, ts = flat_h[s:s + chunk], flat_t[s:s + chunk]
        if torch.is_grad_enabled() and (hs.requires_grad or weight.requires_grad):
            parts.append(checkpoint(_chunk_logps, hs, weight, bias, ts, use_reentrant=False))
        else:
            parts.append(_chunk_logps(hs, weight, bias, ts))
    logps = torch.cat(parts).reshape(B, T1) if parts else hidden.new_zeros(B, T1, dtype=torch.float32)
    return logps * mask, mask


def dense_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same quantity from full logits (B, T, V): the reference the chunked path must equal."""
    target, mask = shift_targets(labels)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return torch.gather(logp, 2, target.unsqueeze(-1)).squeeze(-1) * mask, mask
