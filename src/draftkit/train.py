"""`python -m draftkit.train +recipe=<name> [overrides]`: compose the config, check it, then run the recipe.

Recipes are found by convention: conf/recipe/<name>.yaml pairs with draftkit.recipes.<name>, whose `validate(cfg)`
checks the recipe's settings before any model is loaded. A mistake in the input ends as one line,
`draftkit.train: <what>. Fix: <how>`, with exit status 2 (DRAFTKIT_DEBUG=1 shows the traceback); Ctrl-C prints how to
continue the run.
"""

from __future__ import annotations

import importlib
import shlex
import sys
from contextlib import nullcontext
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from draftkit.config import CONFIG_MODULE, PRIMARY_CONFIG, apply_precedence, compose, prepare_overrides, validate
from draftkit.engine.distributed import is_main_process, world_size_from_env
from draftkit.engine.run import check_resume, run_dir_lock
from draftkit.errors import reported
from draftkit.export.hub import push_to_hub
from draftkit.preflight import check_job

# What main() settled before Hydra runs the job: the checked config's run directory, held locked while the job runs.
_job: dict = {"run_dir": None, "checked": False, "argv": []}


def check(cfg: DictConfig) -> None:
    """Everything that can be checked before a model is loaded: the config (config.validate), the recipe's settings
    (its validate), the distributed settings of every stage, and that the run directory may be continued with it."""
    validate(cfg)  # before the recipe's imports (torch, transformers: seconds)
    recipe = importlib.import_module(f"draftkit.recipes.{HydraConfig.get().runtime.choices['recipe']}")
    recipe.validate(cfg)
    check_job(cfg, world_size_from_env())  # on every rank
    if is_main_process():
        check_resume(Path(cfg.run_dir), cfg)


def _continue_hint() -> str:
    if _job["run_dir"] is None:
        return ""
    if not Path(_job["run_dir"]).is_dir():
        return "Nothing was written yet."
    args = [a for a in _job["argv"] if not a.startswith("hydra.run.dir=")] + [f"hydra.run.dir={_job['run_dir']}"]
    return ("To continue from its newest checkpoint, run: python -m draftkit.train "
            + " ".join(shlex.quote(a) for a in args))


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name=PRIMARY_CONFIG)
def _run(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    name = hydra_cfg.runtime.choices["recipe"]
    with open_dict(cfg):
        cfg.run_dir = hydra_cfg.runtime.output_dir  # pin the timestamp once; it would re-resolve on every access
    with reported("train", _continue_hint):
        apply_precedence(cfg, list(hydra_cfg.overrides.task))
        if not _job["checked"]:  # a multirun job: each of its runs is checked here
            check(cfg)
        # main() holds this directory's lock already (Hydra's output_dir is absolute, the configured one may not be)
        locked = _job["run_dir"] is not None and Path(_job["run_dir"]).resolve() == Path(cfg.run_dir).resolve()
        with run_dir_lock(Path(cfg.run_dir)) if not locked else nullcontext():
            recipe = importlib.import_module(f"draftkit.recipes.{name}")
            export_dir = recipe.run(cfg, Path(cfg.run_dir))
        if cfg.get("push_to_hub") and is_main_process():
            url = push_to_hub(export_dir or cfg.run_dir, cfg.push_to_hub, fmt=cfg.get("push_format"))
            print(f"Uploaded to https://huggingface.co/{cfg.push_to_hub} ({url})")


def run_recipe(overrides: list[str], run_dir: str | Path) -> Path | None:
    """Run a recipe in this process, as `python -m draftkit.train <overrides> hydra.run.dir=<run_dir>` would (for
    benchmarks and notebooks); returns the export directory. Running the same command on the same directory resumes."""
    cfg = compose([*overrides, f"hydra.run.dir={run_dir}"])
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    check(cfg)
    name = HydraConfig.get().runtime.choices["recipe"]
    return importlib.import_module(f"draftkit.recipes.{name}").run(cfg, Path(run_dir))


def _printed_config(flags: list[str]) -> str | None:
    """Which config `--cfg <job|hydra|all>` (or -c) asks Hydra to print, None without the flag."""
    for i, flag in enumerate(flags):
        if flag in ("--cfg", "-c") and i + 1 < len(flags):
            return flags[i + 1]
        if flag.startswith("--cfg="):
            return flag.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    hydra_flags = [a for a in args if a not in overrides]  # --help, --cfg job, -m ... (kept in order)
    _job.update(run_dir=None, checked=False, argv=overrides)
    if _printed_config(hydra_flags) == "job" and not any(f in ("-p", "--package") or f.startswith("--package=")
                                                         for f in hydra_flags):
        # Printed here rather than by Hydra, which prints before the precedence rule: this is the config that runs.
        with reported("train"):
            cfg = compose(prepare_overrides(overrides))
        print(OmegaConf.to_yaml(cfg, resolve="--resolve" in hydra_flags), end="")
        return
    informational = any(f in ("--help", "-h", "--hydra-help", "--info", "-i") or f.startswith(("--cfg", "-c"))
                        for f in hydra_flags)
    multirun = any(f in ("-m", "--multirun") for f in hydra_flags)
    if not any(f in ("--help", "-h", "--hydra-help") for f in hydra_flags):
        with reported("train"):
            overrides = prepare_overrides(overrides)
            if not informational and not multirun:
                cfg = compose(overrides)
                check(cfg)
                _job.update(run_dir=cfg.run_dir, checked=True)
                if not any(o.startswith("hydra.run.dir=") for o in overrides):
                    overrides.append(f"hydra.run.dir={cfg.run_dir}")  # the directory that was checked and is locked
    sys.argv = [sys.argv[0], *hydra_flags, *overrides]
    with reported("train", _continue_hint):
        if _job["checked"]:
            with run_dir_lock(Path(_job["run_dir"])):
                _run()
        else:
            _run()


if __name__ == "__main__":
    main()
