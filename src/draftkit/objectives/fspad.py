"""EAGLE-1 / FSPAD objective: regress the target's next feature and match its next-token distribution.

Alignment (the off-by-one that matters most for feature drafters): draft position t reads (f_t, x_{t+1}) and predicts
f_{t+1}, whose LM-head distribution is the target's distribution of x_{t+2}. Built as input = f[:, :-1], tokens = x[:,
1:], target = f[:, 1:]. Position t counts where x_{t+2} is a trained token (labels[t + 2] != IGNORE_INDEX), so the last
position of every sequence, whose x_{t+2} does not exist, never counts.

Loss per counted position (EAGLE `main.py`, FSPAD `main_fspad.py`):
    regression_weight * SmoothL1(regress, f_{t+1}) (mean over the hidden size)
  + ce_weight * soft CE(LMHead(predict), softmax(LMHead(f_{t+1})))
with the references' weights 1.0 and 0.1 as defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from draftkit.objectives.ce import IGNORE_INDEX
from draftkit.objectives.kl import soft_cross_entropy
from draftkit.objectives.linear_logits import LinearLogits
from draftkit.objectives.types import LossOutput


@dataclass
class FeaturePairs:
    """input_features [B, T-1, H] = f_t; input_ids [B, T-1] = x_{t+1}; target_features [B, T-1, H] = f_{t+1};
    mask [B, T-1]: positions whose predicted token x_{t+2} is trained."""

    input_features: torch.Tensor
    input_ids: torch.Tensor
    target_features: torch.Tensor
    mask: torch.Tensor


def align_pairs(features: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                ignore_index: int = IGNORE_INDEX) -> FeaturePairs:
    """features [B, T, H] (the target's feature at every position), input_ids and labels [B, T]."""
    if features.shape[:2] != input_ids.shape or labels.shape != input_ids.shape:
        raise ValueError(f"features {tuple(features.shape)}, input_ids {tuple(input_ids.shape)} and labels "
                         f"{tuple(labels.shape)} must share [B, T]")
    trained_next_next = labels[:, 2:] != ignore_index
    mask = torch.cat([trained_next_next, trained_next_next.new_zeros(labels.shape[0], 1)], dim=1)
    return FeaturePairs(features[:, :-1], input_ids[:, 1:], features[:, 1:], mask)


def feature_regression(regress: torch.Tensor, target_features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over counted positions of SmoothL1(regress, target) averaged over the hidden size (fp32)."""
    per_position = F.smooth_l1_loss(regress.float(), target_features.detach().float(), reduction="none").mean(-1)
    return per_position.masked_fill(~mask, 0.0).sum()


def fspad_loss(
    draft_logits: torch.Tensor | LinearLogits,
    regress: torch.Tensor,
    target_features: torch.Tensor,
    teacher_logits: torch.Tensor | LinearLogits,
    mask: torch.Tensor,
    *,
    regression_weight: float = 1.0,
    ce_weight: float = 0.1,
) -> LossOutput:
    """draft_logits [B, T, V] = LMHead(predict); regress [B, T, H]; target_features [B, T, H] = f_{t+1};
    teacher_logits [B, T, V] = LMHead(f_{t+1}); mask [B, T] bool. Both logits may be LinearLogits (computed chunk by
    chunk, never all at once). Metrics (sums over counted positions): feature_smooth_l1, soft_ce, alpha_hat
    (Σ min(p, q)) and top1 (draft argmax == target argmax)."""
    mask = mask.to(torch.bool)
    regression = feature_regression(regress, target_features, mask)
    ce = soft_cross_entropy(draft_logits, teacher_logits, mask)
    if "top1" in ce.metrics:
        top1 = ce.metrics["top1"]
    else:
        with torch.no_grad():
            top1 = ((draft_logits.argmax(-1) == teacher_logits.argmax(-1)) & mask).sum().float()
    return LossOutput(
        loss_sum=regression_weight * regression + ce_weight * ce.loss_sum,
        count=ce.count,
        metrics={"feature_smooth_l1": regression.detach(), "soft_ce": ce.loss_sum.detach(),
                 "alpha_hat": ce.metrics["alpha_hat"], "top1": top1},
    )
