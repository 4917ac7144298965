"""`python -m draftkit.convert`: turn a checkpoint of a method's official trainer into a draftkit artifact.

    python -m draftkit.convert eagle1 <EAGLE-1 folder> --out drafts/eagle1 [--config eagle_config.json]
    python -m draftkit.convert medusa <FasterDecoding Medusa folder> --out drafts/medusa
    python -m draftkit.convert hydra  <Hydra folder> --out drafts/hydra
    python -m draftkit.eval --draft drafts/medusa

Sources: eagle1, SafeAILab/EAGLE's EAGLE-1 (a release's pytorch_model.bin + config.json, or the state_<n> folder
eagle/train/main.py saves, with --config its --configpath); medusa, FasterDecoding/Medusa (medusa_lm_head.pt or
.safetensors + config.json, or a full Medusa model folder); hydra, zankner/Hydra (hydra_lm_head.pt + config.json,
grounded MLP heads). Each conversion lives in its family's export module (draftkit.export.fspad, .medusa,
.hydra_heads); this module only picks one. The converted artifact is checked against --target: a checkpoint trained on
another model is refused, and so is a variant draftkit cannot represent exactly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from draftkit.export.artifact import ArtifactError
from draftkit.targets.hf import BUILTIN_SMOLLM2

SOURCES = {
    "eagle1": "SafeAILab/EAGLE EAGLE-1 (pytorch_model.bin or a main.py state folder, with its config.json)",
    "medusa": "FasterDecoding/Medusa heads (medusa_lm_head.pt/.safetensors + config.json, or a full Medusa model)",
    "hydra": "zankner/Hydra heads (hydra_lm_head.pt + config.json; grounded MLP heads)",
}


class ConvertError(Exception):
    """A bad input, reported as one line `draftkit.convert: <what>. Fix: <how>`."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m draftkit.convert", description=__doc__.split("\n\n")[0],
                                     epilog="\n".join(f"{k}: {v}" for k, v in SOURCES.items()),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=list(SOURCES), help="which trainer wrote the checkpoint")
    parser.add_argument("source", type=Path, help="the checkpoint folder (eagle1 also takes the weights file)")
    parser.add_argument("--out", type=Path, required=True,
                        help="the draftkit artifact folder to write (replaced atomically if it exists)")
    parser.add_argument("--target", default=BUILTIN_SMOLLM2,
                        help=f"the model the checkpoint was trained on: {BUILTIN_SMOLLM2} (default), an HF "
                             "directory, a Hub id or a .gguf file; sizes and stored target tensors are checked "
                             "against it")
    parser.add_argument("--config", type=Path, default=None,
                        help="eagle1 only: the draft's config.json when it is not next to the weights (main.py's "
                             "--configpath)")
    return parser.parse_args(argv)


def convert(args: argparse.Namespace) -> Path:
    from draftkit.targets.hf import load_target

    if not args.source.exists():
        raise ConvertError(f"{args.source} does not exist. Fix: pass the folder the {args.kind} trainer wrote")
    if args.config is not None and args.kind != "eagle1":
        raise ConvertError(f"--config applies to eagle1 checkpoints only. Fix: drop it; {args.kind} folders carry "
                           "their config.json")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # stderr carries the one-line error, not a loading bar
    try:
        target = load_target(args.target, dtype="float32", device="cpu")
    except (OSError, ValueError) as error:
        raise ConvertError(f"cannot load target {args.target} ({error}). Fix: pass --target <the model the "
                           "checkpoint was trained on>") from None
    try:
        if args.kind == "eagle1":
            from draftkit.export.fspad import import_eagle1

            return import_eagle1(args.source, args.out, target, config_path=args.config)["draftkit"]
        if args.kind == "medusa":
            from draftkit.export.medusa import import_fasterdecoding

            return import_fasterdecoding(args.source, args.out, target)
        from draftkit.export.hydra_heads import import_hydra

        return import_hydra(args.source, args.out, target)
    except ArtifactError as error:
        raise ConvertError(str(error)) from None
    except (KeyError, ValueError) as error:  # a config without a field the trainer always writes, say
        raise ConvertError(f"{args.source}: not a {args.kind} checkpoint this converter understands ({error!r}). "
                           f"Fix: pass a folder written by {SOURCES[args.kind].split(' (')[0]}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = convert(args)
    except ConvertError as error:
        print(f"draftkit.convert: {error}", file=sys.stderr)
        return 2
    print(f"[draftkit] converted {args.kind} checkpoint {args.source} -> {out}; evaluate it with "
          f"python -m draftkit.eval --draft {out} --target {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
