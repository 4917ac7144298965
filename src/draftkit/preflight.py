"""`python -m draftkit.preflight [--hostfile FILE | --world-size N] +recipe=<name> [overrides]`

Checks a multi-process job before any process is started: the `dist` settings, the DeepSpeed config each
training stage would run with (including a user `dist.config_file`) and, for DeepSpeed's launcher, the
hostfile. The launch scripts in launch/ run it first; `python -m draftkit.train` runs the same checks on
every rank before it loads a model. Exit status 2 with one message on a problem, 0 and a summary otherwise.
"""

from __future__ import annotations

import argparse
import sys

from omegaconf import DictConfig, OmegaConf

from draftkit.config import compose, stage_engine_paths, validate
from draftkit.engine.distributed import DistributedConfigError, validate_hostfile, world_size_from_env
from draftkit.engine.loop import stage_settings
from draftkit.errors import reported


def _offline_feature_keys(node, path=""):
    """Every `<...>.features.source` set to offline: recipes that train on cached target features (fspad)."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else key
            if key == "features" and isinstance(value, dict) and value.get("source") == "offline":
                yield f"{where}.source"
            else:
                yield from _offline_feature_keys(value, where)


def check_job(cfg: DictConfig, world_size: int) -> list[str]:
    """Raise DistributedConfigError on the first problem; return one line per training stage that was checked."""
    config = OmegaConf.to_container(cfg, resolve=True)
    engine = config["engine"]
    stages = [("engine", {})] + [(path, OmegaConf.to_container(OmegaConf.select(cfg, path), resolve=True))
                                 for path in stage_engine_paths(cfg)]
    lines = []
    for where, overrides in stages:
        settings = stage_settings(engine, where, **overrides)
        dist = settings.distributed
        if dist.backend == "deepspeed":
            settings.deepspeed_config(world_size)
            if dist.zero_stage == 3:
                caches = list(_offline_feature_keys(config))
                if caches:
                    raise DistributedConfigError(
                        f"dist=zero3 partitions the target across ranks, but {caches[0]}=offline: a feature cache "
                        "is built from whole target activations on one rank and cannot be sharded. Fix: set "
                        f"{caches[0]}=online (features are then computed from the sharded target), or use "
                        "dist=zero2 with the target replicated")
        lines.append(f"{where}: {dist.backend}{f' ZeRO-{dist.zero_stage}' if dist.zero_stage else ''}, "
                     f"micro-batch {settings.micro_batch_size} x accumulation {settings.grad_accum} x {world_size} "
                     f"rank(s), {settings.precision}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m draftkit.preflight", description=__doc__.split("\n\n")[1])
    parser.add_argument("--hostfile", default=None, help="DeepSpeed hostfile: `hostname slots=N` per line")
    parser.add_argument("--world-size", type=int, default=None, help="total processes (default: from the hostfile, "
                        "else $WORLD_SIZE, else 1)")
    args, overrides = parser.parse_known_args(argv)
    try:
        with reported("preflight"):
            world_size = args.world_size or world_size_from_env()
            if args.hostfile:
                hosts = validate_hostfile(args.hostfile)
                world_size = args.world_size or sum(hosts.values())
                print(f"hostfile: {len(hosts)} node(s), {sum(hosts.values())} slot(s): "
                      + ", ".join(f"{h}={n}" for h, n in hosts.items()))
            cfg = compose(overrides)
            validate(cfg)
            for line in check_job(cfg, world_size):
                print(line)
    except SystemExit as stop:  # the one line is printed; the status is returned
        return stop.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
