"""Errors a user can fix, and how the command lines report them.

A UserError is raised for bad input (a setting, a file, a run directory, an artifact): its message says what is wrong
and ends with "Fix: <how>". The command lines print it as one line, `draftkit.<cmd>: <message>`, and exit with status
2; any other exception is a bug and keeps its traceback. DRAFTKIT_DEBUG=1 shows the traceback of a UserError too.
Every layer may import this module: it imports nothing of draftkit's.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

DEBUG_ENV = "DRAFTKIT_DEBUG"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # what a shell reports for a process ended by SIGINT


class UserError(ValueError):
    """Bad input: the message names the input and the fix."""


class ConfigError(UserError):
    """A setting that cannot work (checked before any model is loaded where possible)."""


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(message: object) -> str:
    return " ".join(str(message).split())


@contextmanager
def reported(command: str, on_interrupt: Callable[[], str] | None = None) -> Iterator[None]:
    """Run a command's body: a UserError becomes one line on stderr and exit status 2; Ctrl-C one line (what
    `on_interrupt` returns: how to continue) and status 130. Other exceptions pass through with their traceback."""
    try:
        yield
    except UserError as error:
        if debugging():
            raise
        print(f"draftkit.{command}: {one_line(error)}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        if debugging():
            raise
        hint = on_interrupt() if on_interrupt is not None else ""
        print(f"draftkit.{command}: interrupted." + (f" {hint}" if hint else ""), file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
