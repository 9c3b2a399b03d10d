"""What a stage optimises, as objects the builders choose, so the loop never asks which stage it runs.

An objective splits its loss into a *sum over items* per micro-batch and a count of items; the
loop divides the summed loss of all micro-batches and all ranks by the items of the whole step,
counted before the step starts (the Hugging Face `num_items_in_batch` convention). So the step
optimises one mean, whatever the split into micro-batches, accumulation steps and ranks:

- `CrossEntropy`: items are labelled tokens (after the model's own label masking: images,
  padding, the first token of each packed segment). A mean of micro-batch means would weight a
  token of a short batch more than a token of a long one, and change with `grad_accum`.
- `Dpo`: items are preference pairs; the loss stays a mean over the step's pairs.

Both read log p of each next label from the model (`XGenMM.forward(token_logps=...)`), chunked
by default, so neither materialises the full fp32 logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from blip3.model.xgenmm import labelled_tokens, train_labels
from blip3.train.data import Batch
from blip3.train.dpo import dpo_loss


class Objective(Protocol):
    def items(self, batch: Batch) -> int:
        """The items (tokens, pairs) this micro-batch contributes to the step's mean; host only."""

    def __call__(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss summed over the batch's items, metrics summed over them) for one micro-batch."""


def _forward_inputs(batch: Batch, impl: str) -> dict:
    # no KV cache in training: a recomputed (activation-checkpointed) block would append to it twice
    return {**batch.inputs, "use_cache": False, "token_logps": impl}


@dataclass
class CrossEntropy:
    """Next-token cross-entropy summed over labelled tokens."""

    placeholder_id: int
    impl: str = "chunked"

    def items(self, batch: Batch) -> int:
        inputs = batch.inputs
        seg = inputs.get("segment_ids")
        if seg is not None and inputs.get("attention_mask") is not None:
            seg = seg * inputs["attention_mask"].to(seg.dtype)
        return labelled_tokens(train_labels(inputs["input_ids"], inputs["labels"], self.placeholder_id, seg))

    def __call__(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(**_forward_inputs(batch, self.impl))
        return -out.logps.sum(), {}


@dataclass
class Dpo:
    """DPO of the policy against the same model with its adapters disabled (the reference)."""

    beta: float
    impl: str = "chunked"

    def items(self, batch: Batch) -> int:
        return batch.n_pairs

    def __call__(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = _forward_inputs(batch, self.impl)
        logps = model(**inputs).logps.sum(dim=1)
        with torch.no_grad(), model.disable_adapter():
            ref = model(**inputs).logps.sum(dim=1)
        p = batch.n_pairs
        out = dpo_loss(logps[:p], logps[p:], ref[:p], ref[p:], self.beta)
        wins = (out.chosen_rewards > out.rejected_rewards).float().sum()
        return out.loss * p, {"margin": out.margin.detach() * p, "reward_acc": wins}
