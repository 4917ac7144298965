"""Metric sinks, chosen by the `logger` config group. Only the main process writes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from draftkit.engine.distributed import is_main_process
from draftkit.engine.run import git_state
from draftkit.io import write_text_atomic


class NullSink:
    def __init__(self, **_run):
        pass

    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def rewind(self, prefix: str, step: int) -> None:
        """Forget what was logged under `prefix/` after `step`: a resumed stage logs those steps again."""

    def finish(self) -> None:
        pass


class JsonlSink(NullSink):
    """One JSON line per logged step in `<run_dir>/metrics.jsonl` (readable with pandas or jq); rank 0 only.

    A resumed run leaves one row per (step, metric names): a row logged again (a stage resumed from its checkpoint, a
    finished run rerun) replaces the earlier one where it stood, `rewind` drops a stage's rows past its checkpoint, the
    summary stays the last row, and a line a killed process left half-written is dropped when the file is opened."""

    def __init__(self, run_dir: str, filename: str = "metrics.jsonl", **_run):
        self.path = Path(run_dir) / filename
        self.main = is_main_process()
        self.rows: list[dict] = []
        if not self.main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            lines = self.path.read_text().splitlines()
            for line in lines:
                try:
                    self.rows.append(json.loads(line))
                except ValueError:  # the torn last line of a killed write
                    pass
            if len(self.rows) != len(lines):
                self._rewrite()
        self._keys = {self._key(row) for row in self.rows}

    @staticmethod
    def _key(row: dict) -> tuple:
        return ("summary",) if "summary" in row else (row.get("step"), tuple(sorted(k for k in row if k != "step")))

    def _rewrite(self) -> None:
        write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in self.rows))
        self._keys = {self._key(row) for row in self.rows}

    def _put(self, row: dict) -> None:
        if not self.main:
            return
        key = self._key(row)
        if "summary" in row:
            self.rows = [old for old in self.rows if "summary" not in old] + [row]
        elif key in self._keys:
            self.rows = [row if self._key(old) == key else old for old in self.rows]
        else:
            self.rows.append(row)
            self._keys.add(key)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            return
        self._rewrite()

    def log(self, metrics: dict, step: int) -> None:
        self._put({"step": step, **metrics})

    def summary(self, values: dict) -> None:
        self._put({"summary": values})

    def rewind(self, prefix: str, step: int) -> None:
        if not self.main:
            return
        kept = [row for row in self.rows if not (isinstance(row.get("step"), int) and row["step"] > step
                                                 and any(k.startswith(prefix + "/") for k in row))]
        if len(kept) != len(self.rows):
            self.rows = kept
            self._rewrite()


class WandbSink(NullSink):
    """Weights & Biases: one run per job. Only rank 0 creates it; the other ranks of a multi-process job stay
    silent. Runs are grouped by `group` (the experiment; by default the recipe name, see conf/logger/wandb.yaml),
    the resolved config and the git commit are recorded, and the run id is derived from the run directory, so
    a resumed job continues its run instead of starting another. Without an API key it runs offline
    (`wandb sync <run_dir>/wandb/offline-run-*` uploads later), because an online init with no key fails at
    once on headless machines."""

    def __init__(self, run_dir: str, run_config: dict | None = None, run_name: str | None = None,
                 project: str = "draftkit", entity: str | None = None, group: str | None = None,
                 mode: str | None = None, **_run):
        self.run = None
        if not is_main_process():
            return
        import wandb

        if mode is None:  # read here: wandb caches its environment at the first init of the process
            mode = os.environ.get("WANDB_MODE") or (None if os.environ.get("WANDB_API_KEY") else "offline")
        run_id = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
        config = {**(run_config or {}), "git": git_state()}
        offline = mode in ("offline", "disabled", "dryrun")
        # Resuming asks the server for the run's history, so offline runs reuse the id without it
        # (`wandb sync` of both offline parts lands in the one run).
        self.run = wandb.init(project=project, entity=entity, group=group, name=run_name, dir=str(run_dir),
                              config=config, mode=mode, id=run_id, resume=None if offline else "allow",
                              reinit="finish_previous")

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
