"""Clover-2 as a tree drafter (runtime/tree.py's TreeDrafter protocol).

With a restricted draft vocabulary (drafts/vocab.py) the model scores draft ids with the LM head's token_map rows and
hands the tree target ids; the regressive connection embeds target ids with the full LM head."""

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


class CloverDrafter:
    """Clover-2 as a TreeDrafter. Each step feeds the newly committed positions (pre-norm target state fused with the
    next token's embedding) through the augmenting block with its own KV cache; depth d then runs the regressive
    connection along each frontier node's path (the root's child tokens onward) and the target's LM head.
    `embed_weight` is the full LM head (it embeds target ids); `lm_head_weight` scores: its token_map rows when the
    model has a draft vocabulary."""

    def __init__(self, clover, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor, shape: TreeShape):
        check_heads_tree(shape, clover, lm_head_weight, "Clover")
        self.clover, self.embed_weight, self.lm_head_weight, self.shape = clover, embed_weight, lm_head_weight, shape
        self.max_depth = shape.depth
        self._cache = None
        self._state = None

    @property
    def name(self) -> str:
        return f"clover2-{self.clover.num_heads}"

    def reset(self) -> None:
        self._cache = new_cache()

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.embed_weight).to(self.clover.out.weight.dtype)

    def propose_tree(self, step: TargetStep) -> DraftTree:
        end = step.sequence.shape[1]
        next_embeds = self._embed(step.sequence[0, step.start + 1 : end])
        hidden = step.prenorm_hidden.to(self.clover.out.weight.dtype)
        state = self.clover.augmented(hidden[None], next_embeds[None], cache=self._cache, past_length=step.start)
        self._state = state[0, -1]
        return grow_tree(self.shape, self, device=step.sequence.device)

    def expand(self, tree: DraftTree, frontier: list[int], depth: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        state = self._state.expand(len(frontier), -1)
        token_embeds = None
        if depth > 1:
            paths = torch.stack([torch.stack([tree.tokens[n] for n in tree.path_to(f)]) for f in frontier])
            embeds = self._embed(paths)  # [F, depth - 1, H]
            for j in range(depth - 1):
                state = self.clover.rnn(state, embeds[:, j])
            token_embeds = embeds[:, -1]
        features = self.clover.head_output(depth - 1, state, token_embeds)
        logits = torch.nn.functional.linear(features, self.lm_head_weight)
        top = torch.log_softmax(logits.float(), dim=-1).topk(k)
        return target_ids(top.indices, self.clover.token_map), top.values


def drafting(model, target, options: DraftingOptions, lm_head: torch.Tensor | None = None) -> Drafting:
    """`lm_head`: the target's LM head weight [V, H] to use instead of target.lm_head.weight (a recipe's frozen copy):
    Clover embeds target ids with its rows and scores with its token_map rows."""
    lm_head = lm_head if lm_head is not None else target.lm_head.weight
    return Drafting(CloverDrafter(model, lm_head, draft_rows(lm_head, model.token_map),
                                  options.shape(model.num_heads, "static")))
