"""What every ``python -m stager`` command shares: one-line usage errors and early path checks.

A command error is one line on stderr and a non-zero exit status, never a traceback: usage errors
exit with 2 (argparse's convention), errors found while running with 1. Paths a command writes at
the end of a long run are checked before the run starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

__all__ = ["Parser", "one_line", "fail", "unwritable_file", "unusable_directory"]


def one_line(text: object) -> str:
    """``text`` with its line breaks folded into spaces."""
    return " ".join(str(text).splitlines()).strip()


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        """Print ``<prog>: error: <message>`` on one line and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {one_line(message)} (--help for usage)\n")


def fail(prog: str, message: object, status: int = 1) -> int:
    """Print ``<prog>: error: <message>`` on one line on stderr; returns ``status``."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return status


def unwritable_file(path: str) -> str | None:
    """Why a file could not be written at ``path`` (checked without creating it), or ``None``."""
    p = Path(path)
    if p.is_dir():
        return "is a directory"
    parent = p.parent
    if not parent.exists():
        return f"cannot be created: the directory {str(parent)!r} does not exist"
    if not parent.is_dir():
        return f"cannot be created: {str(parent)!r} is not a directory"
    if p.exists():
        if not os.access(p, os.W_OK):
            return "is not writable (permission denied)"
    elif not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: the directory {str(parent)!r} is not writable"
    return None


def unusable_directory(path: str) -> str | None:
    """Why ``path`` cannot hold new files (it is created if missing), or ``None``."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        return "exists and is not a directory"
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot be created ({exc.strerror or exc})"
    if not os.access(p, os.W_OK | os.X_OK):
        return "is not writable (permission denied)"
    return None
