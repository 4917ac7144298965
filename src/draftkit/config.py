"""Composing draftkit's Hydra configuration, shared by the CLI and the tests."""

from __future__ import annotations

import importlib.resources

from omegaconf import DictConfig, open_dict

CONFIG_MODULE = "draftkit.conf"
PRIMARY_CONFIG = "train"
# Groups that refine whatever a recipe set up; they must merge after `+recipe=`, in this order (a debug overlay
# shrinks whatever budget was chosen).
OVERLAY_GROUPS = ("budget", "debug")


class ConfigError(ValueError):
    pass


def available_options(group: str) -> list[str]:
    folder = importlib.resources.files(CONFIG_MODULE) / group
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def available_recipes() -> list[str]:
    return available_options("recipe")


def _group_of(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _budget_overrides(budget: str, recipe: str) -> list[str]:
    """`budget=<b>` merges conf/budget/<b>.yaml (what every recipe shares: data and evaluation sizes, precision) and
    then, when it exists, conf/budget/<b>/<recipe>.yaml (the recipe's own steps and learning rate for that budget)."""
    known = available_options("budget")
    if budget not in known:
        raise ConfigError(f"unknown budget {budget!r}; available budgets: {', '.join(known)}")
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
        raise ConfigError(f"no recipe chosen. Add +recipe=<name>; available recipes: {', '.join(known)}")
    for o in recipes:
        if not o.startswith("+recipe="):
            raise ConfigError(f"write the recipe as +recipe=<name> (got {o!r}); available recipes: {', '.join(known)}")
        name = o.split("=", 1)[1]
        if name not in known:
            raise ConfigError(f"unknown recipe {name!r}; available recipes: {', '.join(known)}")
    recipe = recipes[-1].split("=", 1)[1]
    normalized = []
    for group in OVERLAY_GROUPS:
        for o in (o for o in overrides if _group_of(o) == group):
            choice = o.split("=", 1)[1]
            normalized += _budget_overrides(choice, recipe) if group == "budget" else ["+" + o.lstrip("+")]
    rest = [o for o in overrides if _group_of(o) not in OVERLAY_GROUPS]
    return rest + normalized


def compose(overrides: list[str]) -> DictConfig:
    """The config `python -m draftkit.train <overrides>` would run with; HydraConfig.get() describes the run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = hydra_compose(PRIMARY_CONFIG, overrides=prepare_overrides(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve outside @hydra.main
    with open_dict(cfg):
        del cfg["hydra"]  # what @hydra.main hands a task has no hydra node either
    return cfg


def instantiate_draft(draft_cfg: DictConfig, target):
    """The `draft` group instantiated for `target`: every builder receives the same call-site arguments (the target's
    vocabulary and special ids, its embedding table and model, for drafts cut from or initialised by it)."""
    from hydra.utils import instantiate

    tokenizer = target.tokenizer
    return instantiate(draft_cfg, vocab_size=target.vocab_size, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       target_embedding=target.embed_tokens.weight, target_model=target.model)

