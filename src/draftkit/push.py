"""`python -m draftkit.push <run or export folder> <user>/<name>`: check an exported draft and upload it, model card
included, to the Hugging Face Hub.

The folder is a finished run directory (its `export/` is used) or an export folder. When a run exported several
formats (Medusa's `vllm` and `fasterdecoding`, FSPAD's `draftkit`, `eagle-vllm` and `eagle-sglang`), each goes to its
own repository: pick one with --format. Without a repo id it only checks: it lists each export with its tensors read
and matched against their manifest or config. Nothing is sent until the artifact, its model card, its tensors and the
repo id pass the local checks; --dry-run stops after them. The token comes from --token, $HF_TOKEN or
`huggingface-cli login`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from draftkit.errors import reported
from draftkit.export.hub import (check_card, check_repo_id, check_tensors, find_artifact, find_artifacts, push_to_hub,
                                 uploaded_config)


def parser(prog: str = "python -m draftkit.push") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="a finished run directory (its export/ is uploaded) or an export folder")
    p.add_argument("repo_id", nargs="?", default=None,
                   help="the Hub repository, <user or org>/<name>; created when missing (omit it to check and list "
                        "what the folder holds)")
    p.add_argument("--format", dest="fmt", default=None,
                   help="which export to upload when the folder holds several (e.g. vllm, eagle-vllm); listed when "
                        "omitted and needed")
    p.add_argument("--private", action="store_true", help="create the repository as private (an existing one keeps "
                                                          "its visibility)")
    p.add_argument("--token", default=None, help="Hub token with write access (default: $HF_TOKEN, then the token "
                                                 "saved by `huggingface-cli login`)")
    p.add_argument("--revision", default=None, help="branch to push to (default: main)")
    p.add_argument("--commit-message", default=None, help="commit message (default: names the uploaded folder)")
    p.add_argument("--verifier", default=None,
                   help="for a speculators export: the target's Hub id, written into the uploaded config.json in place "
                        "of a local path (the folder itself is unchanged)")
    p.add_argument("--dry-run", action="store_true", help="run every local check and print what would be uploaded, "
                                                          "without touching the network")
    return p


def run(args: argparse.Namespace, command: str = "push") -> int:
    """The command's body; a user error ends as one line `draftkit.<command>: ...` and status 2."""
    try:
        with reported(command):
            if args.repo_id is None:
                found = find_artifacts(args.path)
                if not found:
                    find_artifact(args.path)  # raises with the explanation and the fix
                for name, folder in found.items():
                    print(f"artifact: {folder}: {check_tensors(folder)} (format {name})")
                print(f"(give a repo id to upload one: python -m draftkit.push {args.path} <user>/<name>"
                      + (" --format NAME)" if len(found) > 1 else ")"))
                return 0
            check_repo_id(args.repo_id)
            artifact = find_artifact(args.path, args.fmt)
            check_card(artifact)
            summary = check_tensors(artifact)
            uploaded_config(artifact, args.verifier)
            if args.dry_run:
                print(f"would upload {artifact} to https://huggingface.co/{args.repo_id} ({summary}; all checks passed)")
                return 0
            url = push_to_hub(args.path, args.repo_id, fmt=args.fmt, private=args.private or None, token=args.token,
                              commit_message=args.commit_message, revision=args.revision, verifier=args.verifier)
    except SystemExit as stop:  # the one line is printed; the status is returned
        return stop.code
    print(f"uploaded {artifact} to https://huggingface.co/{args.repo_id} ({url})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
