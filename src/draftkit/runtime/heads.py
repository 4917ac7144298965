"""Tree drafters for draft heads on the target's hidden state (runtime/tree.py's TreeDrafter protocol).

Heads with a restricted draft vocabulary (a `token_map`, drafts/vocab.py) score draft ids; every drafter hands the tree
target ids (the target verifies them, and Hydra and Clover embed the path's tokens with the target's table). The
shared LM head a drafter receives is then the head's token_map rows. Acceptance treats each candidate as a point mass,
so nothing downstream needs the draft's probabilities over the full vocabulary."""

from __future__ import annotations

import torch

from draftkit.drafts.medusa import MedusaHeads
from draftkit.drafts.vocab import target_ids
from draftkit.runtime.speculative import new_cache
from draftkit.runtime.tree import DraftTree, TargetStep, TreeShape, check_tree_fits_vocabulary, grow_tree


def check_scoring_rows(lm_head_weight: torch.Tensor | None, module) -> None:
    """A shared LM head must have one row per draft id: a full head on a restricted draft would propose ids past the
    token_map, and a sliced one on a full draft would propose the wrong tokens."""
    if lm_head_weight is not None and lm_head_weight.shape[0] != module.draft_vocab_size:
        raise ValueError(f"the shared LM head has {lm_head_weight.shape[0]} rows but the draft scores "
                         f"{module.draft_vocab_size} tokens. Fix: pass the LM head's token_map rows "
                         "(drafts.vocab.draft_rows(weight, module.token_map))")


class MedusaDrafter:
    """Medusa heads as a TreeDrafter: head d - 1 scores depth d, independently of the path above it, so one pass of
    the heads over the newest committed state gives every depth's top-k at once."""

    def __init__(self, heads: MedusaHeads, shape: TreeShape, shared_lm_head: torch.Tensor | None = None):
        if shape.depth > heads.num_heads:
            raise ValueError(f"a tree of depth {shape.depth} needs {shape.depth} Medusa heads; these have "
                             f"{heads.num_heads}. Fix: a shallower tree (tree depth <= num_heads)")
        check_scoring_rows(shared_lm_head, heads)
        check_tree_fits_vocabulary(shape, heads.draft_vocab_size)
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


class HydraDrafter:
    """Hydra heads as a TreeDrafter: head d - 1 scores depth d from the newest target state and the embeddings of the
    root token and every token on the path to the parent, so each depth is one batched pass over the frontier.
    With a prefix layer (Hydra++), the newly committed target states run through it with its own KV cache first."""

    def __init__(self, heads, embed: torch.nn.Module, shape: TreeShape, shared_lm_head: torch.Tensor | None = None):
        if shape.depth > heads.num_heads:
            raise ValueError(f"a tree of depth {shape.depth} needs {shape.depth} Hydra heads; these have "
                             f"{heads.num_heads}. Fix: a shallower tree (tree depth <= num_heads)")
        check_scoring_rows(shared_lm_head, heads)
        check_tree_fits_vocabulary(shape, heads.draft_vocab_size)
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


class CloverDrafter:
    """Clover-2 as a TreeDrafter. Each step feeds the newly committed positions (pre-norm target state fused with the
    next token's embedding) through the augmenting block with its own KV cache; depth d then runs the regressive
    connection along each frontier node's path (the root's child tokens onward) and the target's LM head.
    `embed_weight` is the full LM head (it embeds target ids); `lm_head_weight` scores: its token_map rows when the
    model has a draft vocabulary."""

    def __init__(self, clover, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor, shape: TreeShape):
        if shape.depth > clover.num_heads:
            raise ValueError(f"a tree of depth {shape.depth} needs {shape.depth} Clover heads; this model has "
                             f"{clover.num_heads}. Fix: a shallower tree (tree depth <= num_heads)")
        check_scoring_rows(lm_head_weight, clover)
        check_tree_fits_vocabulary(shape, clover.draft_vocab_size)
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
