"""The benchmarks: what they share (percentile, table, JSON rows) and ``python -m stager bench``."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import pytest

from stager.benchmarks import staging as bench
from stager.benchmarks.common import (
    LEAD,
    Column,
    Row,
    percentile,
    spread_column,
    spread_ms,
    table,
    write_json,
)


@dataclass(kw_only=True)
class _Row(Row):
    t_p50: float
    t_p20: float
    t_p80: float
    note: str = ""


SAMPLES = [[3.0], [5.0, 1.0], [0.1, 0.4, 0.2, 0.9, 0.3, 0.5, 0.7]]


@pytest.mark.parametrize("values", SAMPLES, ids=["one", "two", "seven"])
def test_percentile_interpolates_like_statistics_inclusive(values: list[float]) -> None:
    assert percentile(values, 0.5) == pytest.approx(statistics.median(values))
    if len(values) > 1:
        deciles = statistics.quantiles(values, n=10, method="inclusive")
        assert percentile(values, 0.2) == pytest.approx(deciles[1])
        assert percentile(values, 0.8) == pytest.approx(deciles[7])
    assert spread_ms(values) == pytest.approx(tuple(1e3 * percentile(values, q) for q in (0.5, 0.2, 0.8)))


def test_table_aligns_columns_under_the_header_line(tmp_path: Path) -> None:
    rows = [
        _Row(case="small", tensors=20000, mib=166.25, provider="floor", t_p50=1.5, t_p20=1.25, t_p80=2.0),
        _Row(case="small", tensors=5, mib=0.5, provider="stager", t_p50=12.0, t_p20=11.0, t_p80=13.0),
    ]
    rows[1].note = "x"
    columns = LEAD + [spread_column("t ms", "t", 1), Column("note", lambda r: r.note, left=True)]
    lines = table({"device": "CPU", "torch": "2"}, columns, rows).splitlines()
    assert lines[0] == "device=CPU torch=2"
    assert lines[1].split() == ["case", "tensors", "MiB", "provider", "t", "ms", "note"]
    assert set(lines[2]) == {"-"} and len(lines[2]) == len(lines[1])
    assert lines[3].split() == ["small", "20000", "166.25", "floor", "1.5", "(1.2-2.0)"]
    assert lines[4].split() == ["small", "5", "0.50", "stager", "12.0", "(11.0-13.0)", "x"]
    assert lines[3].index(")") == lines[4].index(")")  # numbers right-aligned
    write_json(str(tmp_path / "rows.json"), {"device": "CPU"}, rows)
    data = json.loads((tmp_path / "rows.json").read_text())
    assert data["header"] == {"device": "CPU"}
    assert list(data["rows"][1]) == ["case", "tensors", "mib", "provider", "t_p50", "t_p20", "t_p80", "note"]


def test_bench_writes_rows_with_floor_and_ratios(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(bench.WORKLOADS["cpu"], "small", lambda: bench._small(200, 1024, 4096, "cpu"))
    out = tmp_path / "bench.json"
    assert bench.main(["--cases", "small", "--iters", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    providers = {r["provider"] for r in data["rows"]}
    assert {"floor (one memcpy)", "stager", "dcp-default (no stager)"} <= providers
    assert "CPU" in data["header"]["device"]
    floor = next(r for r in data["rows"] if r["provider"].startswith("floor"))
    assert floor["x_floor"] == pytest.approx(1.0)
    assert all(r["tensors"] == 200 for r in data["rows"])


def test_bench_budget_stops_a_slow_provider_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(bench.WORKLOADS["cpu"], "small", lambda: bench._small(50, 1024, 4096, "cpu"))
    out = tmp_path / "bench.json"
    args = ["--cases", "small", "--iters", "5", "--providers", "stager", "--budget", "0", "--json", str(out)]
    assert bench.main(args) == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if r["provider"] == "stager"]
    assert len(rows) == 1 and rows[0]["note"] == "1 of 5 calls (--budget)"
    assert rows[0]["complete_ms_p50"] > 0
