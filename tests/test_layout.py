"""Structure rules: imports run one way, and the package list in pyproject is complete."""

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "draftkit"

# Modules every layer may import: leaf helpers that import no other draftkit module.
SHARED_BY_ALL = {"io", "errors"}

# layer -> draftkit layers it may import
ALLOWED = {
    "objectives": set(),
    "drafts": set(),
    "targets": set(),
    "engine": {"objectives"},
    "data": {"targets", "objectives"},  # IGNORE_INDEX is the one masking constant
    "export": {"drafts", "engine"},
    "runtime": {"targets", "data", "engine", "drafts"},  # drafters wrap the draft modules they run
    # config: the composed Hydra configuration (config.instantiate_draft builds the `draft` group for a target)
    "recipes": {"drafts", "objectives", "data", "targets", "engine", "export", "runtime", "recipes", "config"},
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


def test_shared_modules_import_nothing_of_draftkit():
    for name in SHARED_BY_ALL:
        assert not set(_draftkit_imports(SRC / f"{name}.py")), name


def test_nothing_outside_the_cli_imports_recipes():
    for path in SRC.rglob("*.py"):
        if path.parent.name != "recipes" and path.name != "train.py":
            assert "recipes" not in set(_draftkit_imports(path)), path


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"draftkit." + ".".join(p.parent.relative_to(SRC).parts) if p.parent != SRC else "draftkit"
             for p in SRC.rglob("__init__.py")}
    assert found | {"draftkit.conf"} == listed


def _top_level_functions(path: Path) -> set[str]:
    return {node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}


def _families(layer: str, entry: str) -> set[str]:
    return {p.stem for p in (SRC / layer).glob("*.py") if entry in _top_level_functions(p)}


def test_every_method_owns_its_loader_and_its_drafting_by_name():
    """draftkit.eval finds export.<family>.load and runtime.<family>.drafting from the family an artifact records, so
    each method has both, under one name, and nothing else in those layers claims to be a family."""
    loaders, runtimes = _families("export", "load"), _families("runtime", "drafting")
    assert loaders == runtimes, (sorted(loaders - runtimes), sorted(runtimes - loaders))
    assert {"lm", "medusa", "hydra_heads", "clover", "fspad", "kangaroo", "specdecpp"} <= loaders


def test_the_eval_cli_names_no_family():
    """A new method must not need an edit in eval.py: no family name appears in it as a string."""
    strings = {node.value for node in ast.walk(ast.parse((SRC / "eval.py").read_text()))
               if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert not strings & _families("export", "load")


def test_recipes_never_import_each_other():
    """Shared recipe steps live in helper modules (recipes/common.py, heads_common.py), not in another recipe."""
    recipes = {p.stem for p in (ROOT / "conf" / "recipe").glob("*.yaml")}
    violations = []
    for name in recipes:
        tree = ast.parse((SRC / "recipes" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            modules = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else []) + (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if isinstance(node, ast.ImportFrom) and node.module == "draftkit.recipes":
                modules += [f"draftkit.recipes.{a.name}" for a in node.names]
            violations += [f"{name} imports {m}" for m in modules
                           if m.startswith("draftkit.recipes.") and m.split(".")[2] in recipes - {name}]
    assert not violations, violations


def test_benchmarks_use_public_entry_points_only():
    """Benchmarks run recipes through draftkit.train (run_recipe or the CLI), never through a recipe's internals."""
    offenders = [f"{path.name} imports draftkit.recipes" for path in (ROOT / "benchmarks").glob("*.py")
                 if "recipes" in set(_draftkit_imports(path)) or "from draftkit import recipes" in path.read_text()]
    assert not offenders, offenders
