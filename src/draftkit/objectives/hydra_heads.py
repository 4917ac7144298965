"""Hydra and Hydra++ losses (Ankner et al. 2024).

Head i (0-based) at position t predicts x_{t+2+i}, like Medusa head i: its hard label is labels[:, t+2+i]
(objectives.medusa.head_targets), and its teacher is the target's distribution for that same token, the target's
logits at position t+1+i (the reference's `softmax(base_logits)[:, shift-1:-1]` with shift = 2+i). The teacher term is
soft cross-entropy (forward KL plus the teacher's entropy). Per head: lm_weight · CE + teacher_weight · softCE, scored
where the hard label exists; heads are summed with weight decay^i (the reference: unweighted, decay = 1).
Hydra: lm_weight 1, teacher_weight 0. Hydra++: lm_weight 0, teacher_weight 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from draftkit.objectives.ce import IGNORE_INDEX
from draftkit.objectives.kl import soft_cross_entropy
from draftkit.objectives.linear_logits import LinearLogits, ahead_losses, chunked_losses
from draftkit.objectives.medusa import head_targets
from draftkit.objectives.types import LossOutput


def rows_ahead_for_heads(rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """rows [B, T, D] (the target's logits or states) -> [K, B, T, D]: entry (i, b, t) is rows[b, t+1+i], the target
    at the position whose output head i is scored against (zeros past the end)."""
    length = rows.shape[1]
    return torch.stack([F.pad(rows[:, 1 + i:], (0, 0, 0, min(1 + i, length)))[:, :length] for i in range(num_heads)])


def hydra_loss(head_logits: torch.Tensor | list[LinearLogits], labels: torch.Tensor,
               target_logits: torch.Tensor | LinearLogits | None = None, *, lm_weight: float = 1.0,
               teacher_weight: float = 0.0, decay: float = 1.0, ignore_index: int = IGNORE_INDEX) -> LossOutput:
    """head_logits [K, B, T, V], or one LinearLogits [B, T, V] per head (computed chunk by chunk); labels [B, T];
    target_logits [B, T, V] (needed when teacher_weight > 0), with LinearLogits heads also as LinearLogits (the
    target's final states and the LM-head rows the heads score: its logits are then made only where a head scores
    them, once for all heads)."""
    if lm_weight < 0 or teacher_weight < 0 or lm_weight + teacher_weight == 0:
        raise ValueError(f"hydra loss weights must be >= 0 and not both 0; got lm={lm_weight}, teacher={teacher_weight}")
    if teacher_weight > 0 and target_logits is None:
        raise ValueError("the teacher term needs the target's logits")
    num_heads = len(head_logits)
    targets = head_targets(labels, num_heads, ignore_index=ignore_index)
    chunked = isinstance(head_logits[0], LinearLogits)
    if teacher_weight > 0 and isinstance(target_logits, LinearLogits) and not chunked:
        raise ValueError("a LinearLogits teacher needs LinearLogits heads; the plain path takes the target's logits")
    if chunked:
        return _chunked_hydra_loss(head_logits, targets, target_logits, lm_weight, teacher_weight, decay, ignore_index)
    teachers = rows_ahead_for_heads(target_logits, num_heads) if teacher_weight > 0 else None
    loss_sum = head_logits.new_zeros((), dtype=torch.float32)
    metrics = {}
    for i in range(num_heads):
        logits = head_logits[i].float()
        mask = targets[i] != ignore_index
        head_sum = logits.new_zeros(())
        if lm_weight > 0:
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[i].reshape(-1),
                                 ignore_index=ignore_index, reduction="sum")
            head_sum = head_sum + lm_weight * ce
            metrics[f"ce_head{i}"] = ce.detach()
        if teacher_weight > 0:
            soft = soft_cross_entropy(logits, teachers[i], mask)
            head_sum = head_sum + teacher_weight * soft.loss_sum
            metrics[f"soft_ce_head{i}"] = soft.loss_sum.detach()
            metrics[f"alpha_hat_head{i}"] = soft.metrics["alpha_hat"]
        loss_sum = loss_sum + decay ** i * head_sum
        with torch.no_grad():
            metrics[f"top1_head{i}"] = ((logits.argmax(-1) == targets[i]) & mask).sum().float()
    return LossOutput(loss_sum=loss_sum, count=(targets[0] != ignore_index).sum(), metrics=metrics)


def _chunked_hydra_loss(head_logits: list[LinearLogits], targets: torch.Tensor,
                        target_logits: torch.Tensor | LinearLogits | None, lm_weight: float, teacher_weight: float,
                        decay: float, ignore_index: int) -> LossOutput:
    """hydra_loss with both terms of every head taken in chunked passes over its logits. With a teacher, all heads
    share one pass (ahead_losses): the teacher of head i is the target's row i + 1 ahead, read in place, and each
    teacher row is softmaxed (and, from LinearLogits, projected) once for every head that scores against it."""
    if teacher_weight > 0:
        outs = ahead_losses(head_logits, target_logits, [1 + i for i in range(len(head_logits))],
                            labels=list(targets), label_weight=lm_weight, teacher_weight=teacher_weight,
                            ignore_index=ignore_index)
    else:
        outs = [chunked_losses(logits, labels=targets[i], label_weight=lm_weight, teacher_weight=0.0,
                               ignore_index=ignore_index) for i, logits in enumerate(head_logits)]
    loss_sum = torch.zeros((), dtype=torch.float32, device=targets.device)
    metrics = {}
    for i, out in enumerate(outs):
        if teacher_weight > 0:
            metrics[f"soft_ce_head{i}"] = out.metrics["soft_ce"]
            metrics[f"alpha_hat_head{i}"] = out.metrics["alpha_hat"]
        if lm_weight > 0:
            metrics[f"ce_head{i}"] = out.metrics["ce"]
        metrics[f"top1_head{i}"] = out.metrics["top1"]
        loss_sum = loss_sum + decay ** i * out.loss_sum
    return LossOutput(loss_sum=loss_sum, count=(targets[0] != ignore_index).sum(), metrics=metrics)
