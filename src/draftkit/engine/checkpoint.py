"""Atomic checkpoints: a step directory appears complete or not at all, so a killed run never leaves a torn one."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from draftkit.errors import UserError
from draftkit.io import make_staging_dir, sha256_file, write_json_atomic

_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(UserError):
    pass


def _fsync_directory(path: Path) -> None:
    """Make a rename inside `path` durable: without it a power loss can undo the rename after the files were synced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_staging(directory: Path) -> None:
    """Delete the hidden `.step_*` staging directories a killed save left behind (one writer per run directory: the
    run directory is locked)."""
    directory = Path(directory)
    if directory.is_dir():
        for leftover in directory.glob(".step_*"):
            shutil.rmtree(leftover, ignore_errors=True)


def save_checkpoint(directory: Path, step: int, tensors: dict[str, object], state: dict, keep: int = 2) -> Path:
    """Write `directory/step_{step:06d}/` (torch-saved tensors + state.json) via a temp dir and one rename.

    Every file is fsynced before the rename, and state.json (written last) records each tensor file's size and sha256,
    so a reader can tell an intact checkpoint from one a crash or a full disk cut short (`checkpoint_problem`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_staging(directory)
    final = directory / f"step_{step:06d}"
    staging = make_staging_dir(final)
    try:
        files = {}
        for name, obj in tensors.items():
            path = staging / f"{name}.pt"
            with open(path, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        write_json_atomic(staging / "state.json", {**state, "files": files})
        _fsync_directory(staging)
        if final.exists():  # a checkpoint the resume skipped as damaged
            shutil.rmtree(final)
        os.rename(staging, final)
        _fsync_directory(directory)
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


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from (None when it is intact): state.json unreadable, or a
    tensor file missing or different from what state.json recorded when it was written."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as error:
        return f"state.json unreadable ({type(error).__name__})"
    recorded = state.get("files")
    if recorded is None:  # written before state.json recorded its files: try to read them
        try:
            load_checkpoint(path)
        except Exception as error:  # noqa: BLE001 - any failure to read means "not resumable"
            return f"unreadable ({type(error).__name__}: {str(error)[:80]})"
        return None
    for name, expected in recorded.items():
        file = path / name
        if not file.is_file():
            return f"{name} missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, {expected['bytes']} were written"
        if sha256_file(file) != expected["sha256"]:
            return f"{name} does not match its recorded checksum"
    return None


def newest_intact_checkpoint(directory: Path, warn: bool = True) -> Path | None:
    """The newest checkpoint in `directory` that is intact, skipping damaged ones (each with a warning line when
    `warn`); None when there is no checkpoint. Raises CheckpointError when every checkpoint there is damaged."""
    found = list_checkpoints(directory)
    problems = []
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        problems.append(f"{path.name}: {problem}")
        if warn:
            print(f"[draftkit] warning: checkpoint {path} is damaged ({problem}); trying the one before it",
                  file=sys.stderr)
    if found:
        raise CheckpointError(f"every checkpoint in {directory} is damaged ({'; '.join(problems)}). Fix: move "
                              f"{directory} aside to train this stage from the start")
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, object], dict]:
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    tensors = {p.stem: torch.load(p, map_location="cpu", weights_only=True) for p in path.glob("*.pt")}
    return tensors, state
