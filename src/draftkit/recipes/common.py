"""Steps several recipes share: measuring a draft's acceptance and tabulating before/after results."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from draftkit.data.sources import builtin_path
from draftkit.engine.checkpoint import write_json_atomic
from draftkit.engine.distributed import is_main_process
from draftkit.runtime.evaluate import evaluate_draft, load_prompts


def prompt_file(source: str) -> Path:
    return builtin_path(source.removeprefix("builtin:")) if source.startswith("builtin:") else Path(source)


def measure_acceptance(target, draft, eval_cfg: DictConfig, path: Path) -> dict | None:
    """Evaluate the draft on the eval prompts; a report already at `path` for the same settings is reused,
    so a resumed run does not measure the untrained draft again."""
    if not eval_cfg.enabled:
        return None
    settings = OmegaConf.to_container(eval_cfg, resolve=True)
    path = Path(path)
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("eval_settings") == settings:
            return cached
    prompts = load_prompts(prompt_file(eval_cfg.prompts), limit_per_category=eval_cfg.limit_per_category)
    was_training = draft.training
    draft.eval()
    report = evaluate_draft(target, draft, prompts, gamma=eval_cfg.gamma, temperature=eval_cfg.temperature,
                            max_new_tokens=eval_cfg.max_new_tokens, measure_speedup=eval_cfg.measure_speedup)
    draft.train(was_training)
    report["eval_settings"] = settings
    if is_main_process():  # every rank measures (a ZeRO-3 target needs them all); one writes
        write_json_atomic(path, report)
    return report


def compare_markdown(reports: dict[str, dict | None]) -> str:
    """One row per named report: overall tau, alpha by position, tokens/s and speedup over autoregressive."""
    measured = {name: r for name, r in reports.items() if r is not None}
    if not measured:
        return "(acceptance not measured: eval.enabled=false)"
    gamma = max(r["config"]["gamma"] for r in measured.values())
    any_report = next(iter(measured.values()))
    header = ["", "τ"] + [f"α@{i}" for i in range(1, gamma + 1)] + ["tok/s", "AR tok/s", "speedup"]
    lines = [
        f"Target {any_report['config']['target']}, {any_report['overall']['prompts']} prompts, γ={gamma}, "
        f"temperature={any_report['config']['temperature']}, max_new_tokens={any_report['config']['max_new_tokens']}, "
        f"device={any_report['config']['device']}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]

    def cell(value, digits=2, suffix=""):
        return "–" if value is None else f"{value:.{digits}f}{suffix}"

    for name, report in measured.items():
        o = report["overall"]
        alphas = list(o["alpha"]) + [None] * (gamma - len(o["alpha"]))
        row = [name, cell(o["tau"])] + [cell(a) for a in alphas]
        row += [cell(o["tokens_per_s"], 1), cell(o.get("ar_tokens_per_s"), 1), cell(o.get("speedup"), suffix="x")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
