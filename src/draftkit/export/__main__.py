"""`python -m draftkit.export` is the old name of `python -m draftkit.push` (it checked and uploaded an export, and
exported nothing); the old form `python -m draftkit.export <run_dir> [--push-to-hub <user/name>]` still works."""

from __future__ import annotations

import sys

from draftkit import push

POINTER = ("note: `python -m draftkit.export` checks and uploads exports; it is now called `python -m draftkit.push "
           "<run or export> [<user>/<name>]`")


def main(argv: list[str] | None = None) -> int:
    p = push.parser("python -m draftkit.export")
    p.add_argument("--push-to-hub", metavar="REPO_ID", dest="push_repo_id", default=None,
                   help="old spelling of the repo id argument")
    args = p.parse_args(argv)
    print(POINTER, file=sys.stderr)
    if args.push_repo_id is not None:
        args.repo_id = args.push_repo_id
    return push.run(args, "export")


if __name__ == "__main__":
    sys.exit(main())
