"""`python -m draftkit.eval` / `draftkit-eval`: measure a trained draft's acceptance and speedup against its target.

Example:
    python -m draftkit.eval --draft runs/fastdraft/final --prompts spec_bench.jsonl --limit-per-category 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from importlib import resources
from pathlib import Path

import torch

from draftkit.runtime.evaluate import evaluate_draft, load_prompts, render_markdown
from draftkit.targets.hf import BUILTIN_SMOLLM2, freeze, load_target

BUILTIN_PROMPTS = ("data", "builtin", "eval_prompts.jsonl")


def builtin_prompts() -> Path | None:
    path = resources.files("draftkit").joinpath(*BUILTIN_PROMPTS)
    return Path(str(path)) if path.is_file() else None


def write_atomically(path: Path, text: str) -> None:
    """A reader never sees a half-written report: write a sibling temp file, then rename over the target."""
    fd, staging = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


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
    parser.add_argument("--gamma", type=int, default=5, help="draft tokens per target forward")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 = lossless speculative sampling")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--limit-per-category", type=int, default=None)
    parser.add_argument("--categories", default=None, help="comma-separated subset of the prompt categories")
    parser.add_argument("--dtype", default="float32", help="float32 gives exact greedy equality with AR decoding")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-speedup", action="store_true", help="skip the autoregressive baseline")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="where eval.json and eval.md go (default: the draft dir)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM

    args = parse_args(argv)
    prompts_path = args.prompts or builtin_prompts()
    if prompts_path is None:
        raise SystemExit("draftkit-eval: no bundled prompt set in this install; pass --prompts FILE.jsonl")
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    prompts = load_prompts(prompts_path, limit_per_category=args.limit_per_category, categories=categories)

    target = load_target(args.target, dtype=args.dtype, device=args.device)
    meta = Path(args.draft) / "draftkit.json"
    family = json.loads(meta.read_text()).get("family") if meta.is_file() else None
    evaluate_args = {}
    if family == "kangaroo":  # self-drafting: drafts and verifies over the target's own layers
        from draftkit.export.kangaroo import load_kangaroo
        from draftkit.runtime.kangaroo import KangarooDecoder
        adapter, kangaroo = load_kangaroo(args.draft, target_shape=(target.num_layers, target.vocab_size))
        draft = evaluate_args["verifier"] = KangarooDecoder(
            target, adapter.to(target.device), kangaroo["exit_layer"], kangaroo["threshold"])
    else:
        draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=getattr(torch, args.dtype))
        draft = freeze(draft.to(target.device))
    draft_vocab = target.vocab_size if family == "kangaroo" else draft.config.get_text_config().vocab_size
    if draft_vocab != target.vocab_size:
        raise SystemExit(
            f"draftkit-eval: draft {args.draft} has vocab_size={draft_vocab} but target {args.target} has "
            f"{target.vocab_size}. Fix: pass the --target this draft was trained for, or train a draft on this target "
            "(drafts must share the target's padded vocabulary)"
        )

    report = evaluate_draft(
        target, draft, prompts,
        gamma=args.gamma, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
        measure_speedup=not args.no_speedup, seed=args.seed, progress=not args.no_progress, **evaluate_args,
    )
    report["config"].update(draft=str(args.draft), prompts=str(prompts_path))
    markdown = render_markdown(report)

    out = args.out or Path(args.draft)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "eval.json", json.dumps(report, indent=2) + "\n")
    write_atomically(out / "eval.md", markdown)
    print(markdown)
    print(f"[draftkit] wrote {out / 'eval.json'} and {out / 'eval.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
