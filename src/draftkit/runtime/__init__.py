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

__all__ = [
    "DraftProposal",
    "Drafter",
    "GenerationOutput",
    "GenerationStats",
    "LMDrafter",
    "ModelVerifier",
    "Verifier",
    "autoregressive_generate",
    "evaluate_draft",
    "load_prompts",
    "render_markdown",
    "speculative_generate",
]
