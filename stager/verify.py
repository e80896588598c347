"""``python -m stager verify CHECKPOINT_DIR``: check a checkpoint's tensors against their saved checksums.

Loads every tensor on the CPU as DCP's metadata describes it (no model needed), in batches of
``--batch`` bytes, and compares each saved chunk with the checksum written beside it (see
:mod:`stager.integrity`). Prints one line per tensor that differs or cannot be checked, and a
summary. Exit status: 0 when nothing differs, 1 when a tensor differs, 2 when the checkpoint
cannot be read, 3 with ``--require`` when the checkpoint has no checksums or a chunk could not be
checked.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TextIO

__all__ = ["main"]

_BAR_MIN_BYTES = 64 << 20  # below this a checkpoint verifies too fast for a progress bar to help


class _Progress:
    """A one-line progress bar on ``stream`` (redrawn in place), for large checkpoints."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total < _BAR_MIN_BYTES:
            return
        width = 30
        frac = done / total if total else 1.0
        fill = int(width * frac)
        rate = done / max(time.perf_counter() - self.t0, 1e-9) / 2**20
        self.stream.write(
            f"\rverifying [{'#' * fill}{'.' * (width - fill)}] {frac:6.1%} "
            f"{done / 2**20:,.0f}/{total / 2**20:,.0f} MiB {rate:,.0f} MiB/s"
        )
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m stager verify``."""
    from stager.envs import format_size, parse_size

    parser = argparse.ArgumentParser(prog="python -m stager verify", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="a checkpoint directory written by DCP")
    parser.add_argument("--batch", default="256MiB", help="bytes of tensors loaded at once (default 256MiB)")
    parser.add_argument(
        "--require", action="store_true",
        help="also fail (exit 3) when the checkpoint has no checksums or a chunk cannot be checked",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        batch = parse_size(args.batch)
    except ValueError:
        parser.error(f"--batch {args.batch!r} is not a size; use a byte count or e.g. 64MiB")
    path = args.checkpoint
    if not os.path.isdir(path):
        print(
            f"stager verify: {path!r} is not a directory; pass a checkpoint directory written by DCP",
            file=sys.stderr,
        )
        return 2

    from stager.integrity import ALGORITHM, VERSION, verify_checkpoint

    bar = _Progress(sys.stderr, enabled=not args.no_progress)
    try:
        report = verify_checkpoint(path, batch_bytes=batch, progress=bar)
    except (OSError, RuntimeError, ValueError, EOFError) as exc:  # no metadata, unreadable file, ...
        bar.close()
        print(f"stager verify: cannot read checkpoint {path!r}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    bar.close()
    for note in report.notes:
        print(f"note: {note}")
    if not report.has_checksums:
        print(
            f"{path}: no checksums (written without them, or by a writer that does not store them); "
            "nothing verified"
        )
        return 3 if args.require else 0
    for m in report.mismatches:
        where = f" offsets {list(m.offsets)}" if any(m.offsets) else ""
        print(
            f"MISMATCH {m.fqn}{where}: file {m.file} (rank {m.rank}): expected {m.expected}, found {m.found}"
        )
    for fqn, why in report.unverifiable:
        print(f"UNVERIFIABLE {fqn}: {why}")
    status = "FAILED" if report.mismatches else "OK"
    print(
        f"{status}: {report.verified} tensor chunk(s) verified ({format_size(report.verified_bytes)}), "
        f"{len(report.mismatches)} mismatched, {len(report.unverifiable)} unverifiable "
        f"({ALGORITHM} v{VERSION}, {report.seconds:.2f} s)"
    )
    if report.mismatches:
        return 1
    if args.require and report.unverifiable:
        return 3
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
