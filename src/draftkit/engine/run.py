"""Run directories: each holds the resolved config, the git commit and the package versions that made it."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from draftkit.io import write_json_atomic, write_text_atomic
from draftkit.engine.distributed import is_main_process

_PACKAGES = ("draftkit", "torch", "transformers", "accelerate", "peft", "datasets", "hydra-core", "omegaconf",
             "wandb", "deepspeed", "safetensors", "gguf", "tokenizers")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state() -> dict[str, str | bool | None]:
    """The commit of the draftkit source tree in use (None when installed from a wheel)."""
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                                    capture_output=True, text=True, timeout=10).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty}


def record_run(run_dir: Path, cfg: DictConfig) -> None:
    if not is_main_process():
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_json_atomic(run_dir / "run_info.json", {
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": git_state(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
    })
