"""Run directories: each holds the resolved config, the git commit and the package versions that made it; one run
works in a directory at a time, and a run continues a directory only with the config it was made with."""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig, OmegaConf

from draftkit.engine.distributed import is_main_process
from draftkit.errors import UserError
from draftkit.io import write_json_atomic, write_text_atomic

LOCK_FILE = ".draftkit.lock"
# What a run writes before it has done any work: a directory holding only these has nothing to continue.
RECORDS = frozenset({"config.yaml", "run_info.json", "metrics.jsonl", ".hydra", LOCK_FILE, "wandb"})
# Settings a run may continue with changed values: how long it trains, how often it logs and saves, where it logs,
# how many processes run it, what is measured and exported afterwards. Any other change refuses the resume unless
# resume=force: the checkpoints, caches and data in the directory were made with the old values.
SAFE_TO_CHANGE_ON_RESUME = (
    "run_dir", "resume", "push_to_hub", "logger", "logger.*", "dist", "dist.*", "engine.distributed",
    "engine.distributed.*", "engine.steps", "*.engine.steps", "engine.max_steps_per_stage", "engine.log_every",
    "*.engine.log_every", "engine.save_every", "*.engine.save_every", "engine.keep_checkpoints",
    "*.engine.keep_checkpoints", "eval.enabled", "eval.before", "eval.limit_per_category", "eval.max_new_tokens",
    "eval.measure_speedup", "eval.gamma", "eval.prompts", "data.eval_prompts", "*.stages", "*.export.*", "*.tree.*",
    "data.selfdistill.batch_size", "engine.count_flops", "engine.peak_tflops",
)


class RunDirError(UserError):
    pass

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


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def config_changes(old: dict, new: dict, *, safe: bool = False) -> list[str]:
    """`key: old -> new` for every setting both configs have that differs and is not safe to change on resume (a key
    only one of them has is a setting another draftkit version added or removed, not a change the user made).
    safe=True: the differing settings that may change on resume instead, which a run records but never refuses."""
    before, after = _flat(old), _flat(new)
    changes = []
    for key in sorted(set(before) & set(after)):
        if before[key] == after[key] or any(fnmatch.fnmatchcase(key, p) for p in SAFE_TO_CHANGE_ON_RESUME) != safe:
            continue
        changes.append(f"{key}: {before[key]} -> {after[key]}")
    return changes


def holds_work(run_dir: Path) -> bool:
    """Whether a run directory holds anything besides the run's records (checkpoints, caches, reports, exports)."""
    run_dir = Path(run_dir)
    return run_dir.is_dir() and any(p.name not in RECORDS for p in run_dir.iterdir())


def check_resume(run_dir: Path, cfg: DictConfig) -> list[str]:
    """Refuse to continue a run directory whose recorded config differs from `cfg` in a setting that matters (named in
    the message), unless cfg.resume is force (or false: train from the start). Returns the changes a forced resume
    accepts."""
    previous = Path(run_dir) / "config.yaml"
    if cfg.get("resume", True) is False or not previous.is_file() or not holds_work(run_dir):
        return []
    changes = config_changes(OmegaConf.to_container(OmegaConf.load(previous), resolve=False),
                             OmegaConf.to_container(cfg, resolve=True))
    if changes and cfg.get("resume") != "force":
        shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
        raise RunDirError(f"{run_dir} holds a run made with another config ({shown}). Fix: use a new hydra.run.dir, "
                          "put the old values back, or add resume=force to continue this run with the new values")
    return changes


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive OS lock (flock) on run_dir/.draftkit.lock while a run works there: a second run in the same
    directory is refused at once. The OS drops the lock when the process ends, however it ends, so the lock of a
    killed run never blocks the next one. Rank 0 of a multi-process job holds it for the job."""
    if not is_main_process():
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "another process"
            raise RunDirError(f"{run_dir} is in use by another run ({holder}). Fix: wait for it to finish, or give "
                              "this run another hydra.run.dir") from None
        except OSError as error:  # a filesystem without locks (some network filesystems)
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            print(f"[draftkit] warning: cannot lock {path} ({error.strerror}); make sure no other run uses {run_dir}",
                  file=sys.stderr)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 .encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def record_run(run_dir: Path, cfg: DictConfig) -> None:
    """Check that `cfg` may continue what run_dir holds (check_resume), then record it: config.yaml is the resolved
    config this run uses, run_info.json how it was started. A continued run keeps how each earlier start was made
    (earlier_starts) and names the settings it changed that resume allows (a longer engine.steps stretches the lr
    schedule from the resumed step on, so the steps before it followed another schedule)."""
    if not is_main_process():
        return
    run_dir = Path(run_dir)
    changes = check_resume(run_dir, cfg)
    if changes:
        print(f"[draftkit] note: resume=force: continuing {run_dir} with changed settings ({'; '.join(changes)})")
    safe_changes, earlier_starts = [], []
    if cfg.get("resume", True) is not False and holds_work(run_dir):
        if (run_dir / "config.yaml").is_file():
            recorded = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=False)
            safe_changes = config_changes(recorded, OmegaConf.to_container(cfg, resolve=True), safe=True)
        if (run_dir / "run_info.json").is_file():
            earlier = json.loads((run_dir / "run_info.json").read_text())
            earlier_starts = [*earlier.pop("earlier_starts", []),
                              {key: earlier.get(key) for key in ("argv", "started", "git", "changed_on_resume",
                                                                  "changed_safely_on_resume")}]
    if safe_changes:
        print(f"[draftkit] note: continuing {run_dir} with changed settings ({'; '.join(safe_changes)})")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_json_atomic(run_dir / "run_info.json", {
        "argv": sys.argv,
        "changed_on_resume": changes,
        "changed_safely_on_resume": safe_changes,
        "earlier_starts": earlier_starts,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git": git_state(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
    })
