"""Medusa losses (Cai et al. 2024).

Alignment: the target's LM head at position t predicts x_{t+1}; Medusa head k (0-based) at position t predicts
x_{t+2+k}, so its logits at t are scored against labels[:, t + 2 + k] (the legacy trainer's `logits_i[:, :-(2+i)]`
vs `labels[:, 2+i:]`). Labels hold IGNORE_INDEX outside assistant tokens and padding, and the last 2 + k positions of
every row have no label for head k.

Medusa-1: Σ_k decay^(k+1) · CE_k (the paper's λ_k = 0.8^k with 1-based k; decay = 1 gives the legacy trainer's
unweighted sum). Every head's CE is summed over its counted positions and the whole is divided by one count, the
positions head 0 is scored at; deeper heads lose a few end positions, so each head's term stays close to its mean.
Medusa-2: the target's own term (next-token CE, or KL to the frozen original model) plus heads_coefficient times the
Medusa-1 loss (axolotl: 0.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from draftkit.objectives.ce import IGNORE_INDEX
from draftkit.objectives.linear_logits import LinearLogits, linear_cross_entropy
from draftkit.objectives.types import LossOutput


def head_targets(labels: torch.Tensor, num_heads: int, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """labels [B, T] -> [K, B, T]: entry (k, b, t) is the token head k must predict at position t (labels[b, t+2+k]),
    ignore_index where that lies past the end of the row."""
    batch, length = labels.shape
    targets = labels.new_full((num_heads, batch, length), ignore_index)
    for k in range(num_heads):
        shift = 2 + k
        if shift < length:
            targets[k, :, : length - shift] = labels[:, shift:]
    return targets


def head_cross_entropy(logits: torch.Tensor | LinearLogits, targets: torch.Tensor, *,
                       ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ CE, Σ top-1 hits) of one head over positions whose target is not ignore_index; logits [..., V] or
    LinearLogits (computed chunk by chunk), targets [...]."""
    if isinstance(logits, LinearLogits):
        out = linear_cross_entropy(logits, targets, ignore_index=ignore_index)
        return out.loss_sum, out.metrics["top1"]
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_targets = targets.reshape(-1)
    head_sum = F.cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index, reduction="sum")
    with torch.no_grad():
        counted = flat_targets != ignore_index
        correct = ((flat_logits.argmax(-1) == flat_targets) & counted).sum().float()
    return head_sum, correct


def medusa_loss(head_logits: torch.Tensor | list[LinearLogits], labels: torch.Tensor, *, decay: float = 0.8,
                ignore_index: int = IGNORE_INDEX) -> LossOutput:
    """head_logits [K, B, T, V] (head k at position t), or one LinearLogits [B, T, V] per head; labels [B, T].
    Metrics per head: loss_head{k} and top1_head{k} (sums over that head's positions, divided by the shared count
    when logged)."""
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"medusa decay must lie in (0, 1]; got {decay}")
    num_heads = len(head_logits)
    targets = head_targets(labels, num_heads, ignore_index=ignore_index)
    loss_sum = torch.zeros((), dtype=torch.float32, device=labels.device)
    metrics = {}
    for k in range(num_heads):
        head_sum, correct = head_cross_entropy(head_logits[k], targets[k], ignore_index=ignore_index)
        loss_sum = loss_sum + decay ** (k + 1) * head_sum
        metrics[f"loss_head{k}"] = head_sum.detach()
        metrics[f"top1_head{k}"] = correct
    count = (targets[0] != ignore_index).sum()
    return LossOutput(loss_sum=loss_sum, count=count, metrics=metrics)


def medusa2_loss(target_term: LossOutput, heads_term: LossOutput, *, heads_coefficient: float = 0.2) -> LossOutput:
    """Joint loss of Medusa-2: the target's term plus heads_coefficient times the heads' term. Both are sums over
    (nearly) the same positions, so the heads' sum is rescaled to the target term's count before adding."""
    if heads_coefficient < 0:
        raise ValueError(f"heads_coefficient must be >= 0; got {heads_coefficient}")
    scale = target_term.count.clamp(min=1) / heads_term.count.clamp(min=1)
    loss_sum = target_term.loss_sum + heads_coefficient * heads_term.loss_sum * scale
    metrics = {f"target_{k}": v for k, v in target_term.metrics.items()}
    metrics.update({k: v * scale for k, v in heads_term.metrics.items()})
    metrics["target_loss"] = target_term.loss_sum.detach()
    return LossOutput(loss_sum=loss_sum, count=target_term.count, metrics=metrics)
