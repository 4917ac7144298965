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
from dataclasses import replace
from importlib import resources
from pathlib import Path

import torch

from draftkit.errors import UserError, reported
from draftkit.export.artifact import ArtifactError, artifact_family
from draftkit.io import write_text_atomic
from draftkit.runtime.drafting import TREE_KINDS, Drafting, DraftingOptions
from draftkit.runtime.evaluate import (
    AUTO_MAX_TOTAL_TOKENS,
    evaluate_draft,
    evaluate_dynamic_tree_auto,
    load_prompts,
    render_markdown,
)
from draftkit.runtime.tree import DynamicTree, describe_shape
from draftkit.targets.hf import BUILTIN_SMOLLM2, load_target

BUILTIN_PROMPTS = ("data", "builtin", "eval_prompts.jsonl")
DEFAULT_GAMMA = 5


def builtin_prompts() -> Path | None:
    path = resources.files("draftkit").joinpath(*BUILTIN_PROMPTS)
    return Path(str(path)) if path.is_file() else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="draftkit.eval",
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
                        help="tree drafters: chain (top-1 per depth), static tree, per-step top-k tree, or dynamic "
                             "(EAGLE-2's tree, grown and pruned by the draft's confidence). Default: the family's own "
                             "way of decoding: a static tree for heads, a dynamic tree for feature drafters "
                             "(FSPAD/EAGLE); chain compares with chain drafting")
    parser.add_argument("--tree-depth", type=int, default=None,
                        help="tree depth (default: heads one level per head; feature drafters 6 for dynamic, else 5)")
    parser.add_argument("--tree-top-k", default=None,
                        help="children per expanded node (default 4; dynamic 10). With --tree-budget auto, a "
                             "comma-separated list: each top-k is calibrated and the predictor picks among them")
    parser.add_argument("--tree-width", type=int, default=4, help="topk trees: nodes expanded per depth")
    parser.add_argument("--tree-budget", default=None,
                        help="topk: nodes kept (default 16); dynamic: drafted tokens verified per step (default 59, "
                             "EAGLE-2's total_token=60 with the root), or auto: the predictor chooses depth and "
                             "total tokens from a greedy calibration run of the largest tree and the tree it picks is "
                             "then measured (the choice is recorded in eval.json)")
    parser.add_argument("--tree-budget-max", type=int, default=AUTO_MAX_TOTAL_TOKENS,
                        help="--tree-budget auto: total tokens of the calibration tree, the largest the predictor "
                             f"can choose (default {AUTO_MAX_TOTAL_TOKENS})")
    parser.add_argument("--acceptance", default="greedy", choices=["greedy", "sampling", "typical"],
                        help="tree verification: greedy (lossless; at temperature > 0 it means sampling), sampling "
                             "(lossless speculative sampling over the tree), typical (Medusa's, lossy at temperature > 0)")
    parser.add_argument("--no-head", action="store_true",
                        help="SpecDec++ exports: draft a fixed chain of the static policy's gamma, without the head")
    parser.add_argument("--stop-threshold", type=float, default=None,
                        help="SpecDec++ exports: the head's stop threshold (default: the recorded one)")
    return parser.parse_args(argv)


