"""Next-token cross entropy on hard labels (pretraining and fine-tuning of standalone draft LMs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from draftkit.objectives.types import LossOutput

IGNORE_INDEX = -100


def next_token_ce(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> LossOutput:
    """logits [B, T, V] at position t predict labels[:, t + 1]; labels [B, T] hold ignore_index where masked.

    Softmax runs in fp32 whatever the logits' dtype, since bf16 log-probabilities over a large vocabulary
    lose the small differences the draft is being trained on.
    """
    shifted_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    counted = shifted_labels != ignore_index
    loss_sum = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=ignore_index, reduction="sum")
    with torch.no_grad():
        correct = ((shifted_logits.argmax(-1) == shifted_labels) & counted).sum()
    return LossOutput(loss_sum=loss_sum, count=counted.sum(), metrics={"top1": correct.float()})
