"""`python -m draftkit.eval` / `draftkit-eval`: measure a trained draft's acceptance and speedup against its target.

Example:
    python -m draftkit.eval --draft runs/fastdraft/final --prompts spec_bench.jsonl --limit-per-category 5
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

import torch

from draftkit.drafts.vocab import draft_rows
from draftkit.io import write_text_atomic
from draftkit.runtime.evaluate import evaluate_draft, load_prompts, render_markdown
from draftkit.targets.hf import BUILTIN_SMOLLM2, freeze, load_target

BUILTIN_PROMPTS = ("data", "builtin", "eval_prompts.jsonl")


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
    parser.add_argument("--tree", default="static", choices=["chain", "static", "topk"],
                        help="draft heads: chain (top-1 per head), static tree or per-step top-k tree")
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


def hf_draft(args: argparse.Namespace, target):
    from transformers import AutoModelForCausalLM

    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=getattr(torch, args.dtype))
    draft = freeze(draft.to(target.device))
    draft_vocab = draft.config.get_text_config().vocab_size
    if draft_vocab != target.vocab_size:
        raise SystemExit(
            f"draftkit-eval: draft {args.draft} has vocab_size={draft_vocab} but target {args.target} has "
            f"{target.vocab_size}. Fix: pass the --target this draft was trained for, or train a draft on this target "
            "(drafts must share the target's padded vocabulary)"
        )
    return draft


def feature_drafter(args: argparse.Namespace, target):
    from draftkit.export.eagle import load_feature_drafter
    from draftkit.runtime.feature_drafter import FeatureChainDrafter

    try:
        module, info = load_feature_drafter(args.draft, embed_weight=target.embed_tokens.weight,
                                            lm_head_weight=target.lm_head.weight,
                                            head_norm_weight=target.model.get_decoder().norm.weight)
    except ValueError as error:  # wrong target or a tampered folder: one line, no traceback
        raise SystemExit(f"draftkit-eval: {error}") from None
    if module.vocab_size != target.vocab_size:
        raise SystemExit(f"draftkit-eval: draft {args.draft} has vocab_size={module.vocab_size} but target "
                         f"{args.target} has {target.vocab_size}. Fix: pass the --target this draft was trained for")
    return FeatureChainDrafter(module.to(getattr(torch, args.dtype)), info["target_feature"]["norm"], args.draft)


def kangaroo_decoder(args: argparse.Namespace, target):
    from draftkit.export.kangaroo import load_kangaroo
    from draftkit.runtime.kangaroo import KangarooDecoder

    adapter, settings = load_kangaroo(args.draft, target_shape=(target.num_layers, target.vocab_size))
    return KangarooDecoder(target, adapter.to(target.device), settings["exit_layer"], settings["threshold"])


def specdecpp_drafter(args: argparse.Namespace, target):
    """The export's draft with its acceptance head (adaptive stop), or alone (--no-head: the static policy's gamma)."""
    from draftkit.export.artifact import ArtifactError, read_json
    from draftkit.export.specdecpp import load_acceptance_head
    from draftkit.runtime.specdecpp import SpecDecDrafter

    root = Path(args.draft)
    draft = hf_draft(args, target)
    if args.no_head:
        return draft
    try:
        head, head_info = load_acceptance_head(root / read_json(root / "draftkit.json")["head"], draft)
    except ArtifactError as error:  # a head for another draft, or a tampered folder: one line, no traceback
        raise SystemExit(f"draftkit-eval: {error}") from None
    threshold = args.stop_threshold if args.stop_threshold is not None else head_info["threshold"]
    return SpecDecDrafter(draft, head.to(target.device), threshold=threshold, min_tokens=head_info["min_tokens"],
                          score_first_token=head_info.get("score_first_token", False))


def recorded_gamma(args: argparse.Namespace) -> int:
    """The draft length when --gamma is not given: what a SpecDec++ export records (the head's most draft tokens, or
    with --no-head the static policy's gamma), otherwise 5."""
    if artifact_family(args.draft) != "specdecpp":
        return 5
    root = Path(args.draft)
    info = json.loads((root / "draftkit.json").read_text())
    if args.no_head:
        return json.loads((root / info["stop_policy"]).read_text())["num_speculative_tokens"]
    return json.loads((root / info["head"] / "draftkit.json").read_text())["max_draft_tokens"]


def artifact_family(draft_dir) -> str | None:
    """The "family" in a draftkit export's draftkit.json (None for a plain HF draft LM)."""
    info = Path(draft_dir) / "draftkit.json"
    return json.loads(info.read_text()).get("family") if info.is_file() else None


def medusa_drafter(args: argparse.Namespace, target):
    from draftkit.export.artifact import ArtifactError, check_matches_target
    from draftkit.export.medusa import load_medusa
    from draftkit.runtime.heads import MedusaDrafter

    try:
        artifact = load_medusa(args.draft, vocab_size=target.vocab_size)
        check_matches_target(artifact.info, hidden_size=artifact.heads.hidden_size,
                             vocab_size=artifact.heads.vocab_size, target_name=args.target,
                             target_hidden_size=target.hidden_size, target_vocab_size=target.vocab_size, where=args.draft)
    except ArtifactError as error:
        raise SystemExit(f"draftkit-eval: {error}") from None
    lora = artifact.info.get("target_lora")
    if lora:  # Medusa-2 heads read the states of the target they were trained with
        from peft import PeftModel

        target.model = freeze(PeftModel.from_pretrained(target.model, str(Path(args.draft) / lora)).merge_and_unload())
    heads = artifact.heads.to(device=target.device, dtype=getattr(torch, args.dtype))
    # A stored copy of the target's LM head (vLLM original_lm_head) may be bf16-rounded: use the target's own (the
    # rows of the heads' draft vocabulary, when they have one).
    shared = draft_rows(target.lm_head.weight, heads.token_map) if heads.lm_heads is None else None
    return MedusaDrafter(heads, _heads_shape(args, heads.num_heads), shared_lm_head=shared)


def _heads_shape(args: argparse.Namespace, num_heads: int):
    from draftkit.runtime.tree import tree_shape

    return tree_shape(args.tree, num_heads, top_k=args.tree_top_k, width=args.tree_width, budget=args.tree_budget)


def _load_heads_artifact(args: argparse.Namespace, target, family: str, build, **call_site):
    from draftkit.export.artifact import ArtifactError, check_matches_target, read_json
    from draftkit.export.heads_dir import load_heads_dir

    try:
        info = read_json(Path(args.draft) / "draftkit.json")
        check_matches_target(info, hidden_size=info["hidden_size"], vocab_size=info["vocab_size"],
                             target_name=args.target, target_hidden_size=target.hidden_size,
                             target_vocab_size=target.vocab_size, where=args.draft)
        module, _ = load_heads_dir(args.draft, build, family=family, hidden_size=info["hidden_size"],
                                   target_config=target.config, **call_site)
    except ArtifactError as error:
        raise SystemExit(f"draftkit-eval: {error}") from None
    return module.to(device=target.device, dtype=getattr(torch, args.dtype))


def hydra_drafter(args: argparse.Namespace, target):
    from draftkit.drafts.hydra_heads import hydra_heads
    from draftkit.runtime.heads import HydraDrafter

    heads = _load_heads_artifact(args, target, "hydra_heads", hydra_heads, vocab_size=target.vocab_size,
                                 lm_head_weight=target.lm_head.weight)
    shared = draft_rows(target.lm_head.weight, heads.token_map) if heads.lm_heads is None else None
    return HydraDrafter(heads, target.embed_tokens, _heads_shape(args, heads.num_heads), shared_lm_head=shared)


def clover_drafter(args: argparse.Namespace, target):
    from draftkit.drafts.clover import clover2
    from draftkit.runtime.heads import CloverDrafter

    model = _load_heads_artifact(args, target, "clover", clover2)
    lm_head = target.lm_head.weight
    return CloverDrafter(model, lm_head, draft_rows(lm_head, model.token_map), _heads_shape(args, model.num_heads))


def load_draft(args: argparse.Namespace, target) -> tuple[object, dict]:
    """The drafter for the artifact in args.draft, whatever its family, and the extra evaluate_draft arguments it needs
    (a self-drafting family brings its own verifier)."""
    family = artifact_family(args.draft)
    if family == "kangaroo":  # self-drafting: drafts and verifies over the target's own layers
        decoder = kangaroo_decoder(args, target)
        return decoder, {"verifier": decoder}
    loaders = {
        "medusa": medusa_drafter,  # draft heads: tree or chain decoding (draftkit.export.medusa)
        "hydra_heads": hydra_drafter,  # draftkit's heads format (draftkit.export.heads_dir)
        "clover": clover_drafter,  # draftkit's heads format (draftkit.export.heads_dir)
        "fspad": feature_drafter,  # feature drafter (EAGLE-1 / FSPAD) in any of its export formats
        "specdecpp": specdecpp_drafter,  # a draft LM with its acceptance head (draftkit.export.specdecpp)
    }
    return loaders.get(family, hf_draft)(args, target), {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts_path = args.prompts or builtin_prompts()
    if prompts_path is None:
        raise SystemExit("draftkit-eval: no bundled prompt set in this install; pass --prompts FILE.jsonl")
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    prompts = load_prompts(prompts_path, limit_per_category=args.limit_per_category, categories=categories)

    target = load_target(args.target, dtype=args.dtype, device=args.device)
    draft, evaluate_args = load_draft(args, target)
    gamma = args.gamma if args.gamma is not None else recorded_gamma(args)

    report = evaluate_draft(
        target, draft, prompts,
        gamma=gamma, temperature=args.temperature, acceptance=args.acceptance, max_new_tokens=args.max_new_tokens,
        measure_speedup=not args.no_speedup, seed=args.seed, progress=not args.no_progress, profile=args.profile,
        **evaluate_args,
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
