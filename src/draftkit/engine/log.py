"""Metric sinks, chosen by the `logger` config group. Only the main process writes."""

from __future__ import annotations

import json
import os
from pathlib import Path


class NullSink:
    def __init__(self, **_run):
        pass

    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self) -> None:
        pass


class JsonlSink(NullSink):
    """Appends one JSON line per logged step to `<run_dir>/metrics.jsonl` (readable with pandas or jq)."""

    def __init__(self, run_dir: str, filename: str = "metrics.jsonl", **_run):
        self.path = Path(run_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, metrics: dict, step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def summary(self, values: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"summary": values}) + "\n")


class WandbSink(NullSink):
    """Weights & Biases. Without an API key it runs offline (`wandb sync <run_dir>/wandb/...` uploads later),
    because an online init with no key fails at once on headless machines."""

    def __init__(self, run_dir: str, run_config: dict | None = None, run_name: str | None = None,
                 project: str = "draftkit", entity: str | None = None, group: str | None = None,
                 mode: str | None = None, **_run):
        import wandb

        if mode is None and "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
            mode = "offline"
        self.run = wandb.init(project=project, entity=entity, group=group, name=run_name, dir=str(run_dir),
                              config=run_config, mode=mode, reinit="finish_previous")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def finish(self) -> None:
        self.run.finish()
