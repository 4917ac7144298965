"""Speculative-decoding runtime (batch size 1) and the draft evaluation built on it."""

from draftkit.runtime.evaluate import evaluate_draft, load_prompts, render_markdown
from draftkit.runtime.speculative import (
    DraftProposal,
    Drafter,
    GenerationOutput,
    GenerationStats,
    LMDrafter,
    ModelVerifier,
    Verifier,
    autoregressive_generate,
    speculative_generate,
)
from draftkit.runtime.tree import (
    DraftTree,
    DynamicTree,
    StaticTree,
    TargetStep,
    TopKTree,
    TreeDrafter,
    tree_generate,
    tree_shape,
)

__all__ = [
    "DraftProposal",
    "DraftTree",
    "Drafter",
    "DynamicTree",
    "GenerationOutput",
    "GenerationStats",
    "LMDrafter",
    "ModelVerifier",
    "Verifier",
    "autoregressive_generate",
    "evaluate_draft",
    "load_prompts",
    "render_markdown",
    "StaticTree",
    "TargetStep",
    "TopKTree",
    "TreeDrafter",
    "speculative_generate",
    "tree_generate",
    "tree_shape",
]
