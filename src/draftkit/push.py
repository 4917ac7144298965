"""`python -m draftkit.push <run or export folder> <user>/<name>`: upload an exported draft, model card included, to
the Hugging Face Hub.

The folder is a finished run directory (its `export/` is used) or an export folder. When a run exported several
formats (Medusa's `vllm` and `fasterdecoding`, FSPAD's `draftkit`, `eagle-vllm` and `eagle-sglang`), each goes to its
own repository: pick one with --format. Nothing is sent until the artifact, its model card and the repo id pass the
local checks; --dry-run stops after them. The token comes from --token, $HF_TOKEN or `huggingface-cli login`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from draftkit.export.hub import HubExportError, check_card, check_repo_id, find_artifact, find_artifacts, push_to_hub


def parser(prog: str = "python -m draftkit.push") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="a finished run directory (its export/ is uploaded) or an export folder")
    p.add_argument("repo_id", nargs="?", default=None,
                   help="the Hub repository, <user or org>/<name>; created when missing (omit it to list what the "
                        "folder holds)")
    p.add_argument("--format", dest="fmt", default=None,
                   help="which export to upload when the folder holds several (e.g. vllm, eagle-vllm); listed when "
                        "omitted and needed")
    p.add_argument("--private", action="store_true", help="create the repository as private (an existing one keeps "
                                                          "its visibility)")
    p.add_argument("--token", default=None, help="Hub token with write access (default: $HF_TOKEN, then the token "
                                                 "saved by `huggingface-cli login`)")
    p.add_argument("--revision", default=None, help="branch to push to (default: main)")
    p.add_argument("--commit-message", default=None, help="commit message (default: names the uploaded folder)")
    p.add_argument("--dry-run", action="store_true", help="run every local check and print what would be uploaded, "
                                                          "without touching the network")
    return p


def run(args: argparse.Namespace, prog: str) -> int:
    try:
        if args.repo_id is None:
            found = find_artifacts(args.path)
            if not found:
                find_artifact(args.path)  # raises with the explanation and the fix
            for name, folder in found.items():
                print(f"{name}: {folder}")
            print(f"(give a repo id to upload: {prog} {args.path} <user>/<name> [--format NAME])")
            return 0
        check_repo_id(args.repo_id)
        artifact = find_artifact(args.path, args.fmt)
        check_card(artifact)
        if args.dry_run:
            print(f"would upload {artifact} to https://huggingface.co/{args.repo_id} (all checks passed)")
            return 0
        url = push_to_hub(args.path, args.repo_id, fmt=args.fmt, private=args.private or None, token=args.token,
                          commit_message=args.commit_message, revision=args.revision)
    except HubExportError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    print(f"uploaded {artifact} to https://huggingface.co/{args.repo_id} ({url})")
    return 0


def main(argv: list[str] | None = None) -> int:
    prog = "python -m draftkit.push"
    return run(parser(prog).parse_args(argv), prog)


if __name__ == "__main__":
    sys.exit(main())
