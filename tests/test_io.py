"""Atomic writes: whole or nothing, and readable by other users (a serving container rarely runs as the trainer)."""

import os
import stat

import pytest

from draftkit.io import replace_directory, staged_directory, write_json_atomic, write_text_atomic


@pytest.fixture
def usual_umask():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_and_directories_get_the_umask_modes(tmp_path, usual_umask):
    write_text_atomic(tmp_path / "a.txt", "x")
    write_json_atomic(tmp_path / "sub" / "b.json", {"k": 1})
    with staged_directory(tmp_path / "export") as staging:
        (staging / "weights.bin").write_bytes(b"\0")
    assert mode(tmp_path / "a.txt") == 0o644
    assert mode(tmp_path / "sub" / "b.json") == 0o644
    assert mode(tmp_path / "export") == 0o755


def test_a_staged_export_is_readable_whatever_wrote_its_files(tmp_path, usual_umask):
    """safetensors writes 0600 files; an export folder must still be readable by a serving container's user."""
    import torch
    from safetensors.torch import save_file

    with staged_directory(tmp_path / "export") as staging:
        save_file({"w": torch.zeros(2)}, str(staging / "model.safetensors"))
        (staging / "sub").mkdir(mode=0o700)
        save_file({"w": torch.zeros(2)}, str(staging / "sub" / "model.safetensors"))
    assert mode(tmp_path / "export" / "model.safetensors") == 0o644
    assert mode(tmp_path / "export" / "sub") == 0o755
    assert mode(tmp_path / "export" / "sub" / "model.safetensors") == 0o644


def test_a_failed_block_leaves_the_old_directory_and_no_staging(tmp_path):
    final = tmp_path / "export"
    with staged_directory(final) as staging:
        (staging / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with staged_directory(final) as staging:
            (staging / "v").write_text("2")
            raise RuntimeError("killed mid-export")
    assert (final / "v").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_replace_directory_swaps_whole_directories(tmp_path):
    final, new = tmp_path / "d", tmp_path / ".d.new"
    final.mkdir()
    (final / "old").write_text("old")
    new.mkdir()
    (new / "new").write_text("new")
    replace_directory(new, final)
    assert [p.name for p in final.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_write_json_atomic_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"v": 1})
    write_json_atomic(path, {"v": 2})
    assert path.read_text() == '{\n  "v": 2\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_killed_writers_staging_is_removed_by_the_next_write_and_nothing_else(tmp_path):
    """A process killed mid-export (preemption, OOM killer) leaves its hidden staging folder; the next write of the
    same path removes it. A live process's staging, another host's and unrelated hidden files stay."""
    import secrets
    import signal
    import socket
    import subprocess
    import sys

    final = tmp_path / "export"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, pathlib, signal\n"
        "from draftkit.io import staged_directory\n"
        f"with staged_directory(pathlib.Path({str(final)!r})) as staging:\n"
        "    (staging / 'weights.bin').write_bytes(b'x' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")])
    assert killed.returncode == -signal.SIGKILL
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".export.")
    live = tmp_path / f".export.{socket.gethostname()}~{os.getpid()}.{secrets.token_hex(4)}"
    elsewhere = tmp_path / f".export.another-host~1.{secrets.token_hex(4)}"
    unrelated = tmp_path / ".export.notes"
    for keep in (live, elsewhere, unrelated):
        keep.mkdir()

    with staged_directory(final) as staging:
        (staging / "weights.bin").write_bytes(b"y")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", live.name, elsewhere.name, unrelated.name])
    assert (final / "weights.bin").read_bytes() == b"y"
