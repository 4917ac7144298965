"""`python -m draftkit.eval` / `draftkit-eval`: measure a trained draft's acceptance and speedup against its target.

Example:
    python -m draftkit.eval --draft runs/fastdraft/final --prompts spec_bench.jsonl --limit-per-category 5
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from importlib import resources
from pathlib import Path

import torch

from draftkit.export.artifact import ArtifactError, artifact_family
from draftkit.io import write_text_atomic
from draftkit.runtime.drafting import TREE_KINDS, Drafting, DraftingOptions
from draftkit.runtime.evaluate import evaluate_draft, load_prompts, render_markdown
from draftkit.targets.hf import BUILTIN_SMOLLM2, load_target

BUILTIN_PROMPTS = ("data", "builtin", "eval_prompts.jsonl")
DEFAULT_GAMMA = 5


def builtin_prompts() -> Path | None:
    path = resources.files("draftkit").joinpath(*BUILTIN_PROMPTS)
    return Path(str(path)) if path.is_file() else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="draftkit-eval",
        description="Speculative decoding of a target with a trained draft: tau, alpha per position, speedup vs AR.",
    )
    parser.add_argument("--draft", required=True, help="draft model directory (save_pretrained output)")
    parser.add_argument(
        "--target", default=BUILTIN_SMOLLM2, help=f"{BUILTIN_SMOLLM2}, an HF directory, a Hub id or a .gguf file"
    )
    parser.add_argument(
        "--prompts", type=Path, default=None,
        help="Spec-Bench style jsonl (question_id, category, turns); defaults to the prompts bundled with draftkit",
    )
    parser.add_argument("--gamma", type=int, default=None,
                        help="draft tokens per target forward (default 5; draft LMs; heads draft one tree level per "
                             "head; SpecDec++ exports: the most tokens per step, default the recorded one)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 = lossless speculative sampling")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--limit-per-category", type=int, default=None)
    parser.add_argument("--categories", default=None, help="comma-separated subset of the prompt categories")
    parser.add_argument("--dtype", default="float32", help="float32 gives exact greedy equality with AR decoding")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-speedup", action="store_true", help="skip the autoregressive baseline")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="time drafting and verification apart and report the predicted speedup and recommended "
                             "gamma next to the measured one (one extra device sync per step)")
    parser.add_argument("--out", type=Path, default=None, help="where eval.json and eval.md go (default: the draft dir)")
    parser.add_argument("--tree", default=None, choices=list(TREE_KINDS),
                        help="tree drafters: chain (top-1 per depth), static tree or per-step top-k tree (default: the "
                             "family's own: a static tree for heads, a chain for feature drafters)")
    parser.add_argument("--tree-top-k", type=int, default=4)
    parser.add_argument("--tree-width", type=int, default=4)
    parser.add_argument("--tree-budget", type=int, default=16)
    parser.add_argument("--acceptance", default="greedy", choices=["greedy", "sampling", "typical"],
                        help="tree verification: greedy (lossless; at temperature > 0 it means sampling), sampling "
                             "(lossless speculative sampling over the tree), typical (Medusa's, lossy at temperature > 0)")
    parser.add_argument("--no-head", action="store_true",
                        help="SpecDec++ exports: draft a fixed chain of the static policy's gamma, without the head")
    parser.add_argument("--stop-threshold", type=float, default=None,
                        help="SpecDec++ exports: the head's stop threshold (default: the recorded one)")
    return parser.parse_args(argv)


def drafting_options(args: argparse.Namespace) -> DraftingOptions:
    return DraftingOptions(tree=args.tree, tree_top_k=args.tree_top_k, tree_width=args.tree_width,
                           tree_budget=args.tree_budget, no_head=args.no_head, stop_threshold=args.stop_threshold)


def load_draft(args: argparse.Namespace, target) -> Drafting:
    """The drafting for the artifact in args.draft, whatever its family: `draftkit.export.<family>.load` reads it and
    `draftkit.runtime.<family>.drafting` wraps it, both found by the family its draftkit.json records."""
    family = artifact_family(args.draft)
    modules = [f"draftkit.{layer}.{family}" for layer in ("export", "runtime")]
    if not family.isidentifier() or any(importlib.util.find_spec(name) is None for name in modules):
        raise SystemExit(f"draftkit-eval: {args.draft} holds a {family!r} draft, which this draftkit cannot run. Fix: "
                         "install the draftkit version that exported it")
    exporter, runtime = (importlib.import_module(name) for name in modules)
    try:
        loaded = exporter.load(args.draft, target, dtype=getattr(torch, args.dtype))
        return runtime.drafting(loaded.module, target, drafting_options(args), **loaded.settings)
    except ArtifactError as error:  # wrong target or a tampered folder: one line, no traceback
        raise SystemExit(f"draftkit-eval: {error}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts_path = args.prompts or builtin_prompts()
    if prompts_path is None:
        raise SystemExit("draftkit-eval: no bundled prompt set in this install; pass --prompts FILE.jsonl")
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    prompts = load_prompts(prompts_path, limit_per_category=args.limit_per_category, categories=categories)

    target = load_target(args.target, dtype=args.dtype, device=args.device)
    drafting = load_draft(args, target)
    gamma = next(g for g in (args.gamma, drafting.gamma, DEFAULT_GAMMA) if g is not None)

    report = evaluate_draft(
        target, drafting.drafter, prompts,
        gamma=gamma, temperature=args.temperature, acceptance=args.acceptance, max_new_tokens=args.max_new_tokens,
        measure_speedup=not args.no_speedup, seed=args.seed, progress=not args.no_progress, profile=args.profile,
        **drafting.evaluate_args(),
    )
    report["config"].update(draft=str(args.draft), prompts=str(prompts_path))
    markdown = render_markdown(report)

    out = args.out or Path(args.draft)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "eval.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "eval.md", markdown)
    print(markdown)
    print(f"[draftkit] wrote {out / 'eval.json'} and {out / 'eval.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
