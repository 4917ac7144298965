"""Hydra and Hydra++ heads as artifacts, in draftkit's heads format (export/heads_dir.py): no serving runtime loads
Hydra heads, so draftkit's own directory is the only format."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from draftkit.drafts.hydra_heads import hydra_heads
from draftkit.export.artifact import LoadedDraft
from draftkit.export.heads_dir import export_heads_dir, load_for_target

FAMILY = "hydra_heads"


def write(heads: nn.Module, out_dir: Path, **details) -> Path:
    """export_heads_dir for this family (`details`: its keyword arguments)."""
    return export_heads_dir(heads, out_dir, family=FAMILY, **details)


def load(directory, target, dtype: torch.dtype = torch.float32) -> LoadedDraft:
    return load_for_target(directory, target, hydra_heads, family=FAMILY, dtype=dtype, vocab_size=target.vocab_size,
                           lm_head_weight=target.lm_head.weight)
