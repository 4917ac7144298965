"""Chain and tree drafting with an EAGLE-3 drafter in draftkit's speculative runtime.

The feature drafters' runtime (runtime/fspad.py) carries over: the draft keeps a KV cache over its layer and the
target's states of the committed positions, and within a proposal its own pre-norm output stands in for them. What
EAGLE-3 changes is which target states it reads: `target_hidden` is the tuple of layer ids, so the runtime captures the
residual streams entering those layers, concatenated (runtime.speculative.capture_target_hidden, TargetStep.aux_hidden),
and the draft's fc fuses them (it tells them from a fed-back state by their width). Lossless like every drafter: the
target verifies every proposal (tested in fp32 on every test prompt, chain and tree).
"""

from __future__ import annotations

from typing import Sequence

from draftkit.drafts.eagle3 import Eagle3Drafter
from draftkit.runtime.drafting import Drafting, DraftingOptions
from draftkit.runtime.fspad import FeatureChainDrafter, FeatureTreeDrafter


class Eagle3ChainDrafter(FeatureChainDrafter):
    """A Drafter (runtime/speculative.py) for Eagle3Drafter modules: greedy and lossless speculative sampling."""

    def __init__(self, model: Eagle3Drafter, aux_layers: Sequence[int], name: str | None = None):
        super().__init__(model, target_hidden=_layer_ids(model, aux_layers), name=name or f"{model.variant} drafter")


class Eagle3TreeDrafter(FeatureTreeDrafter):
    """A TreeDrafter (runtime/tree.py) for Eagle3Drafter modules: one draft pass per depth, greedy verification."""

    def __init__(self, model: Eagle3Drafter, shape, aux_layers: Sequence[int], name: str | None = None):
        super().__init__(model, shape, target_hidden=_layer_ids(model, aux_layers),
                         name=name or f"{model.variant} drafter (tree)")


def drafting(model: Eagle3Drafter, target, options: DraftingOptions, aux_layers: Sequence[int],
             name: str | None = None) -> Drafting:
    """As runtime.fspad.drafting: by default EAGLE-2's dynamic tree (how EAGLE-3 decodes), `options.tree == "chain"`
    the chain drafter (greedy and lossless speculative sampling), static and topk trees as runtime.tree builds them.
    `aux_layers`: the target layers the model fuses, which an artifact records."""
    if options.kind("dynamic") == "chain":
        return Drafting(Eagle3ChainDrafter(model, aux_layers, name))
    return Drafting(Eagle3TreeDrafter(model, options.shape(None, "dynamic"), aux_layers, name))


def _layer_ids(model: Eagle3Drafter, aux_layers: Sequence[int]) -> tuple[int, ...]:
    layers = tuple(int(i) for i in aux_layers)
    if len(layers) != model.num_aux_layers:
        raise ValueError(f"the drafter fuses {model.num_aux_layers} target layers, but {len(layers)} layer ids were "
                         f"given ({list(layers)})")
    return layers
