"""Apply the parity patches (unified diffs in this folder) to a reference snapshot, strictly.

Each hunk must find its context and removed lines exactly where the hunk says, or anywhere in the file if they occur
there once; otherwise the patch is refused, so a patch written for one reference commit never half-applies to another.
Line endings are ignored when matching (two of the EAGLE files are CRLF) and kept as the file has them.

    python benchmarks/reference_patches/apply.py <snapshot dir> <patch> [<patch> ...]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(ValueError):
    pass


def parse(patch_text: str) -> list[tuple[str, list[tuple[int, list[str], list[str]]]]]:
    """[(path, [(old_start, old_lines, new_lines), ...]), ...] with lines without their line ending."""
    files, lines, i = [], patch_text.splitlines(), 0
    while i < len(lines):
        if not lines[i].startswith("--- "):
            i += 1
            continue
        if i + 1 >= len(lines) or not lines[i + 1].startswith("+++ "):
            raise PatchError(f"line {i + 1}: '---' without '+++'")
        path = lines[i + 1][4:].split("\t")[0].removeprefix("b/")
        hunks, i = [], i + 2
        while i < len(lines) and lines[i].startswith("@@"):
            match = HUNK.match(lines[i])
            if match is None:
                raise PatchError(f"line {i + 1}: bad hunk header {lines[i]!r}")
            old, new, i = [], [], i + 1
            while i < len(lines) and lines[i][:1] in (" ", "-", "+", "\\") and not lines[i].startswith(("--- ", "+++ ")):
                tag, text = lines[i][:1], lines[i][1:]
                if tag in (" ", "-"):
                    old.append(text)
                if tag in (" ", "+"):
                    new.append(text)
                i += 1
            hunks.append((int(match.group(1)), old, new))
        files.append((path, hunks))
    if not files:
        raise PatchError("no file in the patch")
    return files


def apply_patch(root: Path, patch_text: str) -> list[str]:
    """Apply every hunk under `root`; returns the files changed. Nothing is written unless every hunk applies."""
    changed = {}
    for path, hunks in parse(patch_text):
        target = Path(root, path)
        if not target.is_file():
            raise PatchError(f"{path}: no such file in {root}")
        raw = changed.get(path) or target.read_bytes().decode()
        eol = "\r\n" if "\r\n" in raw else "\n"
        body, shift = raw.split(eol), 0
        for old_start, old, new in hunks:
            at = old_start - 1 + shift  # earlier hunks of this file moved the lines by `shift`
            if body[at:at + len(old)] != old:
                found = [k for k in range(len(body) - len(old) + 1) if body[k:k + len(old)] == old]
                if len(found) != 1:
                    raise PatchError(f"{path}: the hunk at line {old_start} matches {len(found)} places; "
                                     "the snapshot is not the commit this patch was written for")
                at = found[0]
            body[at:at + len(old)] = new
            shift += len(new) - len(old)
        changed[path] = eol.join(body)
    for path, text in changed.items():
        Path(root, path).write_bytes(text.encode())
    return sorted(changed)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    for patch in argv[1:]:
        print(patch, "->", apply_patch(Path(argv[0]), Path(patch).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
