"""EAGLE-3 objective: training-time test, a weighted soft cross-entropy per unrolled draft step.

Alignment (as objectives/fspad.py): draft position t reads (g_t, x_{t+1}) for t = 0..T-2. Unrolled step j (0-based) at
position t stands where a chain rooted at t stands at depth j + 1: it reads x_{t+1+j} and predicts x_{t+j+2}, whose
teacher is the target's distribution at position t + j + 1. It counts where x_{t+j+2} is a trained token
(labels[t + j + 2] != IGNORE_INDEX), so later steps count fewer positions at the end of each reply.

Loss: Σ_j w_j · Σ_counted softCE(draft_j, target_{t+j+1}), with w_j = decay^j (the EAGLE-3 reference trainer unrolls
7 steps weighted 0.8^j) unless the weights are given. The count is step 0's, so
loss / count is the weighted sum of the per-step means up to the shorter tails. FSPAD's partial alignment adds
regression_weight · SmoothL1(regress_j, g_{t+j+1}) on the same positions: the fed-back half is pulled toward the fused
target feature it stands in for (objectives/fspad.py's regression, detached target).
"""

from __future__ import annotations

from typing import Sequence

import torch

from draftkit.objectives.ce import IGNORE_INDEX
from draftkit.objectives.fspad import feature_regression
from draftkit.objectives.kl import soft_cross_entropy
from draftkit.objectives.linear_logits import LinearLogits
from draftkit.objectives.types import LossOutput


def ttt_masks(labels: torch.Tensor, steps: int, ignore_index: int = IGNORE_INDEX) -> list[torch.Tensor]:
    """labels [B, T] -> per step j a bool mask [B, T-1] over draft positions t: x_{t+j+2} is trained."""
    batch, length = labels.shape
    masks = []
    for step in range(steps):
        trained = labels[:, step + 2:] != ignore_index
        pad = trained.new_zeros(batch, max(0, length - 1 - trained.shape[1]))
        masks.append(torch.cat([trained, pad], dim=1)[:, : max(0, length - 1)])
    return masks


def step_weights(steps: int, decay: float, weights: Sequence[float] | None = None) -> list[float]:
    """The per-step loss weights: `weights` as given (one per step), else decay^j."""
    if steps < 1:
        raise ValueError(f"training-time test needs at least one step; got {steps}")
    if weights is None:
        return [float(decay) ** step for step in range(steps)]
    weights = [float(w) for w in weights]
    if len(weights) != steps or any(w < 0 for w in weights):
        raise ValueError(f"step weights {weights}: give {steps} non-negative numbers (one per unrolled step), or null "
                         f"for decay^j")
    return weights


def eagle3_loss(
    draft_logits: Sequence[torch.Tensor | LinearLogits],
    teacher_logits: Sequence[torch.Tensor | LinearLogits],
    weights: Sequence[float],
    *,
    regress: Sequence[torch.Tensor] | None = None,
    regress_targets: Sequence[torch.Tensor] | None = None,
    regression_weight: float = 1.0,
) -> LossOutput:
    """Per step j: draft_logits[j] and teacher_logits[j] [N_j, V] at that step's counted positions (N_0 first: it is
    the count); regress[j] and regress_targets[j] [N_j, H] with partial alignment. Metrics (sums, which the loop divides
    by the count): soft_ce_{j}, top1_{j} (draft argmax == target argmax), alpha_hat_{j} (Σ min(p, q)) per step, and
    soft_ce / top1 / alpha_hat of step 0 for comparison with the other feature drafters."""
    if not len(draft_logits) == len(teacher_logits) == len(weights) or not weights:
        raise ValueError(f"{len(draft_logits)} steps of draft logits, {len(teacher_logits)} of teacher logits, "
                         f"{len(weights)} weights: give one of each per step")
    count = None
    total = None
    metrics: dict[str, torch.Tensor] = {}
    for step, (student, teacher, weight) in enumerate(zip(draft_logits, teacher_logits, weights)):
        rows = student.shape[0]
        everywhere = torch.ones(rows, dtype=torch.bool, device=_device(student))
        ce = soft_cross_entropy(student, teacher, everywhere)
        if "top1" in ce.metrics:
            top1 = ce.metrics["top1"]
        else:
            with torch.no_grad():
                top1 = (student.argmax(-1) == teacher.argmax(-1)).sum().float()
        term = weight * ce.loss_sum
        metrics[f"soft_ce_{step}"] = ce.loss_sum.detach()
        metrics[f"top1_{step}"] = top1
        metrics[f"alpha_hat_{step}"] = ce.metrics["alpha_hat"]
        if regress is not None:
            regression = feature_regression(regress[step], regress_targets[step], everywhere)
            metrics[f"feature_smooth_l1_{step}"] = regression.detach()
            term = term + weight * regression_weight * regression
        total = term if total is None else total + term
        if count is None:
            count = ce.count
    metrics.update(soft_ce=metrics["soft_ce_0"], top1=metrics["top1_0"], alpha_hat=metrics["alpha_hat_0"])
    return LossOutput(loss_sum=total, count=count, metrics=metrics)


def _device(logits) -> torch.device:
    return logits.hidden.device if isinstance(logits, LinearLogits) else logits.device
