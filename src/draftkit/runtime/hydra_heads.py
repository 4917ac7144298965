"""Hydra and Hydra++ heads as a tree drafter (runtime/tree.py's TreeDrafter protocol).

Heads with a restricted draft vocabulary (drafts/vocab.py) score draft ids and hand the tree target ids; the heads
embed the path's tokens with the target's own table, so they always see target ids."""

from __future__ import annotations

import torch

from draftkit.drafts.vocab import draft_rows, target_ids
from draftkit.runtime.drafting import Drafting, DraftingOptions
from draftkit.runtime.speculative import new_cache
from draftkit.runtime.tree import (
    DraftTree,
    TargetStep,
    TreeShape,
    check_heads_tree,
    grow_tree,
)


class HydraDrafter:
    """Hydra heads as a TreeDrafter: head d - 1 scores depth d from the newest target state and the embeddings of the
    root token and every token on the path to the parent, so each depth is one batched pass over the frontier.
    With a prefix layer (Hydra++), the newly committed target states run through it with its own KV cache first."""

    def __init__(self, heads, embed: torch.nn.Module, shape: TreeShape, shared_lm_head: torch.Tensor | None = None):
        check_heads_tree(shape, heads, shared_lm_head, "Hydra")
        self.heads, self.embed, self.shape, self.shared_lm_head = heads, embed, shape, shared_lm_head
        self.max_depth = shape.depth
        self._cache = None
        self._hidden = self._root = None

    @property
    def name(self) -> str:
        plus = "++" if self.heads.prefix is not None else ""
        return f"hydra{plus}-{self.heads.num_heads}x{self.heads.num_layers}"

    def reset(self) -> None:
        self._cache = new_cache() if self.heads.prefix is not None else None

    def propose_tree(self, step: TargetStep) -> DraftTree:
        dtype = self.heads.first[0].linear.weight.dtype
        hidden = step.hidden.to(dtype)
        if self.heads.prefix is not None:
            hidden = self.heads.prefix(hidden[None], cache=self._cache, past_length=step.start)[0]
        self._hidden = hidden[-1]
        self._root = step.sequence[0, -1]
        tree = grow_tree(self.shape, self, device=step.sequence.device)
        return tree

    def expand(self, tree: DraftTree, frontier: list[int], depth: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        paths = [[self._root] + [tree.tokens[n] for n in tree.path_to(f)] if f >= 0 else [self._root]
                 for f in frontier]
        ids = torch.stack([torch.stack(p) for p in paths])  # [F, depth]
        embeds = self.embed(ids).to(self._hidden.dtype)
        logits = self.heads.head_logits(depth - 1, self._hidden.expand(len(frontier), -1), embeds, self.shared_lm_head)
        top = torch.log_softmax(logits.float(), dim=-1).topk(k)
        return target_ids(top.indices, self.heads.token_map), top.values


def drafting(heads, target, options: DraftingOptions, lm_head: torch.Tensor | None = None) -> Drafting:
    """`lm_head`: the target's LM head weight [V, H] to score with instead of target.lm_head.weight (a recipe's frozen
    copy); heads with a draft vocabulary score with its token_map rows, heads with their own projections ignore it."""
    shared = None
    if heads.lm_heads is None:
        shared = draft_rows(lm_head if lm_head is not None else target.lm_head.weight, heads.token_map)
    shape = options.shape(heads.num_heads, "static")
    return Drafting(HydraDrafter(heads, target.embed_tokens, shape, shared_lm_head=shared))
