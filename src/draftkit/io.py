"""Atomic file and directory writes shared by the engine, the exports and the CLIs.

A reader (a resumed run, a serving engine, `draftkit.eval`) sees a file or directory whole or not at all: content goes
to a sibling staging name first and is renamed into place. Staging names are created with the process umask
(0644 / 0755 under the usual 022), not tempfile's private 0600 / 0700, so an export written by one user can be served
by another (a serving container usually runs as a different user than the trainer).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _writer() -> str:
    """This process as staging names record it: host and pid, so a later writer can tell a dead writer's leftovers
    (a run killed mid-save, a preempted job) from a live writer's work in progress."""
    return f"{socket.gethostname()}~{os.getpid()}"


def _sibling(path: Path, suffix: str) -> Path:
    remove_stale_staging(path)
    return path.with_name(f".{path.name}.{_writer()}.{secrets.token_hex(4)}{suffix}")


_STAGING = re.compile(r"(?:old\.)?(?P<host>[^/]+)~(?P<pid>\d+)\.[0-9a-f]{8}(?:\.tmp)?")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_staging(path: Path) -> list[Path]:
    """Remove the staging files and folders next to `path` that a process of this host left when it died before
    renaming them into place (they are hidden, and a checkpoint's can be gigabytes). Another host's, a live process's,
    and anything not named like a staging entry are left alone. Returns what was removed."""
    path = Path(path)
    prefix, host, removed = f".{path.name}.", socket.gethostname(), []
    try:
        candidates = [entry for entry in os.scandir(path.parent) if entry.name.startswith(prefix)]
    except FileNotFoundError:
        return removed
    for entry in candidates:
        match = _STAGING.fullmatch(entry.name[len(prefix):])
        if match is None or match["host"] != host or _alive(int(match["pid"])):
            continue
        stale = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` durably: fsynced before the rename, so a crash leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(path, ".tmp")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask decides the final mode
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, payload) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def make_staging_dir(final: Path) -> Path:
    """An empty directory next to `final` (same filesystem, so it can be renamed onto it), hidden by a leading dot."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(final, "")
    os.mkdir(staging, 0o777)  # the umask decides the final mode
    return staging


def replace_directory(staging: Path, final: Path) -> None:
    """Put the finished directory `staging` at `final`, replacing what is there with renames only, so a reader sees
    the old directory or the new one, never a mix. `staging` must sit next to `final` (same filesystem)."""
    staging, final = Path(staging), Path(final)
    if final.exists():
        old = make_staging_dir(final.with_name(final.name + ".old"))
        os.rename(final, old / "x")
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, final)


def _process_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def give_umask_modes(root: Path) -> None:
    """Every file and folder under `root` gets the mode a plain open() or mkdir() would give it under this process's
    umask. Some writers create private files whatever the umask (safetensors' save_file writes 0600), which a serving
    container running as another user could not read."""
    mask = _process_umask()
    for folder, dirs, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


@contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Yield an empty staging directory; when the block finishes it replaces `final` whole (replace_directory), its
    contents readable as the umask allows (give_umask_modes). If the block raises, `final` is left as it was and the
    staging directory is removed."""
    staging = make_staging_dir(final)
    try:
        yield staging
        give_umask_modes(staging)
        replace_directory(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
