"""The frozen target model: one adapter over any transformers causal LM."""

from draftkit.targets.hf import Features, Target, load_target

__all__ = ["Features", "Target", "load_target"]
