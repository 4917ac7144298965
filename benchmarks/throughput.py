"""Training throughput of every frozen-target recipe on a Llama-3.1-8B-shaped target with random weights, next to the
ceiling: the bare bf16 forward of the same target body at the same batch shape, measured in the same run.

    python benchmarks/throughput.py --out benchmarks/results/throughput_llama8b_shape_h200_$(date +%F).json
    python benchmarks/throughput.py --cpu-smoke --out /tmp/throughput_smoke.json     # tiny shape, CPU, ~1 minute

Each recipe trains through its own step function (recipes/<name>.py) and the one loop (engine.loop.train) on a fixed
synthetic dataset: random token ids, every sequence `--seq-len` long, every position a label (no padding), bf16
autocast, `--micro-batch` sequences per step. Tokens/s is what the loop logs (`<stage>/tokens_per_s`: input tokens per
second over a log interval); the first interval (warm-up) is dropped. Peak memory is torch.cuda.max_memory_allocated
over the recipe's run (the target's weights included). Results are written to --out as each recipe finishes; a rerun
with the same --out measures only what is missing (the ceiling is measured again in every run, and each recipe keeps
the ceiling of its own run). A recipe that fails is recorded under failed_last_run and the others still run; none
starts after --stop-after-s (default 420 s), which keeps one call inside an 8-minute GPU slot.

MFU. Model FLOPs of one training step are counted by running the step once under torch.utils.flop_counter (matmuls and
attention kernels, forward and backward, as executed): the target's forward (2·N_body per token plus attention), the
draft's forward and backward (≈ 6·N_draft per token plus its attention), and the LM-head work of the heads (per head:
forward 2·V·H per scored position plus the input-gradient backward 2·V·H through the frozen head; the teacher's logits,
for Hydra++ and Clover-2, 2·V·H per position some head scores, once for all heads; V is the draft vocabulary where there
is one). Attention is counted as the full T x T square (the PaLM/Megatron convention; a causal kernel does about half of
it). Nothing is recomputed in these steps, so executed FLOPs are the model FLOPs. MFU = FLOPs per token x tokens/s /
peak, with peak = the H200's dense bf16 datasheet figure, 989 TFLOP/s; `vs_ceiling` divides by the FLOP/s the bare
forward achieved in the same run instead.
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
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from bench_common import machine  # benchmarks/ is the script's folder, hence on sys.path

H200_DENSE_BF16_FLOPS = 989e12  # NVIDIA H200 SXM datasheet: 1,979 TFLOP/s bf16 "with sparsity", half of it dense
RECIPES = {
    # name: (recipe config, overrides); the plain full-logits path last, as the one most likely to run out of memory
    "medusa": ("medusa", []),
    "hydra_heads": ("hydra_heads", []),
    "hydra_plus_plus": ("hydra_heads", ["hydra_heads.teacher_weight=1", "hydra_heads.lm_weight=0",
                                        "hydra_heads.heads.prefix_layer=true", "hydra_heads.heads.num_layers=4"]),
    "clover": ("clover", []),
    "fspad_online": ("fspad", ["fspad.features.source=online"]),
    "fspad_offline_bf16": ("fspad", ["fspad.features.source=offline", "fspad.features.storage=bf16"]),
    "kangaroo": ("kangaroo", []),
    # A 32k-token draft vocabulary (drafts/vocab.py): the LM-head work of every head falls to a quarter.
    "medusa_draft_vocab": ("medusa", ["medusa.draft_vocab_size=32768"]),
    "hydra_draft_vocab": ("hydra_heads", ["hydra_heads.draft_vocab_size=32768"]),
    "hydra_plus_plus_draft_vocab": ("hydra_heads", ["hydra_heads.teacher_weight=1", "hydra_heads.lm_weight=0",
                                                    "hydra_heads.heads.prefix_layer=true",
                                                    "hydra_heads.heads.num_layers=4",
                                                    "hydra_heads.draft_vocab_size=32768"]),
    "clover_draft_vocab": ("clover", ["clover.draft_vocab_size=32768"]),
    "fspad_online_draft_vocab": ("fspad", ["fspad.features.source=online", "fspad.draft_vocab_size=32768"]),
    "medusa_unchunked": ("medusa", ["medusa.loss_chunk_size=null"]),
}
GPU_PLAN = {"target": ["target=random", "target.shape=llama3_8b"], "seq_len": 2048, "micro_batch": 8,
            "log_every": 3, "intervals": 3, "precision": "bf16"}
CPU_PLAN = {"target": ["target=random", "target.shape=tiny", "target.dtype=float32", "target.device=cpu",
                       "+target.vocab_size=4096", "+target.num_layers=3", "+target.hidden_size=64",
                       "+target.intermediate_size=128"],
            "seq_len": 64, "micro_batch": 2, "log_every": 2, "intervals": 2, "precision": "fp32"}


def _as_many_heads_as(query_shape, shape):
    """Grouped-query attention hands SDPA keys and values with fewer heads than the query (enable_gqa); each query
    head still does the full work, so count them as if keys and values had the query's head count."""
    return (*shape[:-3], query_shape[-3], *shape[-2:])


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, _as_many_heads_as(query_shape, key_shape),
                           _as_many_heads_as(query_shape, value_shape))


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                         **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, _as_many_heads_as(query_shape, key_shape),
                                    _as_many_heads_as(query_shape, value_shape))


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, with the SDPA kernels counted for grouped-query attention (torch's own count asserts
    that keys have the query's head count) and the CPU flash-attention kernels it does not know added (so CPU counts
    include attention exactly as GPU counts do)."""
    mapping = {}
    for kernel in ("flash", "efficient", "cudnn", "flash_attention_for_cpu"):
        name = f"_scaled_dot_product_{kernel}" if kernel.endswith("cpu") else f"_scaled_dot_product_{kernel}_attention"
        for op_name, fn in ((name, _sdpa_flops), (f"{name}_backward", _sdpa_backward_flops)):
            if hasattr(torch.ops.aten, op_name):
                mapping[getattr(torch.ops.aten, op_name)] = fn
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(fn) -> int:
    """FLOPs (matmuls and attention, forward and backward) that calling fn() executes."""
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def utilization(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    return flops_per_token * tokens_per_s / peak_flops


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


def synthetic_examples(count: int, seq_len: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """Random ids below vocab_size, every position a label."""
    ids = torch.randint(0, vocab_size, (count, seq_len), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row} for row in ids.tolist()]  # lists, as tokenized datasets hold them


def autocast_for(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ceiling(target, batch: dict, repeats: int) -> dict:
    """The bare forward of the target body, called as the recipes call it (Target.features without logits)."""
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


def draft_vocab_size(cfg, recipe: str, target) -> int | None:
    """The recipe's draft vocabulary size, at most a quarter of the target's (the CPU smoke target has 4096 tokens,
    fewer than the GPU plan's 32768)."""
    size = cfg[recipe].get("draft_vocab_size")
    return None if size is None else min(size, target.vocab_size // 4)


def build(name: str, cfg, target, examples: list[dict], work: Path):
    """(trainable module, step_fn, dataset, collate) exactly as the recipe's run() wires them."""
    from hydra.utils import instantiate

    from draftkit.data.collate import collate
    from draftkit.data.feature_cache import FeatureExamples, build_feature_cache, collate_with_features
    from draftkit.recipes import clover, fspad, hydra_heads, kangaroo, medusa
    from draftkit.drafts.vocab import draft_rows
    from draftkit.recipes.common import draft_token_map

    pad = target.tokenizer.pad_token_id
    plain = partial(collate, pad_token_id=pad)
    recipe = RECIPES[name][0]
    token_map = draft_token_map(examples, draft_vocab_size(cfg, recipe, target), target, work / name)
    lm_head = target.lm_head.weight
    scoring = draft_rows(lm_head, token_map)  # what the recipes' scoring_lm_head gives outside ZeRO-3
    with torch.device(target.device):  # 8B-shaped drafts are built where they train, not on the CPU first
        if recipe == "medusa":
            m = cfg.medusa
            heads = instantiate(m.heads, hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                                lm_head_weight=lm_head, token_map=token_map)
            step = medusa.heads_step(target, scoring if heads.lm_heads is None else None, m.decay, m.loss_chunk_size,
                                     heads.lm_heads, token_map)
            return heads, step, examples, plain
        if recipe == "hydra_heads":
            h = cfg.hydra_heads
            heads = instantiate(h.heads, _partial_=True)(hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                                                         target_config=target.config, lm_head_weight=lm_head,
                                                         token_map=token_map)
            step = hydra_heads.hydra_step(target, scoring if heads.lm_heads is None else None, h.lm_weight,
                                          h.teacher_weight, h.decay, h.loss_chunk_size, heads.lm_heads, token_map)
            return heads, step, examples, plain
        if recipe == "clover":
            c = cfg.clover
            decoder = target.model.get_decoder()
            model = instantiate(c.model, _partial_=True)(hidden_size=target.hidden_size, target_config=target.config,
                                                         init_layer=decoder.layers[-1], final_norm=decoder.norm,
                                                         token_map=token_map)
            return model, clover.clover_step(target, lm_head, c.feature_weight, c.token_weight, c.decay,
                                             c.loss_chunk_size, scoring, token_map), examples, plain
        if recipe == "fspad":
            settings = cfg.fspad
            draft = fspad.build_draft(target, settings, token_map)
            dataset = examples
            if settings.features.source == "offline":
                cache = build_feature_cache(target, examples, work / f"{name}_cache", norm=settings.features.norm,
                                            storage=settings.features.storage, shard_size=len(examples),
                                            batch_size=len(examples) // 4 or 1, pad_token_id=pad, progress=False)
                dataset = FeatureExamples(examples, cache)
            return draft, fspad.make_step(target, settings), dataset, partial(collate_with_features, pad_token_id=pad)
        k = cfg.kangaroo
        adapter = kangaroo.build_adapter(target, k.exit_layer, k.init, cfg.engine.seed)
        return adapter, kangaroo.kangaroo_step(target, k.exit_layer, k.loss_chunk_size), examples, plain


def step_flops(model, step, batch: dict, device: torch.device) -> int:
    """Model FLOPs of one training step (forward and backward of the loss) on `batch`; gradients are dropped after."""
    moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def once():
        with autocast_for(device):
            out = step(model, moved)
        out.loss_sum.backward()

    flops = count_flops(once)
    model.zero_grad(set_to_none=True)
    return flops


def run_recipe(name: str, target, plan: dict, work: Path, ceiling: dict) -> dict:
    from omegaconf import OmegaConf

    from draftkit.config import compose
    from draftkit.engine.log import JsonlSink
    from draftkit.engine.loop import stage_settings, train

    recipe, overrides = RECIPES[name]
    cfg = compose([f"+recipe={recipe}", *plan["target"], "logger=none", "eval=none", *overrides])
    steps = plan["log_every"] * plan["intervals"]
    # With a draft vocabulary the ids come from its size only, so every position still counts, as in the other rows
    # (ids outside it would be skipped by the loss and make the step look cheaper than the recipe's on real text).
    id_range = draft_vocab_size(cfg, recipe, target) or target.vocab_size
    examples = synthetic_examples(steps * plan["micro_batch"], plan["seq_len"], id_range)
    stage_dir = work / name
    shutil.rmtree(stage_dir, ignore_errors=True)
    device = target.device
    resident_gb = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, step, dataset, collate = build(name, cfg, target, examples, work)
    flops = step_flops(model, step, collate([dataset[i] for i in range(plan["micro_batch"])]), device)
    settings = stage_settings(OmegaConf.to_container(cfg.engine, resolve=True), steps=steps,
                              micro_batch_size=plan["micro_batch"], grad_accum=1, precision=plan["precision"],
                              log_every=plan["log_every"], save_every=10**9, warmup_steps=1, max_steps_per_stage=None)
    start = time.perf_counter()
    train(model=model, step_fn=step, dataset=dataset, collate=collate, settings=settings, stage_dir=stage_dir,
          sink=JsonlSink(run_dir=str(stage_dir)), resume=False, desc=name, frozen=[target.model])
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r[f"{name}/tokens_per_s"] for r in rows if f"{name}/tokens_per_s" in r][1:]  # first interval: warm-up
    tokens_per_s = sum(rates) / len(rates)
    flops_per_token = flops / (plan["micro_batch"] * plan["seq_len"])
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model, step, dataset
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    shutil.rmtree(stage_dir, ignore_errors=True)  # checkpoints of multi-GB drafts
    shutil.rmtree(work / f"{name}_cache", ignore_errors=True)
    return {
        "recipe": recipe,
        "overrides": overrides,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_interval": rates,
        "ratio_to_bare_forward": tokens_per_s / ceiling["tokens_per_s"],
        "flops_per_token": flops_per_token,
        "mfu": utilization(flops_per_token, tokens_per_s, H200_DENSE_BF16_FLOPS),
        "mfu_vs_ceiling": utilization(flops_per_token, tokens_per_s, ceiling["achieved_flops"]),
        "peak_memory_gb": peak_gb,
        "memory_before_gb": resident_gb,
        "final_loss": rows[-1].get(f"{name}/loss"),
        "wall_s_incl_checkpoint": wall,
        "ceiling_same_run": ceiling,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the result JSON (rewritten after every recipe)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/draftkit_throughput"),
                        help="scratch folder (feature cache, metrics); emptied per recipe")
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

    from hydra.utils import instantiate

    from draftkit.config import compose

    target_cfg = compose(["+recipe=medusa", *plan["target"]]).target
    start = time.perf_counter()
    target = instantiate(target_cfg)
    sync(target.device)
    init_s = time.perf_counter() - start
    first = synthetic_examples(plan["micro_batch"], plan["seq_len"], target.vocab_size)
    from draftkit.data.collate import collate

    ceiling = measure_ceiling(target, collate(first, pad_token_id=target.tokenizer.pad_token_id), repeats=5)
    ceiling["target_init_s"] = init_s
    record.update({
        "benchmark": "training tokens/s, MFU and peak memory per frozen-target recipe on a Llama-3.1-8B-shaped random "
                     "target, vs the bare bf16 forward of the same target body at the same batch shape",
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "plan": plan,
        "target": {"name": target.name, "parameters": sum(p.numel() for p in target.model.parameters()),
                   "dtype": str(next(target.model.parameters()).dtype)},
        "peak_flops": {"value": H200_DENSE_BF16_FLOPS, "source": "H200 SXM datasheet, dense bf16 (1979/2)"},
        "mfu_definition": "model FLOPs per token (one training step under torch.utils.flop_counter: target forward, "
                          "draft forward+backward, LM-head forward and input-gradient backward of every head, teacher "
                          "logits; attention as the full TxT square) x tokens/s / peak_flops; mfu_vs_ceiling divides "
                          "by the FLOP/s of the bare target forward measured in the same run",
        "notes": "random ids, fixed length, every position a label, no padding; bf16 autocast, fp32 master weights, "
                 "AdamW; tokens/s from the loop's metrics with the first log interval dropped; peak memory includes "
                 "the target's weights. CPU smoke numbers are not results.",
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
            results[name] = run_recipe(name, target, plan, args.work, ceiling)
        except Exception as err:  # one broken recipe must not cost the others their measurement; a rerun retries it
            traceback.print_exc()
            failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        if name in failed:
            print(f"[throughput] {name}: failed: {failed[name]}", flush=True)
            gc.collect()  # outside the except block, whose traceback still held the recipe's tensors
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
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
