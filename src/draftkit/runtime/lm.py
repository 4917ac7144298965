"""Standalone draft LMs (FastDraft, DistillSpec and any HF causal LM sharing the target's vocabulary): the runtime
drafts a chain with the model itself (runtime.speculative.LMDrafter, which evaluate_draft wraps around a bare model)."""

from __future__ import annotations

from torch import nn

from draftkit.runtime.drafting import Drafting, DraftingOptions


def drafting(model: nn.Module, target, options: DraftingOptions) -> Drafting:
    """`options` has nothing for a draft LM: it drafts a chain of the caller's gamma."""
    return Drafting(model)
