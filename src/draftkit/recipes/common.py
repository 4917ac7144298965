"""Steps several recipes share: measuring a draft's acceptance and tabulating before/after results."""

from __future__ import annotations

import json
import random
from pathlib import Path

from datasets import Dataset, concatenate_datasets
from omegaconf import DictConfig, OmegaConf
from torch import nn

from draftkit.data.chat import tokenize_chat
from draftkit.data.selfdistill import prompts_from_records, regenerate_responses
from draftkit.data.sources import builtin_path, load_records
from draftkit.engine.checkpoint import write_json_atomic, write_text_atomic
from draftkit.runtime.evaluate import evaluate_draft, load_prompts


def prompt_file(source: str) -> Path:
    return builtin_path(source.removeprefix("builtin:")) if source.startswith("builtin:") else Path(source)


def records(sources, limit):
    parts = [load_records(src, limit=limit) for src in sources]
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def selfdistilled_chats(cfg: DictConfig, target, run_dir: Path) -> Dataset:
    """The data group's prompts answered by the target (cached in run_dir/selfdistill.jsonl), tokenized with
    assistant-only labels: the training set of every recipe that learns from the target's own answers."""
    gen = cfg.data.selfdistill
    prompts = prompts_from_records(records(cfg.data.prompts, cfg.data.prompts_limit),
                                   max_prompt_tokens=gen.max_prompt_tokens, tokenizer=target.tokenizer)
    random.Random(cfg.engine.seed).shuffle(prompts)  # mix the sources before taking num_prompts
    prompts = prompts[: gen.num_prompts]
    conversations = regenerate_responses(
        target.model, target.tokenizer, prompts, cache_file=Path(run_dir) / "selfdistill.jsonl",
        max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
        batch_size=gen.batch_size, seed=cfg.engine.seed)
    return tokenize_chat(Dataset.from_list([{"messages": c} for c in conversations]), target.tokenizer,
                         max_length=cfg.data.max_length, too_long=cfg.data.too_long)


def measure_acceptance(target, draft, eval_cfg: DictConfig, path: Path, **evaluate_args) -> dict | None:
    """Evaluate the draft (a draft LM or any Drafter; `evaluate_args` go to evaluate_draft) on the eval prompts; a
    report already at `path` for the same settings is reused, so a resumed run does not measure the untrained
    draft again."""
    if not eval_cfg.enabled:
        return None
    settings = OmegaConf.to_container(eval_cfg, resolve=True)
    path = Path(path)
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("eval_settings") == settings:
            return cached
    prompts = load_prompts(prompt_file(eval_cfg.prompts), limit_per_category=eval_cfg.limit_per_category)
    module = draft if isinstance(draft, nn.Module) else draft.model
    was_training = module.training
    module.eval()
    report = evaluate_draft(target, draft, prompts, gamma=eval_cfg.gamma, temperature=eval_cfg.temperature,
                            max_new_tokens=eval_cfg.max_new_tokens, measure_speedup=eval_cfg.measure_speedup,
                            **evaluate_args)
    module.train(was_training)
    report["eval_settings"] = settings
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


def finish_run(run_dir: Path, sink, before: dict | None, after: dict | None, table: str, export_dir: Path,
               what: str) -> Path:
    """The end of a train-and-measure recipe: summary.md, the run's summary metrics, result.json, the console table."""
    write_text_atomic(run_dir / "summary.md", table + "\n")
    if after is not None:
        sink.summary({"tau_before": before["overall"]["tau"] if before else None, "tau_after": after["overall"]["tau"]})
    sink.finish()
    write_json_atomic(run_dir / "result.json", {"export": str(export_dir), "before": before, "after": after})
    print(f"\n{table}\n\n{what} exported to {export_dir}")
    return export_dir
