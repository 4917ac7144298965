"""Structure rules from design.md: imports run one way, and the package list in pyproject is complete."""

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "draftkit"

# Modules every layer may import: leaf helpers that import no other draftkit module.
SHARED_BY_ALL = {"io"}

# layer -> draftkit layers it may import
ALLOWED = {
    "objectives": set(),
    "drafts": set(),
    "targets": set(),
    "engine": {"objectives"},
    "data": {"targets", "objectives"},  # IGNORE_INDEX is the one masking constant
    "export": {"drafts", "engine"},
    "runtime": {"targets", "data", "engine", "drafts"},  # drafters wrap the draft modules they run
    "recipes": {"drafts", "objectives", "data", "targets", "engine", "export", "runtime", "recipes"},
}


def _draftkit_imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("draftkit."):
            yield node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("draftkit."):
                    yield alias.name.split(".")[1]


def test_imports_run_one_way():
    violations = []
    for layer, allowed in ALLOWED.items():
        for path in (SRC / layer).rglob("*.py"):
            for imported in _draftkit_imports(path):
                if imported != layer and imported not in allowed | SHARED_BY_ALL:
                    violations.append(f"{path.relative_to(SRC)} imports draftkit.{imported}")
    assert not violations, violations


def test_nothing_outside_the_cli_imports_recipes():
    for path in SRC.rglob("*.py"):
        if path.parent.name != "recipes" and path.name != "train.py":
            assert "recipes" not in set(_draftkit_imports(path)), path


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"draftkit." + ".".join(p.parent.relative_to(SRC).parts) if p.parent != SRC else "draftkit"
             for p in SRC.rglob("__init__.py")}
    assert found | {"draftkit.conf"} == listed
