"""Composing draftkit's Hydra configuration, shared by the CLI and the tests: the recipe choice, which value wins when
the user typed several, and the checks every config passes before any model is loaded."""

from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from draftkit.errors import ConfigError

CONFIG_MODULE = "draftkit.conf"
PRIMARY_CONFIG = "train"
# Groups that refine whatever a recipe set up; they must merge after `+recipe=`, in this order (a debug overlay
# shrinks whatever budget was chosen).
OVERLAY_GROUPS = ("budget", "debug")
RESUME_CHOICES = (True, False, "force")

__all__ = ["ConfigError", "available_recipes", "prepare_overrides", "compose", "apply_precedence", "validate",
           "instantiate_draft"]


def available_options(group: str) -> list[str]:
    folder = importlib.resources.files(CONFIG_MODULE) / group
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def available_recipes() -> list[str]:
    return available_options("recipe")


def config_groups() -> set[str]:
    root = importlib.resources.files(CONFIG_MODULE)
    return {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")}


def _group_of(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _is_group_choice(override: str, groups: set[str]) -> bool:
    """`target=hf`, `+recipe=x`, `+budget/gpu30@_global_=x`: a choice of config files, not a typed value."""
    key = _group_of(override)
    return "." not in key.split("@")[0] and key.split("@")[0].split("/")[0] in groups


def _budget_overrides(budget: str, recipe: str) -> list[str]:
    """`budget=<b>` merges conf/budget/<b>.yaml (what every recipe shares: data and evaluation sizes, precision) and
    then, when it exists, conf/budget/<b>/<recipe>.yaml (the recipe's own steps and learning rate for that budget)."""
    known = available_options("budget")
    if budget not in known:
        raise ConfigError(f"unknown budget {budget!r}; available budgets: {', '.join(known)}. Fix: budget=<one of "
                          "them>")
    per_recipe = importlib.resources.files(CONFIG_MODULE) / "budget" / budget / f"{recipe}.yaml"
    return [f"+budget={budget}"] + ([f"+budget/{budget}@_global_={recipe}"] if per_recipe.is_file() else [])


def prepare_overrides(overrides: list[str]) -> list[str]:
    """Validate the recipe choice and move overlay groups after it.

    Hydra merges appended groups in command-line order, so `+debug=tiny +recipe=x` would let the recipe
    silently undo the debug overlay; reordering makes both orders mean the same thing.
    """
    recipes = [o for o in overrides if _group_of(o) == "recipe"]
    known = available_recipes()
    if not recipes:
        raise ConfigError(f"no recipe chosen. Fix: add +recipe=<name>; available recipes: {', '.join(known)}")
    for o in recipes:
        if not o.startswith("+recipe="):
            raise ConfigError(f"the recipe is chosen with a plus sign. Fix: write +recipe=<name> (got {o!r}); "
                              f"available recipes: {', '.join(known)}")
        name = o.split("=", 1)[1]
        if name not in known:
            raise ConfigError(f"unknown recipe {name!r}; available recipes: {', '.join(known)}. Fix: "
                              "+recipe=<one of them>")
    recipe = recipes[-1].split("=", 1)[1]
    normalized = []
    for group in OVERLAY_GROUPS:
        for o in (o for o in overrides if _group_of(o) == group):
            choice = o.split("=", 1)[1]
            normalized += _budget_overrides(choice, recipe) if group == "budget" else ["+" + o.lstrip("+")]
    rest = [o for o in overrides if _group_of(o) not in OVERLAY_GROUPS]
    return rest + normalized


def _parsed(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise ConfigError(f"cannot read the command line: {error}. Fix: write each override as key=value (quote "
                          "lists and spaces for the shell: 'data.prompts=[a.jsonl,b.jsonl]')") from None


def typed_values(overrides: list[str]) -> dict[str, object]:
    """{dotted key: value} for every setting the user typed (group choices, deletions and hydra.* left out)."""
    groups = config_groups()
    typed = {}
    for override in _parsed(overrides):
        key = override.key_or_group
        if override.is_delete() or _is_group_choice(key + "=", groups) or key.split(".")[0] == "hydra":
            continue
        typed[key] = override.value()
    return typed


def stage_engine_paths(cfg: DictConfig) -> list[str]:
    """Every `engine` mapping below the top level: a recipe stage's own engine settings (fastdraft.pretrain.engine)."""
    found = []

    def walk(node, path):
        for key in node:
            value = node._get_node(key)
            where = f"{path}.{key}" if path else str(key)
            if isinstance(value, DictConfig):
                if key == "engine" and path:
                    found.append(where)
                else:
                    walk(value, where)

    walk(cfg, "")
    return found


def apply_precedence(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """A value the user typed wins: a top-level `engine.<key>` typed on the command line replaces every stage's own
    value for that key (fastdraft.pretrain.engine.<key>, fspad.train.engine.<key>), unless the user also typed that
    stage's key, which then wins for its stage. The config is changed in place, so what it records is what runs.
    Returns `stage.key` for each stage value replaced."""
    typed = typed_values(overrides)
    top = {key.split(".", 1)[1] for key in typed if key.startswith("engine.") and key.count(".") == 1}
    replaced = []
    for path in stage_engine_paths(cfg):
        node = OmegaConf.select(cfg, path)
        for key in sorted(top):
            if key in node and f"{path}.{key}" not in typed and path not in typed:
                with open_dict(node):
                    node[key] = OmegaConf.select(cfg, f"engine.{key}")
                replaced.append(f"{path}.{key}")
    return replaced


def _kind(value) -> str | None:
    """What a typed value must be, judging by the setting's own default (None: anything goes)."""
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, (list, ListConfig)):
        return "a list"
    if isinstance(value, (dict, DictConfig)):
        return "a mapping"
    return None


def _fits(value, kind: str) -> bool:
    if value is None:  # null switches most settings off; the checks that follow refuse it where it cannot work
        return True
    return {
        "true or false": lambda v: isinstance(v, bool),
        "a whole number": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "a number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "a list": lambda v: isinstance(v, list),
        "a mapping": lambda v: isinstance(v, dict),
    }[kind](value)


def check_typed_values(defaults: DictConfig, overrides: list[str]) -> None:
    """Each typed value must have the type of the setting's default: `engine.steps=abc` or `data.pretrain=x.jsonl` (a
    list setting given one string) are refused here, by name, instead of failing later inside a loader."""
    for key, value in typed_values(overrides).items():
        if key == "resume":  # a switch that also takes a word: validate() names its choices
            continue
        default = OmegaConf.select(defaults, key, default=None, throw_on_resolution_failure=False)
        kind = _kind(default)
        if kind is None or _fits(value, kind):
            continue
        shown = OmegaConf.to_container(default) if isinstance(default, (DictConfig, ListConfig)) else default
        if kind == "a list":
            raise ConfigError(f"{key}={value!r}: must be a list (its default is {shown}). Fix: write it in brackets, "
                              f"quoted for the shell: '{key}=[{value}]'")
        raise ConfigError(f"{key}={value!r}: must be {kind} (its default is {shown!r}). Fix: e.g. {key}={shown}")


def _hydra_message(error: Exception) -> str:
    """One line, with the fix, for what Hydra reports in several: an unknown key, an unknown group option, bad syntax."""
    text = str(error)
    cause = str(error.__cause__ or "")
    if "is not in struct" in text + cause and "Could not override '" in text:
        key = text.split("Could not override '", 1)[1].split("'", 1)[0]
        return (f"{key} is not a setting of this config. Fix: check its spelling (python -m draftkit.train "
                f"+recipe=<name> --cfg job prints every setting), or write +{key}=... to add a new key")
    options = getattr(error, "options", None)
    if options and "Could not find '" in text:
        missing = text.split("Could not find '", 1)[1].split("'", 1)[0]
        group, _, option = missing.rpartition("/")
        return f"{group}={option} is not an option of {group}. Fix: choose one of {', '.join(options)}"
    lines = [line.strip() for line in (text + "\n" + cause).splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(("full_key:", "object_type=", "Config search path",
                                                           "provider="))]
    return f"{' '.join(kept)}. Fix: check the override's spelling and value (--cfg job prints the composed config)"


@functools.lru_cache(maxsize=16)
def _defaults(choices: tuple[str, ...]) -> DictConfig:
    """The config the group choices alone compose to: what each typed value's type is checked against (read only)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(PRIMARY_CONFIG, overrides=list(choices), return_hydra_config=True)


def compose(overrides: list[str]) -> DictConfig:
    """The config `python -m draftkit.train <overrides>` would run with, typed values checked and precedence applied
    (apply_precedence); HydraConfig.get() describes the run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = prepare_overrides(overrides)
    groups = config_groups()
    choices = tuple(o for o in overrides if _is_group_choice(o, groups))  # what decides the settings and defaults
    try:
        defaults = _defaults(choices)
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = hydra_compose(PRIMARY_CONFIG, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(_hydra_message(error)) from None
    HydraConfig.instance().set_config(defaults)
    check_typed_values(defaults, overrides)
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve outside @hydra.main
    with open_dict(cfg):
        cfg.run_dir = OmegaConf.select(cfg, "hydra.run.dir")  # pinned once: `${now:...}` re-resolves on every access
        del cfg["hydra"]  # what @hydra.main hands a task has no hydra node either
    apply_precedence(cfg, overrides)
    return cfg


def _check_model_path(group: str, node) -> None:
    """`<group>.path`, where the group has one: set, and present when it names a local file or directory (a Hub id is
    looked up when the model loads)."""
    if not isinstance(node, DictConfig) or "path" not in node.keys():  # `in` is False for a missing (???) value
        return
    if OmegaConf.is_missing(node, "path"):
        raise ConfigError(f"{group}.path is not set. Fix: {group}.path=<local directory | .gguf file | Hub id>")
    path = str(node.path)
    from draftkit.targets.hf import BUILTIN_SMOLLM2, builtin_smollm2_gguf

    if path == BUILTIN_SMOLLM2:
        builtin_smollm2_gguf()  # the package that ships it is installed
        return
    local = path.startswith(("/", "./", "../", "~")) or path.endswith(".gguf") or Path(path).exists()
    gguf_file = node.get("gguf_file")
    where = Path(path).expanduser() / gguf_file if gguf_file else Path(path).expanduser()
    if local and not where.exists():
        raise ConfigError(f"{group}.path={path}: {where} does not exist. Fix: give an existing HF model directory or "
                          ".gguf file, or a Hub id (online)")


def validate(cfg: DictConfig) -> None:
    """Refuse, with the setting's name and a fix, what cannot work, before any model is loaded: the resume switch,
    every training stage's engine settings, the data and evaluation sources and the prompts' content."""
    from draftkit.data.selfdistill import check_prompt_sources
    from draftkit.data.sources import check_source_list, check_source
    from draftkit.engine.loop import stage_settings

    if cfg.get("resume", True) not in RESUME_CHOICES:
        raise ConfigError(f"resume={cfg.resume!r}: must be true (continue a run whose config matches), false (train "
                          "from the start) or force (continue with a changed config). Fix: resume=true")
    engine = OmegaConf.to_container(cfg.engine, resolve=True)
    stage_settings(engine)
    for path in stage_engine_paths(cfg):
        stage_settings(engine, path, **OmegaConf.to_container(OmegaConf.select(cfg, path), resolve=True))
    data = cfg.data
    for key in ("pretrain", "prompts"):
        check_source_list(f"data.{key}", OmegaConf.to_container(data[key], resolve=True)
                          if isinstance(data[key], ListConfig) else data[key])
    for key in ("pretrain_limit", "prompts_limit"):
        limit = data.get(key)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"data.{key}={limit!r}: must be a whole number >= 1 (records per source), or null for "
                              f"all. Fix: data.{key}=1000")
    if cfg.eval.get("enabled"):
        check_source("eval.prompts", cfg.eval.prompts)
        for key in ("gamma", "max_new_tokens", "limit_per_category"):
            value = cfg.eval.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"eval.{key}={value!r}: must be a whole number >= 1. Fix: e.g. eval.{key}=4, or "
                                  "eval=none to skip the measurement")
    check_prompt_sources("data.prompts", list(data.prompts), data.prompts_limit)
    for group in ("target", "draft"):
        _check_model_path(group, cfg.get(group))
    run_dir = cfg.get("run_dir")
    if run_dir and Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise ConfigError(f"the run directory {run_dir} is a file. Fix: point hydra.run.dir at a directory")


def instantiate_draft(draft_cfg: DictConfig, target):
    """The `draft` group instantiated for `target`: every builder receives the same call-site arguments (the target's
    vocabulary and special ids, its embedding table and model, for drafts cut from or initialised by it)."""
    from hydra.utils import instantiate

    tokenizer = target.tokenizer
    return instantiate(draft_cfg, vocab_size=target.vocab_size, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       target_embedding=target.embed_tokens.weight, target_model=target.model)
