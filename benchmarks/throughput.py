"""Training throughput of every frozen-target recipe on a Llama-3.1-8B-shaped target with random weights, next to the
ceiling: the bare bf16 forward of the same target body at the same batch shape, measured in the same run.

    python benchmarks/throughput.py --out benchmarks/results/throughput_llama8b_shape_h200_$(date +%F).json
    python benchmarks/throughput.py --cpu-smoke --out /tmp/throughput_smoke.json     # tiny shape, CPU, ~2 minutes

Each recipe runs as `python -m draftkit.train` would run it (draftkit.train.run_recipe, in this process; each row
records the equivalent command) with `eval=none`, `<recipe>.labels=data` and the data source
`synthetic:<count>x<seq-len>:<ids>`: random token ids, every sequence the plan's seq_len long, every position a label
(no padding), `engine.precision=bf16` (autocast), micro_batch sequences per step. With a draft vocabulary the ids are
drawn below its size, so every position is still scored (ids outside it would be skipped by the loss and make the step
look cheaper than the recipe's on real text). Everything measured is read back from the run's metrics.jsonl: tokens/s
is what the loop logs (`<stage>/tokens_per_s`: input tokens per second over a log interval), the first interval
(warm-up) dropped. Peak memory is the loop's `<stage>/peak_memory_gb` (torch.cuda.max_memory_allocated, whose peak is
reset before each recipe): from the recipe's start (its target built, an offline feature cache written) to its last
training step, the target's weights included; the export after training is not in it. Results are written to --out as
each recipe finishes; a rerun with the same --out measures only what is missing (the ceiling is measured again in every
run, and each recipe keeps the ceiling of its own run). A recipe that fails is recorded under failed_last_run and the
others still run; none starts after --stop-after-s (default 420 s), which keeps one call inside an 8-minute GPU slot.

MFU. `engine.count_flops=true` makes the loop count the model FLOPs of its first training micro-step with torch's FLOP
counter (draftkit.engine.flops: matmuls and attention kernels, forward and backward, as executed; grouped-query SDPA
counted per query head): the target's forward (2·N_body per token plus attention), the draft's forward and backward
(≈ 6·N_draft per token plus its attention), and the LM-head work of the heads (per head: forward 2·V·H per scored
position plus the input-gradient backward 2·V·H through the frozen head; the teacher's logits, for Hydra++ and
Clover-2, 2·V·H per position some head scores, once for all heads; V is the draft vocabulary where there is one).
Attention is counted as the full T x T square (the PaLM/Megatron convention; a causal kernel does about half of it),
its backward as 2.5 times its forward (torch's count for the fused kernels, which recompute QKᵀ); nothing else is
recomputed in these steps, so executed FLOPs are the model FLOPs. MFU = FLOPs per token x tokens/s / peak,
with `engine.peak_tflops` = the H200's dense bf16 datasheet figure, 989 TFLOP/s (the loop's `<stage>/mfu`, averaged
over the kept intervals); `mfu_vs_ceiling` divides by the FLOP/s the bare forward achieved in the same run instead.

Differences from the earlier version of this benchmark, which built each recipe's step function itself: the counted
step is the run's first training step, not an extra step before it (the same FLOPs: on the CPU smoke plan both versions
count the same FLOPs per token on every row; its counting overhead falls in the dropped first interval); each recipe
builds its own target (the earlier version shared one, so memory_before_gb no longer includes the target's weights,
while the peak still does); the offline feature cache is written with the recipe's fspad.features settings;
medusa_draft_vocab exports in the vLLM format only (the recipe refuses FasterDecoding's for a draft vocabulary; the
export follows training and enters no measured number); wall_s covers the whole recipe (target built, training,
checkpoint, export).
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import shutil
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch

from bench_common import machine  # benchmarks/ is the script's folder, hence on sys.path

H200_DENSE_BF16_TFLOPS = 989.0  # NVIDIA H200 SXM datasheet: 1,979 TFLOP/s bf16 "with sparsity", half of it dense
RECIPES = {
    # name: (recipe, overrides); {draft_vocab} is the plan's draft vocabulary size, {steps} its steps. The plain
    # full-logits path last, as the one most likely to run out of memory.
    "medusa": ("medusa", []),
    "hydra_heads": ("hydra_heads", []),
    "hydra_plus_plus": ("hydra_heads", ["hydra_heads.teacher_weight=1", "hydra_heads.lm_weight=0",
                                        "hydra_heads.heads.prefix_layer=true", "hydra_heads.heads.num_layers=4"]),
    "clover": ("clover", []),
    "fspad_online": ("fspad", ["fspad.features.source=online", "fspad.train.engine.steps={steps}"]),
    "fspad_offline_bf16": ("fspad", ["fspad.features.source=offline", "fspad.features.storage=bf16",
                                     "fspad.train.engine.steps={steps}"]),
    "kangaroo": ("kangaroo", []),
    # A draft vocabulary (drafts/vocab.py): the LM-head work of every head falls to N/V.
    "medusa_draft_vocab": ("medusa", ["medusa.draft_vocab_size={draft_vocab}", "medusa.export.formats=[vllm]"]),
    "hydra_draft_vocab": ("hydra_heads", ["hydra_heads.draft_vocab_size={draft_vocab}"]),
    "hydra_plus_plus_draft_vocab": ("hydra_heads", ["hydra_heads.teacher_weight=1", "hydra_heads.lm_weight=0",
                                                    "hydra_heads.heads.prefix_layer=true",
                                                    "hydra_heads.heads.num_layers=4",
                                                    "hydra_heads.draft_vocab_size={draft_vocab}"]),
    "clover_draft_vocab": ("clover", ["clover.draft_vocab_size={draft_vocab}"]),
    "fspad_online_draft_vocab": ("fspad", ["fspad.features.source=online", "fspad.draft_vocab_size={draft_vocab}",
                                           "fspad.train.engine.steps={steps}"]),
    "medusa_unchunked": ("medusa", ["medusa.loss_chunk_size=null"]),
}
GPU_PLAN = {"target": ["target=random", "target.shape=llama3_8b"], "seq_len": 2048, "micro_batch": 8,
            "log_every": 3, "intervals": 3, "precision": "bf16", "draft_vocab_size": 32768}
CPU_PLAN = {"target": ["target=random", "target.shape=tiny", "target.dtype=float32", "target.device=cpu",
                       "+target.vocab_size=4096", "+target.num_layers=3", "+target.hidden_size=64",
                       "+target.intermediate_size=128"],
            "seq_len": 64, "micro_batch": 2, "log_every": 2, "intervals": 2, "precision": "fp32",
            "draft_vocab_size": 1024}  # a quarter of the tiny target's vocabulary, as 32768 is of Llama-3's


def decoder_forward_flops_per_token(config, seq_len: int) -> int:
    """The analytic count of the target body's forward: 2 x its matmul parameters (every layer; no embedding lookup,
    no LM head) plus attention's QKᵀ and AV over the full T x T square (4 x layers x heads x head_dim x T)."""
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv = text.num_key_value_heads * head_dim
    attention_proj = text.hidden_size * (2 * text.num_attention_heads * head_dim + 2 * kv)
    mlp = 3 * text.hidden_size * text.intermediate_size
    per_layer = 2 * (attention_proj + mlp) + 4 * text.num_attention_heads * head_dim * seq_len
    return text.num_hidden_layers * per_layer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ceiling(target, batch: dict, repeats: int) -> dict:
    """The bare forward of the target body, called as the recipes call it (Target.features without logits)."""
    from draftkit.engine.flops import count_flops

    device = target.device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    forward = partial(target.features, ids, mask, with_logits=False)
    for _ in range(2):
        forward()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        forward()
    sync(device)
    seconds = (time.perf_counter() - start) / repeats
    flops = count_flops(forward)
    tokens = ids.numel()
    return {"tokens_per_s": tokens / seconds, "flops_per_token": flops / tokens,
            "analytic_flops_per_token": decoder_forward_flops_per_token(target.config, ids.shape[1]),
            "achieved_flops": flops / seconds, "repeats": repeats}


