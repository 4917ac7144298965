"""Pieces every benchmark driver shares: the machine description and the trimmed evaluation summaries.

Drivers run as scripts (`python benchmarks/<name>.py`), so this folder is on sys.path and `import bench_common` works.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def throughput(run_dir: Path, stage: str) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if f"{stage}/tokens_per_s" in r]
    steady = rows[1:] or rows  # the first interval includes warm-up
    rates = [r[f"{stage}/tokens_per_s"] for r in steady]
    peaks = [r.get(f"{stage}/peak_memory_gb") for r in rows if r.get(f"{stage}/peak_memory_gb") is not None]
    return {"train_tokens_per_s_mean": sum(rates) / len(rates) if rates else None,
            "peak_memory_gb": max(peaks) if peaks else None,
            "final_loss": rows[-1][f"{stage}/loss"] if rows else None}


def selfdistill_finished(run_dir: Path) -> bool:
    """A draftkit run's self-distilled answers are complete once its training stage has logged (the answers come
    first), so other runs can start from a copy while it trains."""
    metrics = run_dir / "metrics.jsonl"
    return metrics.is_file() and metrics.stat().st_size > 0


def summary(report: dict | None) -> dict | None:
    if report is None:
        return None
    o = report["overall"]
    keep = ("prompts", "new_tokens", "tau", "alpha", "draft_acceptance", "tokens_per_s", "ar_tokens_per_s", "speedup",
            "outputs_differing_from_ar")
    return {"overall": {k: o.get(k) for k in keep},
            "categories": {c: {"tau": s["tau"], "alpha": s["alpha"], "speedup": s.get("speedup")}
                           for c, s in report["categories"].items()},
            "config": report["config"]}


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def spec_bench() -> Path:
    """Spec-Bench's questions in the shared data (evaluation only), found as conf/data/shared.yaml finds them."""
    root = Path(os.environ.get("DRAFTKIT_SHARED_DATA", "../shared/data"))
    return root / "spec_bench" / "question.jsonl"


def selected_families(argument: str, known) -> list[str]:
    """--families a,b -> the names, refused with the list to choose from when one is unknown."""
    families = [f.strip() for f in argument.split(",") if f.strip()]
    unknown = sorted(set(families) - set(known))
    if unknown:
        raise SystemExit(f"unknown families {unknown}; choose from {list(known)}")
    return families
