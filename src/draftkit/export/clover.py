"""Clover-2 as an artifact, in draftkit's heads format (export/heads_dir.py): no serving runtime loads Clover-2, so
draftkit's own directory is the only format."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from draftkit.drafts.clover import clover2
from draftkit.export.artifact import LoadedDraft
from draftkit.export.heads_dir import export_heads_dir, load_for_target

FAMILY = "clover"


def write(model: nn.Module, out_dir: Path, **details) -> Path:
    """export_heads_dir for this family (`details`: its keyword arguments)."""
    return export_heads_dir(model, out_dir, family=FAMILY, **details)


def load(directory, target, dtype: torch.dtype = torch.float32) -> LoadedDraft:
    return load_for_target(directory, target, clover2, family=FAMILY, dtype=dtype)