def recipe_overrides(name: str, plan: dict, vocab_size: int) -> tuple[str, list[str], list[str]]:
    """(recipe, the row's own overrides, every override of its run) for the plan."""
    recipe, own = RECIPES[name]
    steps = plan["log_every"] * plan["intervals"]
    own = [o.format(steps=steps, draft_vocab=plan["draft_vocab_size"]) for o in own]
    draft_vocab = any("{draft_vocab}" in o for o in RECIPES[name][1])
    ids = plan["draft_vocab_size"] if draft_vocab else vocab_size
    data = f"synthetic:{steps * plan['micro_batch']}x{plan['seq_len']}:{ids}"
    engine = [f"engine.steps={steps}", f"engine.micro_batch_size={plan['micro_batch']}", "engine.grad_accum=1",
              f"engine.precision={plan['precision']}", f"engine.log_every={plan['log_every']}",
              "engine.save_every=1000000000", "engine.warmup_steps=1", "engine.count_flops=true",
              f"engine.peak_tflops={H200_DENSE_BF16_TFLOPS}"]
    return recipe, own, [f"+recipe={recipe}", *plan["target"], "eval=none", "logger=jsonl", "resume=false",
                         f"data.prompts=[{data}]", f"data.max_length={plan['seq_len']}", f"{recipe}.labels=data",
                         *engine, *own]


