"""Training objectives: pure functions of tensors that return a summed loss and the count it sums over.

The training loop divides by the global count once, so gradient accumulation and data parallelism weight
every counted token equally whatever the micro-batch boundaries are.
"""

from draftkit.objectives.types import LossOutput

__all__ = ["LossOutput"]
