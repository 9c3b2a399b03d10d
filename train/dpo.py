"""The DPO objective (Rafailov et al. 2023), computed in our loop.

trl 1.16's `DPOTrainer` reads `outputs.log_probs` from a patched LM head and has no standalone
loss function, and our multimodal forward takes pixel values and crop masks it does not know. So
the loop computes the same quantities itself: the summed log-probability of each response's
tokens (labels != -100, next-token shifted), for the policy and for the frozen reference (the
adapter-disabled model), and trl's `sigmoid` loss on top. `tests/test_train_dpo.py` proves the
value equal to trl's own `DPOTrainer.compute_loss` on a text-only tiny Phi-3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blip3.model.loss import dense_token_logps


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over each row of log p(label_t+1 | <= t) where the label is not -100.

    logits [B, T, V], labels [B, T] aligned with input_ids (not yet shifted) -> [B] float32.
    (The trainer gets the same per-token values chunked from the model: `model.loss`.)
    """
    return dense_token_logps(logits, labels)[0].sum(dim=1)


@dataclass
class DpoOutput:
    loss: torch.Tensor  # scalar, mean over pairs
    chosen_rewards: torch.Tensor  # beta * (log pi - log ref) of the chosen responses, [P]
    rejected_rewards: torch.Tensor  # the same for the rejected responses, [P]

    @property
    def margin(self) -> torch.Tensor:
        """Mean reward margin chosen - rejected: what DPO pushes up."""
        return (self.chosen_rewards - self.rejected_rewards).mean()


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> DpoOutput:
    """Sigmoid DPO loss: -log sigma(beta * ((pi_c - ref_c) - (pi_r - ref_r))), mean over pairs."""
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    return DpoOutput(loss=loss, chosen_rewards=beta * chosen.detach(), rejected_rewards=beta * rejected.detach())
