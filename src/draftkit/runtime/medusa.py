"""Medusa heads as a tree drafter (runtime/tree.py's TreeDrafter protocol).

Heads with a restricted draft vocabulary (a `token_map`, drafts/vocab.py) score draft ids; the drafter hands the tree
target ids (the target verifies them). The shared LM head it receives is then the head's token_map rows. Acceptance
treats each candidate as a point mass, so nothing downstream needs the draft's probabilities over the full
vocabulary."""

from __future__ import annotations

import torch

from draftkit.drafts.medusa import MedusaHeads
from draftkit.drafts.vocab import draft_rows, target_ids
from draftkit.runtime.drafting import Drafting, DraftingOptions
from draftkit.runtime.tree import (
    DraftTree,
    TargetStep,
    TreeShape,
    check_heads_tree,
    grow_tree,
)


class MedusaDrafter:
    """Medusa heads as a TreeDrafter: head d - 1 scores depth d, independently of the path above it, so one pass of
    the heads over the newest committed state gives every depth's top-k at once."""

    def __init__(self, heads: MedusaHeads, shape: TreeShape, shared_lm_head: torch.Tensor | None = None):
        check_heads_tree(shape, heads, shared_lm_head, "Medusa")
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
        ids = target_ids(top.indices, self.heads.token_map)
        return ids.expand(len(frontier), k), top.values.expand(len(frontier), k)


def drafting(heads: MedusaHeads, target, options: DraftingOptions, lm_head: torch.Tensor | None = None) -> Drafting:
    """`lm_head`: the target's LM head weight [V, H] to score with instead of target.lm_head.weight (a recipe's frozen
    copy); heads with a draft vocabulary score with its token_map rows, heads with their own projections ignore it."""
    shared = None
    if heads.lm_heads is None:
        shared = draft_rows(lm_head if lm_head is not None else target.lm_head.weight, heads.token_map)
    return Drafting(MedusaDrafter(heads, options.shape(heads.num_heads, "static"), shared_lm_head=shared))
