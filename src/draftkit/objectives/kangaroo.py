"""Kangaroo's loss: soft cross entropy from the adapter's next-token distribution to the full model's, at the same position.

Both models predict token t + 1 from position t (the adapter reads the target's early exit at t), so there is no shift
between their logits; a position counts when the token it predicts is a trained one (labels[t + 1] is not ignored).
The logged alpha_hat = Σ min(p, q) per position (the reference's `prob_acc`) estimates the acceptance rate under speculative sampling (1 − TVD).
"""

from __future__ import annotations

import torch

from draftkit.objectives.ce import IGNORE_INDEX
from draftkit.objectives.kl import soft_cross_entropy
from draftkit.objectives.types import LossOutput


def predicted_token_mask(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """[B, T] labels -> [B, T] bool: position t counts when labels[t + 1] is trained; the last position never does."""
    counted = torch.zeros_like(labels, dtype=torch.bool)
    counted[:, :-1] = labels[:, 1:] != ignore_index
    return counted


def kangaroo_loss(adapter_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor,
                  *, temperature: float = 1.0) -> LossOutput:
    """adapter_logits, target_logits: [B, T, V] at the same positions; labels [B, T] with IGNORE_INDEX where masked."""
    return soft_cross_entropy(adapter_logits, target_logits, predicted_token_mask(labels), temperature=temperature)
