from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LossOutput:
    """loss_sum: scalar summed over counted positions (not a mean); count: scalar number of those positions;
    metrics: detached per-position sums (e.g. "correct") that the loop divides by the same count when it logs."""

    loss_sum: torch.Tensor
    count: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
