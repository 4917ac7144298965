"""`python -m draftkit.train +recipe=<name> [overrides]`: compose the config, then run the recipe's `run(cfg)`.

Recipes are found by convention: conf/recipe/<name>.yaml pairs with draftkit.recipes.<name>.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from draftkit.config import CONFIG_MODULE, PRIMARY_CONFIG, ConfigError, prepare_overrides
from draftkit.engine.distributed import DistributedConfigError, is_main_process, world_size_from_env
from draftkit.export.hub import push_to_hub
from draftkit.preflight import check_job


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name=PRIMARY_CONFIG)
def _run(cfg: DictConfig) -> None:
    runtime = HydraConfig.get().runtime
    name = runtime.choices["recipe"]
    with open_dict(cfg):
        cfg.run_dir = runtime.output_dir  # pin the timestamp once; it would re-resolve on every access
    try:  # on every rank, before any model is loaded
        check_job(cfg, world_size_from_env())
    except DistributedConfigError as err:
        print(f"draftkit.train: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    recipe = importlib.import_module(f"draftkit.recipes.{name}")
    export_dir = recipe.run(cfg, Path(cfg.run_dir))
    if cfg.get("push_to_hub") and is_main_process():
        url = push_to_hub(export_dir or cfg.run_dir, cfg.push_to_hub, fmt=cfg.get("push_format"))
        print(f"Uploaded to https://huggingface.co/{cfg.push_to_hub} ({url})")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    hydra_flags = [a for a in args if a not in overrides]  # --help, --cfg job, -m ... (kept in order)
    if not any(f in ("--help", "-h", "--hydra-help") for f in hydra_flags):
        try:
            overrides = prepare_overrides(overrides)
        except ConfigError as err:
            print(f"draftkit.train: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    sys.argv = [sys.argv[0], *hydra_flags, *overrides]
    _run()


if __name__ == "__main__":
    main()
