"""SpecDec++'s loss: class-weighted soft binary cross entropy of the acceptance head against min(1, p/q) labels.

    L = Σ_i [w_reject (1 − a_i)(−log P_reject,i) + w_accept a_i (−log P_accept,i)] / Σ_i [w_reject (1 − a_i) + w_accept a_i]

over counted positions, with the soft label a_i = min(1, p_target(Z_i) / p_draft(Z_i)); rejections are rare and costly,
hence w_reject = 6 (the reference's weight_mismatch). The normalizer includes the weights, so LossOutput.count is the
weighted sum (a float), and the loop's single division yields exactly L.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from draftkit.objectives.types import LossOutput


def acceptance_bce(head_logits: torch.Tensor, accept_labels: torch.Tensor, mask: torch.Tensor,
                   *, reject_weight: float = 6.0, accept_weight: float = 1.0) -> LossOutput:
    """head_logits [..., 2] (index 1 = accept); accept_labels [...] in [0, 1]; mask [...] bool (positions with loss)."""
    if head_logits.shape[:-1] != accept_labels.shape or accept_labels.shape != mask.shape:
        raise ValueError(f"head logits {tuple(head_logits.shape)}, labels {tuple(accept_labels.shape)} and mask "
                         f"{tuple(mask.shape)} must agree on the leading shape")
    log_probs = F.log_softmax(head_logits.float(), dim=-1)
    labels = accept_labels.float().clamp(0.0, 1.0)
    mask = mask.to(torch.bool)
    reject_part = reject_weight * (1.0 - labels)
    accept_part = accept_weight * labels
    per_position = -(reject_part * log_probs[..., 0] + accept_part * log_probs[..., 1])
    weights = (reject_part + accept_part).masked_fill(~mask, 0.0)
    with torch.no_grad():
        predicted = log_probs[..., 1].exp()
        # Weighted like the loss, so the loop's division by the weighted count reports a weighted mean.
        abs_error = ((predicted - labels).abs() * weights).sum()
    return LossOutput(loss_sum=per_position.masked_fill(~mask, 0.0).sum(), count=weights.sum(),
                      metrics={"abs_error": abs_error})
