"""What the benchmarks share: the row's first fields, the percentile, the header, the table, the JSON.

A benchmark's rows are a dataclass deriving from :class:`Row`; its JSON file is
``{"header": header(...), "rows": [fields of each row]}`` (:func:`write_json`), and its table is
the header on one ``key=value`` line above one line per row (:func:`table`).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

MiB = 1 << 20


@dataclass(kw_only=True)
class Row:
    """One provider on one case; each benchmark adds its measurements."""

    case: str
    tensors: int
    mib: float
    provider: str


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0 to 1) of ``values``, interpolated linearly between neighbours."""
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def spread_ms(seconds: list[float]) -> tuple[float, float, float]:
    """p50, p20 and p80 of ``seconds``, in milliseconds."""
    return percentile(seconds, 0.5) * 1e3, percentile(seconds, 0.2) * 1e3, percentile(seconds, 0.8) * 1e3


def header(device: str | torch.device) -> dict[str, Any]:
    """Date, device and versions, printed above the table and stored in the JSON."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # pragma: no cover
        info["triton"] = "absent"
    device = torch.device(device)
    if device.type == "cuda":
        info["device"] = f"{torch.cuda.get_device_name(device)} ({device})"
        info["cuda"] = torch.version.cuda
    else:
        gpu = "CPU figures" if torch.cuda.is_available() else "no GPU: CPU figures"
        info["device"] = f"CPU ({platform.processor() or platform.machine()}), {gpu}"
    return info


@dataclass(frozen=True)
class Column:
    """A table column: its title, the text of one row's cell, and whether it is text (left-aligned)."""

    title: str
    cell: Callable[[Any], str]
    left: bool = False


def spread_column(title: str, field: str, digits: int) -> Column:
    """A ``p50 (p20-p80)`` column of a row's fields ``{field}_p50``, ``_p20`` and ``_p80``."""

    def cell(r: Any) -> str:
        p50, p20, p80 = (getattr(r, f"{field}_p{q}") for q in (50, 20, 80))
        return f"{p50:.{digits}f} ({p20:.{digits}f}-{p80:.{digits}f})"

    return Column(title, cell)


LEAD = [
    Column("case", lambda r: r.case, left=True),
    Column("tensors", lambda r: str(r.tensors)),
    Column("MiB", lambda r: f"{r.mib:.2f}"),
    Column("provider", lambda r: r.provider, left=True),
]
"""The columns of :class:`Row`'s fields, first in every table."""


def table(head: dict[str, Any], columns: list[Column], rows: list[Any]) -> str:
    """``head`` on one ``key=value`` line, then the column titles, a rule and one line per row."""
    cells = [[c.cell(r) for c in columns] for r in rows]
    widths = [max([len(c.title)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if c.left else v.rjust(w) for v, w, c in zip(values, widths, columns))

    titles = line([c.title for c in columns]).rstrip()
    lines = [line(values).rstrip() for values in cells]
    return "\n".join([" ".join(f"{k}={v}" for k, v in head.items()), titles, "-" * len(titles), *lines])


def write_json(path: str, head: dict[str, Any], rows: list[Any]) -> None:
    """``{"header": head, "rows": [each row's fields]}`` into ``path``."""
    with open(path, "w") as f:
        json.dump({"header": head, "rows": [asdict(r) for r in rows]}, f, indent=1)
