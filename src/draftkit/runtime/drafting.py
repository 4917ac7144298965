"""The contract between a method's runtime module and whoever decodes with it (`draftkit.eval`, the recipes).

Each method `<m>` owns `draftkit.runtime.<m>` with one entry point,

    drafting(module, target, options: DraftingOptions, **recorded) -> Drafting

that wraps a trained module (as `draftkit.export.<m>.load` returns it, or as a recipe holds it in memory) into the
drafter the speculative runtime runs. `recorded` are the settings an artifact records for its runtime (for example
the feature a drafter reads, or an early-exit threshold): `export.<m>.load` returns them next to the module, and a
recipe passes its own. Because eval and the recipes go through the same function, the tau a recipe reports during
training and the tau `draftkit.eval` measures on the export come from the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from draftkit.runtime.tree import TREE_KINDS, DynamicTree, TreeShape, tree_shape


@dataclass(frozen=True)
class DraftingOptions:
    """How to decode: the tree (for families that draft trees) and the family-specific switches of the eval CLI."""

    tree: str | None = None
    """chain (top-1 per depth), static (a fixed tree of paths), topk (a per-step top-k tree) or dynamic (EAGLE-2's tree,
    grown and pruned by the draft's confidence); None: the family's own way of decoding (each family's drafting
    function names it)"""
    tree_depth: int | None = None
    """None: the family's own depth (heads: one level per head; drafters without a natural depth: 6 for a dynamic tree
    as EAGLE-2, else 5)"""
    tree_top_k: int | None = None
    """children per expanded node; None: 4, or EAGLE-2's 10 for a dynamic tree"""
    tree_width: int = 4
    tree_budget: int | None = None
    """topk: nodes kept; dynamic: total_tokens, the drafted nodes verified. None: 16, or EAGLE-2's 59 (its total_token
    60 counts the root) for a dynamic tree"""
    tree_paths: tuple[tuple[int, ...], ...] | None = None
    """static trees: each path lists, per depth, the rank of the candidate among its parent's top-k"""
    no_head: bool = False
    """SpecDec++: draft a fixed chain without the acceptance head"""
    stop_threshold: float | None = None
    """SpecDec++: the head's stop threshold (None: the recorded one)"""

    def __post_init__(self):
        if self.tree is not None and self.tree not in TREE_KINDS:
            raise ValueError(f"unknown tree kind {self.tree!r}: choose {', '.join(TREE_KINDS)}")

    def kind(self, default_tree: str) -> str:
        return self.tree or default_tree

    def shape(self, natural_depth: int | None, default_tree: str) -> TreeShape:
        """The tree for a drafter whose own depth is `natural_depth` (tree_depth, when set, caps it; None: a drafter
        that can draft to any depth, such as a feature drafter)."""
        kind = self.kind(default_tree)
        eagle2 = DynamicTree() if kind == "dynamic" else None
        depth = self.tree_depth or natural_depth or (eagle2.depth if eagle2 else 5)
        if natural_depth:
            depth = min(depth, natural_depth)
        top_k = self.tree_top_k or (eagle2.top_k if eagle2 else 4)
        budget = self.tree_budget or (eagle2.total_tokens if eagle2 else 16)
        return tree_shape(kind, depth, top_k=top_k, width=self.tree_width, budget=budget, paths=self.tree_paths)


@dataclass
class Drafting:
    """What decoding needs: the drafter (a draft LM, a Drafter or a TreeDrafter), the verifier when the family brings
    its own (self-drafting families verify over their own caches), and the draft length the artifact records."""

    drafter: Any
    verifier: Any = None
    gamma: int | None = None

    def evaluate_args(self) -> dict:
        """The extra keyword arguments of runtime.evaluate.evaluate_draft for this drafting."""
        return {"verifier": self.verifier} if self.verifier is not None else {}