def training_metrics(run_dir: Path) -> dict:
    """What the loop logged for the one training stage of a run: tokens/s, MFU and FLOPs per token per interval after
    the first (warm-up), peak memory, last loss."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    stages = {key.removesuffix("/tokens_per_s") for row in rows for key in row if key.endswith("/tokens_per_s")}
    if len(stages) != 1:
        raise RuntimeError(f"{run_dir}/metrics.jsonl: expected one training stage, found {sorted(stages)}")
    stage = stages.pop()
    rows = [row for row in rows if f"{stage}/tokens_per_s" in row]
    steady = rows[1:]

    def per_interval(metric: str) -> list:
        return [row[f"{stage}/{metric}"] for row in steady]

    peaks = [row[f"{stage}/peak_memory_gb"] for row in rows if f"{stage}/peak_memory_gb" in row]
    return {"stage": stage, "tokens_per_s": per_interval("tokens_per_s"), "mfu": per_interval("mfu"),
            "flops_per_token": rows[-1][f"{stage}/flops_per_token"], "peak_memory_gb": max(peaks, default=None),
            "final_loss": rows[-1][f"{stage}/loss"]}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def run_row(name: str, plan: dict, vocab_size: int, work: Path, ceiling: dict) -> dict:
    from draftkit.train import run_recipe

    recipe, own, overrides = recipe_overrides(name, plan, vocab_size)
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cuda = torch.cuda.is_available()
    resident_gb = torch.cuda.memory_allocated() / 2**30 if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        run_recipe(overrides, run_dir)
        wall = time.perf_counter() - start
        logged = training_metrics(run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints, feature cache and export of multi-GB drafts
    tokens_per_s = mean(logged["tokens_per_s"])
    return {
        "recipe": recipe,
        "overrides": own,
        "command": shlex.join(["python", "-m", "draftkit.train", *overrides, f"hydra.run.dir={run_dir}"]),
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_interval": logged["tokens_per_s"],
        "ratio_to_bare_forward": tokens_per_s / ceiling["tokens_per_s"],
        "flops_per_token": logged["flops_per_token"],
        "mfu": mean(logged["mfu"]),
        "mfu_vs_ceiling": logged["flops_per_token"] * tokens_per_s / ceiling["achieved_flops"],
        "peak_memory_gb": logged["peak_memory_gb"],
        "memory_before_gb": resident_gb,
        "final_loss": logged["final_loss"],
        "wall_s": wall,
        "ceiling_same_run": ceiling,
    }


def measure_ceiling_of(plan: dict) -> tuple[dict, dict]:
    """(the ceiling, a description of the target) with the plan's target, which is freed before the recipes run."""
    from hydra.utils import instantiate

    from draftkit.config import compose
    from draftkit.data.collate import collate
    from draftkit.data.sources import synthetic_examples

    start = time.perf_counter()
    target = instantiate(compose(["+recipe=medusa", *plan["target"]]).target)
    sync(target.device)
    init_s = time.perf_counter() - start
    examples = synthetic_examples(plan["micro_batch"], plan["seq_len"], target.vocab_size)
    ceiling = measure_ceiling(target, collate(list(examples), pad_token_id=target.tokenizer.pad_token_id), repeats=5)
    ceiling["target_init_s"] = init_s
    described = {"name": target.name, "parameters": sum(p.numel() for p in target.model.parameters()),
                 "dtype": str(next(target.model.parameters()).dtype), "vocab_size": target.vocab_size}
    del target
    free_memory()
    return ceiling, described


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the result JSON (rewritten after every recipe)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/draftkit_throughput"),
                        help="scratch folder for the run directories; each is removed once measured")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"subset of {','.join(RECIPES)}")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shape on the CPU: checks the code path")
    parser.add_argument("--stop-after-s", type=float, default=420.0,
                        help="start no recipe after this many seconds (a rerun with the same --out finishes the rest)")
    args = parser.parse_args()
    chosen = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = sorted(set(chosen) - set(RECIPES))
    if unknown:
        raise SystemExit(f"unknown recipes {unknown}; choose from {list(RECIPES)}")
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures a GPU; add --cpu-smoke to check the code path here")
    plan = CPU_PLAN if args.cpu_smoke else GPU_PLAN
    record = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if record and record.get("plan") != plan:
        raise SystemExit(f"{args.out} holds results of another plan ({record.get('plan')}); use a new --out")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run_start = time.perf_counter()

    ceiling, target = measure_ceiling_of(plan)
    record.update({
        "benchmark": "training tokens/s, MFU and peak memory per frozen-target recipe on a Llama-3.1-8B-shaped random "
                     "target, vs the bare bf16 forward of the same target body at the same batch shape",
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "plan": plan,
        "target": target,
        "peak_flops": {"value": H200_DENSE_BF16_TFLOPS * 1e12, "source": "H200 SXM datasheet, dense bf16 (1979/2)"},
        "mfu_definition": "model FLOPs per token (the loop's engine.count_flops: its first training micro-step under "
                          "torch.utils.flop_counter: target forward, draft forward+backward, LM-head forward and "
                          "input-gradient backward of every head, teacher logits; attention as the full TxT square) x "
                          "tokens/s / peak_flops; mfu_vs_ceiling divides by the FLOP/s of the bare target forward "
                          "measured in the same run",
        "notes": "each recipe through draftkit.train.run_recipe (the CLI's entry point) with data "
                 "synthetic:<count>x<seq_len>:<ids>: random ids, fixed length, every position a label, no padding; "
                 "bf16 autocast, fp32 master weights, AdamW; tokens/s, MFU, FLOPs per token and peak memory from the "
                 "run's metrics.jsonl with the first log interval dropped; peak memory includes the target's "
                 "weights. CPU smoke numbers are not results.",
        "last_ceiling": ceiling,
    })
    results = record.setdefault("recipes", {})
    failed = record.setdefault("failed_last_run", {})
    failed.clear()
    for name in chosen:
        if name in results:
            print(f"[throughput] {name}: kept from an earlier run", flush=True)
            continue
        if time.perf_counter() - run_start > args.stop_after_s:
            print(f"[throughput] {name}: not started, {args.stop_after_s:.0f} s are up; rerun with the same --out to "
                  "measure what is missing", flush=True)
            failed[name] = "not started (time limit)"
            continue
        try:
            results[name] = run_row(name, plan, target["vocab_size"], args.work, ceiling)
        except Exception as err:  # one broken recipe must not cost the others their measurement; a rerun retries it
            traceback.print_exc()
            failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        free_memory()  # outside the except block, whose traceback still held the recipe's tensors
        if name in failed:
            print(f"[throughput] {name}: failed: {failed[name]}", flush=True)
            continue
        r = results[name]
        print(f"[throughput] {name}: {r['tokens_per_s']:,.0f} tok/s ({r['ratio_to_bare_forward']:.0%} of the bare "
              f"forward), MFU {r['mfu']:.1%}, peak {r['peak_memory_gb'] or 0:.1f} GiB", flush=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"[throughput] bare forward {ceiling['tokens_per_s']:,.0f} tok/s "
          f"({ceiling['achieved_flops'] / 1e12:.0f} TFLOP/s); wall {time.perf_counter() - run_start:.0f} s -> {args.out}")
    if failed:
        raise SystemExit(f"[throughput] failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
