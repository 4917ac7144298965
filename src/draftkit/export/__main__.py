"""`python -m draftkit.export <run_dir> --push-to-hub <user/name>`: upload a run's exported draft with its model card.

<run_dir> is a finished run directory (its `export/` is uploaded) or an export directory. The token comes from
--token, $HF_TOKEN or `huggingface-cli login`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from draftkit.errors import reported
from draftkit.export.hub import HubExportError, check_tensors, find_artifact, push_to_hub


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m draftkit.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="<user or org>/<name> on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", default=None)
    parser.add_argument("--revision", default=None, help="branch to push to (default: main)")
    parser.add_argument("--commit-message", default=None)
    args = parser.parse_args(argv)
    try:
        with reported("export"):
            if not args.run_dir.exists():
                raise HubExportError(f"{args.run_dir} does not exist. Fix: pass a finished run directory or its "
                                     "export/ directory")
            artifact = find_artifact(args.run_dir)
            if not args.push_to_hub:
                print(f"artifact: {artifact}: {check_tensors(artifact)} (add --push-to-hub <user/name> to upload it)")
                return 0
            url = push_to_hub(artifact, args.push_to_hub, private=args.private or None, token=args.token,
                              commit_message=args.commit_message, revision=args.revision)
    except SystemExit as stop:  # the one line is printed; the status is returned
        return stop.code
    print(f"uploaded {artifact} to https://huggingface.co/{args.push_to_hub} ({url})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
