"""Atomic checkpoints: a step directory appears complete or not at all, so a killed run never leaves a torn one."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from draftkit.io import make_staging_dir, write_json_atomic

_STEP_DIR = re.compile(r"^step_(\d+)$")


def save_checkpoint(directory: Path, step: int, tensors: dict[str, object], state: dict, keep: int = 1) -> Path:
    """Write `directory/step_{step:06d}/` (torch-saved tensors + state.json) via a temp dir and one rename."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:06d}"
    staging = make_staging_dir(final)
    try:
        for name, obj in tensors.items():
            torch.save(obj, staging / f"{name}.pt")
        write_json_atomic(staging / "state.json", state)
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def load_checkpoint(path: Path) -> tuple[dict[str, object], dict]:
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    tensors = {p.stem: torch.load(p, map_location="cpu", weights_only=True) for p in path.glob("*.pt")}
    return tensors, state