def _integer(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a number. Fix: give a whole number >= 1") from None
    if value < 1:
        raise UserError(f"{flag} {value}: must be at least 1. Fix: leave it out for the default, or give a positive "
                        "number")
    return value


def auto_budget(args: argparse.Namespace) -> bool:
    """Whether the predictor chooses the tree (--tree-budget auto); refuses combinations it cannot serve."""
    if args.tree_budget != "auto":
        if args.tree_top_k is not None and "," in args.tree_top_k:
            raise UserError("a list of --tree-top-k values needs --tree-budget auto (which calibrates each). Fix: give "
                            "one number, or add --tree-budget auto")
        return False
    if args.temperature != 0.0:
        raise UserError("--tree-budget auto chooses the tree from greedy acceptance. Fix: --temperature 0, or give "
                        "--tree-budget a number")
    if args.no_speedup:
        raise UserError("--tree-budget auto prices trees against the autoregressive baseline. Fix: drop "
                        "--no-speedup, or give --tree-budget a number")
    return True


def drafting_options(args: argparse.Namespace) -> DraftingOptions:
    auto = args.tree_budget == "auto"
    top_ks = [_integer(k, "--tree-top-k") for k in args.tree_top_k.split(",")] if args.tree_top_k else [None]
    budget = (args.tree_budget_max if auto else
              _integer(args.tree_budget, "--tree-budget") if args.tree_budget is not None else None)
    return DraftingOptions(tree=args.tree, tree_depth=args.tree_depth, tree_top_k=max(top_ks, key=lambda k: k or 0),
                           tree_width=args.tree_width, tree_budget=budget, no_head=args.no_head,
                           stop_threshold=args.stop_threshold)


def load_artifact(args: argparse.Namespace, target):
    """The runtime module of the artifact's family and the artifact as `draftkit.export.<family>.load` reads it, both
    found by the family its draftkit.json records."""
    family = artifact_family(args.draft)
    modules = [f"draftkit.{layer}.{family}" for layer in ("export", "runtime")]
    if not family.isidentifier() or any(importlib.util.find_spec(name) is None for name in modules):
        raise ArtifactError(f"{args.draft} holds a {family!r} draft, which this draftkit cannot run. Fix: install the "
                            "draftkit version that exported it")
    exporter, runtime = (importlib.import_module(name) for name in modules)
    return runtime, exporter.load(args.draft, target, dtype=getattr(torch, args.dtype))


def load_draft(args: argparse.Namespace, target) -> Drafting:
    """The drafting for the artifact in args.draft, whatever its family: `draftkit.export.<family>.load` reads it and
    `draftkit.runtime.<family>.drafting` wraps it."""
    runtime, loaded = load_artifact(args, target)
    return _drafting(runtime, loaded, target, drafting_options(args))


def _drafting(runtime, loaded, target, options: DraftingOptions) -> Drafting:
    try:
        return runtime.drafting(loaded.module, target, options, **loaded.settings)
    except UserError:
        raise
    except ValueError as error:  # the --tree options do not fit this draft (more levels than heads, say)
        fix = "" if "Fix:" in str(error) else ". Fix: change the --tree options, or leave them out for the draft's own"
        raise UserError(f"{error}{fix}") from None


def evaluate_auto(args: argparse.Namespace, target, prompts: list[dict]) -> dict:
    """--tree-budget auto: calibrate the largest dynamic tree (per --tree-top-k), let the predictor choose its depth
    and total tokens, measure the choice (runtime.evaluate.evaluate_dynamic_tree_auto)."""
    runtime, loaded = load_artifact(args, target)
    options = drafting_options(args)
    largest = _drafting(runtime, loaded, target, options).drafter
    shape = getattr(largest, "shape", None)
    if not isinstance(shape, DynamicTree):
        raise UserError("--tree-budget auto chooses the size of a dynamic tree, and this draft decodes with "
                        f"{describe_shape(shape)['kind'] if shape is not None else 'a chain'}. Fix: add --tree dynamic, "
                        "or give --tree-budget a number")
    top_ks = [_integer(k, "--tree-top-k") for k in args.tree_top_k.split(",")] if args.tree_top_k else [shape.top_k]

    def make_drafter(tree: DynamicTree):
        return _drafting(runtime, loaded, target, replace(options, tree="dynamic", tree_depth=tree.depth,
                                                          tree_top_k=tree.top_k, tree_budget=tree.total_tokens)).drafter

    return evaluate_dynamic_tree_auto(target, make_drafter, prompts, depth=shape.depth, top_ks=top_ks,
                                      max_total_tokens=args.tree_budget_max, max_new_tokens=args.max_new_tokens,
                                      seed=args.seed, progress=not args.no_progress, profile=args.profile)


def check_args(args: argparse.Namespace) -> None:
    """What can be refused before the target is loaded: numbers out of range, tree options that do not parse, and a
    --draft that is not an export."""
    at_least_one = {"--gamma": args.gamma, "--max-new-tokens": args.max_new_tokens, "--tree-depth": args.tree_depth,
                    "--limit-per-category": args.limit_per_category, "--tree-width": args.tree_width,
                    "--tree-budget-max": args.tree_budget_max}
    for flag, value in at_least_one.items():
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be at least 1. Fix: leave it out for the default, or give a "
                            "positive number")
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature}: must be >= 0. Fix: 0 for greedy decoding, or e.g. 0.7")
    if args.stop_threshold is not None and not 0 <= args.stop_threshold <= 1:
        raise UserError(f"--stop-threshold {args.stop_threshold}: a probability. Fix: a value in [0, 1]")
    if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
        raise UserError(f"--dtype {args.dtype} is not a torch dtype. Fix: float32 (exact greedy equality), bfloat16 "
                        "or float16")
    auto_budget(args)
    drafting_options(args)  # --tree-top-k and --tree-budget parse
    draft = Path(args.draft)
    if not draft.is_dir():
        raise UserError(f"--draft {draft}: {'not a directory' if draft.exists() else 'no such directory'}. Fix: pass "
                        "the export/ directory of a finished run (runs/<recipe>/<date>_<time>/export)")
    holds_draft = (draft / "draftkit.json").is_file() or (draft / "config.json").is_file()
    if not holds_draft and (draft / "config.yaml").is_file():  # a run directory
        if (draft / "export").is_dir():
            raise UserError(f"--draft {draft} is a run directory. Fix: pass its export directory: --draft "
                            f"{draft / 'export'}")
        raise UserError(f"--draft {draft} is a run directory without an export: the run has not finished. Fix: run its "
                        "training command again on it to finish and export, then pass <run>/export")
    if not holds_draft:
        raise UserError(f"--draft {draft} holds no draft (no draftkit.json or config.json). Fix: pass the export/ "
                        "directory of a finished run")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file. Fix: give a directory for eval.json and eval.md")


def _load_target(args: argparse.Namespace):
    local = args.target.startswith(("/", ".", "~")) or args.target.endswith(".gguf") or Path(args.target).exists()
    if local and not Path(args.target).expanduser().exists():
        raise UserError(f"--target {args.target}: no such file or directory. Fix: pass an HF model directory, a .gguf "
                        f"file or a Hub id (default: {BUILTIN_SMOLLM2})")
    try:
        return load_target(args.target, dtype=args.dtype, device=args.device)
    except OSError as error:  # transformers reports a missing model or file, or no network, as OSError
        raise UserError(f"--target {args.target} cannot be loaded ({str(error).strip().splitlines()[0]}). Fix: pass "
                        "a local HF model directory or .gguf file, or a Hub id while online") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with reported("eval"):
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    check_args(args)
    prompts_path = args.prompts or builtin_prompts()
    if prompts_path is None:
        raise UserError("no bundled prompt set in this install. Fix: pass --prompts FILE.jsonl")
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    prompts = load_prompts(prompts_path, limit_per_category=args.limit_per_category, categories=categories)

    auto = auto_budget(args)
    target = _load_target(args)
    if auto:
        report = evaluate_auto(args, target, prompts)
    else:
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
