"""Atomic checkpoints: a step directory appears complete or not at all, so a killed run never leaves a torn one."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

_STEP_DIR = re.compile(r"^step_(\d+)$")


def write_json_atomic(path: Path, payload) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def replace_directory(staging: Path, final: Path) -> None:
    """Put the finished directory `staging` at `final`, replacing what is there with renames only, so a reader sees
    the old directory or the new one, never a mix. `staging` must sit next to `final` (same filesystem)."""
    staging, final = Path(staging), Path(final)
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        os.rename(final, old / "x")
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, final)


def save_checkpoint(directory: Path, step: int, tensors: dict[str, object], state: dict, keep: int = 2) -> Path:
    """Write `directory/step_{step:06d}/` (torch-saved tensors + state.json) via a temp dir and one rename."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".step_{step:06d}.", dir=directory))
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
