"""Command line: ``python -m stager demo | bench | doctor | verify``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand."""
    args = sys.argv[1:] if argv is None else argv
    commands = ("demo", "bench", "doctor", "verify")
    usage = f"usage: python -m stager {{{'|'.join(commands)}}} [options]  (--help on each)"
    if args and args[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not args or args[0] not in commands:
        unknown = f"unknown command {args[0]!r}; " if args else ""
        print(f"{unknown}{usage}", file=sys.stderr)
        return 2
    cmd, rest = args[0], args[1:]
    if cmd == "bench":
        from stager.benchmarks.staging import main as run
    elif cmd == "demo":
        from stager.demo import main as run
    elif cmd == "verify":
        from stager.verify import main as run
    else:
        from stager.doctor import main as run
    from stager._cli import fail
    from stager.errors import RegionTableError, StagerError

    # A command error is one line on stderr and a non-zero exit, never a traceback.
    try:
        return run(rest)
    except (StagerError, RegionTableError, OSError) as exc:
        return fail(f"python -m stager {cmd}", exc)
    except KeyboardInterrupt:
        return fail(f"python -m stager {cmd}", "interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
