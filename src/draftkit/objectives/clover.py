"""Clover-2 loss (Xiao et al. 2024): Σ_i decay^i · [feature_weight · SmoothL1(out_i, f_{t+1+i})
+ token_weight · softCE(p_target(· | f_{t+1+i}), LMHead(out_i))], with decay 0.7, feature_weight 10, token_weight 1.

Head i at position t regresses the target's post-norm feature at t+1+i (the state whose logits give x_{t+2+i}) and
matches the target's distribution there. Scored where labels[t+2+i] exists (assistant tokens; the reference does not
shift its loss mask, which is off by one at turn boundaries). The SmoothL1 is summed over the
hidden dimension and averaged over it, so one position contributes one number per term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from draftkit.objectives.ce import IGNORE_INDEX
from draftkit.objectives.hydra_heads import rows_ahead_for_heads
from draftkit.objectives.kl import soft_cross_entropy
from draftkit.objectives.linear_logits import LinearLogits, ahead_losses
from draftkit.objectives.medusa import head_targets
from draftkit.objectives.types import LossOutput


def clover_loss(head_features: torch.Tensor, head_logits: torch.Tensor | list[LinearLogits],
                target_features: torch.Tensor, target_logits: torch.Tensor | LinearLogits, labels: torch.Tensor, *,
                feature_weight: float = 10.0, token_weight: float = 1.0, decay: float = 0.7,
                ignore_index: int = IGNORE_INDEX) -> LossOutput:
    """head_features [K, B, T, H], head_logits [K, B, T, V] or one LinearLogits [B, T, V] per head (computed chunk by
    chunk); target_features [B, T, H] (post-norm) and target_logits [B, T, V] at the same positions as the input, with
    LinearLogits heads also as LinearLogits (target_features and the LM-head rows the heads score: the teacher's
    logits are then made only where a head scores them, once for all heads); labels [B, T]."""
    num_heads = head_features.shape[0]
    masks = head_targets(labels, num_heads, ignore_index=ignore_index) != ignore_index
    feature_targets = rows_ahead_for_heads(target_features, num_heads)  # the same shift: position t+1+i
    chunked = isinstance(head_logits[0], LinearLogits)
    if isinstance(target_logits, LinearLogits) and not chunked:
        raise ValueError("a LinearLogits teacher needs LinearLogits heads; the plain path takes the target's logits")
    if chunked:  # every head's teacher i + 1 rows ahead, read in place, in one pass over the teacher
        softs = ahead_losses(list(head_logits), target_logits, [1 + i for i in range(num_heads)], masks=list(masks),
                             label_weight=0.0)
    else:
        teachers = rows_ahead_for_heads(target_logits, num_heads)
        softs = [soft_cross_entropy(head_logits[i], teachers[i], masks[i]) for i in range(num_heads)]
    loss_sum = head_features.new_zeros((), dtype=torch.float32)
    metrics = {}
    for i in range(num_heads):
        mask = masks[i]
        regression = F.smooth_l1_loss(head_features[i].float(), feature_targets[i].float().detach(), reduction="none")
        regression = regression.mean(-1).masked_fill(~mask, 0.0).sum()
        soft = softs[i]
        loss_sum = loss_sum + decay ** i * (feature_weight * regression + token_weight * soft.loss_sum)
        metrics[f"smooth_l1_head{i}"] = regression.detach()
        metrics[f"soft_ce_head{i}"] = soft.loss_sum.detach()
        metrics[f"alpha_hat_head{i}"] = soft.metrics["alpha_hat"]
    return LossOutput(loss_sum=loss_sum, count=masks[0].sum(), metrics=metrics)
