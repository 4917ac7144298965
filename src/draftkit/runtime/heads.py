"""Tree drafters for draft heads on the target's hidden state (runtime/tree.py's TreeDrafter protocol)."""

from __future__ import annotations

import torch

from draftkit.drafts.medusa import MedusaHeads
from draftkit.runtime.tree import DraftTree, TargetStep, TreeShape, grow_tree


class MedusaDrafter:
    """Medusa heads as a TreeDrafter: head d - 1 scores depth d, independently of the path above it, so one pass of
    the heads over the newest committed state gives every depth's top-k at once."""

    def __init__(self, heads: MedusaHeads, shape: TreeShape, shared_lm_head: torch.Tensor | None = None):
        if shape.depth > heads.num_heads:
            raise ValueError(f"a tree of depth {shape.depth} needs {shape.depth} Medusa heads; these have "
                             f"{heads.num_heads}. Fix: a shallower tree (tree depth <= num_heads)")
        self.heads, self.shape, self.shared_lm_head = heads, shape, shared_lm_head
        self.max_depth = shape.depth
        self._log_probs: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return f"medusa-{self.heads.num_heads}x{self.heads.num_layers}"

    def reset(self) -> None:
        self._log_probs = None

    def propose_tree(self, step: TargetStep) -> DraftTree:
        logits = self.heads(step.hidden[-1].to(self.heads.blocks[0].layers[0].weight.dtype), self.shared_lm_head)
        self._log_probs = torch.log_softmax(logits.float(), dim=-1)
        tree = grow_tree(self.shape, self, device=step.sequence.device)
        tree.forwards = 1  # the heads ran once; growing the tree only reads their cached top-k
        return tree

    def expand(self, tree: DraftTree, frontier: list[int], depth: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        top = self._log_probs[depth - 1].topk(k)
        return top.indices.expand(len(frontier), k), top.values.expand(len(frontier), k)
