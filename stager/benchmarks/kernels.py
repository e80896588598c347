"""Benchmark of ``pack_gather`` against its floor and against a Python loop of ``copy_`` calls.

Run ``python -m stager.benchmarks.kernels [--json FILE]``. Every provider packs the same regions
(a mix of sizes per case) into the same kind of buffer: ``pack_gather`` (one launch, its table
prepared once), ``copy_ loop`` (one ``copy_`` per region, in Python) and ``memcpy`` (one
device-to-device copy of the same bytes: the floor). ``blocked ms`` is how long the call holds the
calling thread, ``device ms`` ``triton.testing.do_bench``'s median, ``of floor`` the floor's device
time over the provider's. Without CUDA the kernel runs in Triton's interpreter on tiny cases,
timed by the host clock and labelled ``CPU (interpreter)``: it says nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:  # must precede the first import of triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

from stager.benchmarks import common  # noqa: E402
from stager.kernels import kernel_backend, pack_gather, pack_gather_reference  # noqa: E402
from stager.kernels.table import PackTable, packed_size, prepare_table, table_from_tensors  # noqa: E402

__all__ = ["KernelRow", "main", "optimizer_mix", "run"]


@dataclass(kw_only=True)
class KernelRow(common.Row):
    """One provider on one case; the JSON rows carry exactly these fields."""

    blocked_ms_p50: float
    blocked_ms_p20: float
    blocked_ms_p80: float
    device_ms: float
    gb_per_s: float
    of_floor: float
    label: str


COLUMNS = common.LEAD + [
    common.spread_column("blocked ms p50 (p20-p80)", "blocked_ms", 3),
    common.Column("device ms", lambda r: f"{r.device_ms:.3f}"),
    common.Column("GB/s", lambda r: f"{r.gb_per_s:.2f}"),
    common.Column("of floor", lambda r: f"{r.of_floor:.2f}"),
    common.Column("", lambda r: r.label, left=True),
]


@dataclass
class Case:
    """The regions of one benchmark case and the buffers every provider writes."""

    name: str
    tensors: list[torch.Tensor]
    table: PackTable
    offsets: list[int]
    out: torch.Tensor
    floor_src: torch.Tensor
    nbytes: int


def optimizer_mix(d_model: int, layers: int) -> list[int]:
    """Byte sizes of Adam's state for a small transformer: ``exp_avg`` and ``exp_avg_sq`` (fp32,
    one per parameter) and ``step`` (one fp32 scalar per parameter)."""
    params = [d_model * 4 * d_model]  # embedding-sized
    for _ in range(layers):
        params += [d_model, d_model]  # norm weight, bias
        params += [d_model * d_model, d_model] * 4  # q, k, v, o: weight and bias
        params += [d_model, d_model]  # norm weight, bias
        params += [4 * d_model * d_model, 4 * d_model, 4 * d_model * d_model, d_model]  # mlp
    sizes: list[int] = []
    for numel in params:
        sizes += [4 * numel, 4 * numel, 4]
    return sizes


def _cases(device: torch.device) -> list[tuple[str, list[int]]]:
    if device.type == "cuda":
        return [
            ("4KiB x 10000", [4096] * 10_000),
            ("64KiB x 1024", [65536] * 1024),
            ("40B x 10000", [40] * 10_000),
            ("adam d=1024 L=8", optimizer_mix(1024, 8)),
        ]
    return [  # interpreter: a program costs milliseconds
        ("4KiB x 32", [4096] * 32),
        ("64KiB x 2", [65536] * 2),
        ("40B x 64", [40] * 64),
        ("adam d=16 L=1", optimizer_mix(16, 1)),
    ]


def make_case(name: str, sizes: list[int], device: torch.device) -> Case:
    """Allocate one tensor per region (as a state dict would), a packed buffer and the floor's
    source; prepare the table once."""
    tensors = [torch.full((n,), i % 251, dtype=torch.uint8, device=device) for i, n in enumerate(sizes)]
    raw = table_from_tensors(tensors)
    out = torch.empty(packed_size(raw), dtype=torch.uint8, device=device)
    nbytes = sum(sizes)
    return Case(
        name=name,
        tensors=tensors,
        table=prepare_table(raw, device),
        offsets=raw[:, 1].tolist(),
        out=out,
        floor_src=torch.empty(nbytes, dtype=torch.uint8, device=device),
        nbytes=nbytes,
    )


def _providers(case: Case) -> dict[str, Callable[[], object]]:
    floor_dst = torch.empty_like(case.floor_src)

    def kernel() -> object:
        return pack_gather(case.table, case.out, validate=False)

    def loop() -> object:
        out = case.out
        for t, off in zip(case.tensors, case.offsets, strict=True):
            out[off : off + t.numel()].copy_(t)
        return out

    def memcpy() -> object:
        return floor_dst.copy_(case.floor_src)

    return {"memcpy": memcpy, "pack_gather": kernel, "copy_ loop": loop}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _blocked_s(fn: Callable[[], object], device: torch.device, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        _sync(device)
    return times


def _device_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    if device.type == "cuda":
        import triton.testing

        # Three quantiles come back as a list in every Triton version (one comes back bare).
        return float(triton.testing.do_bench(fn, warmup=10, rep=100, quantiles=[0.5, 0.2, 0.8])[0])
    return common.percentile(_blocked_s(fn, device, reps), 0.5) * 1e3


def run(device: torch.device, reps: int) -> list[KernelRow]:
    """Benchmark every case on ``device``; check the kernel against the reference once each."""
    if device.type == "cuda":
        label = "GPU"
    elif kernel_backend(device) == "triton-interpreter":
        label = "CPU (interpreter)"
    else:  # --device cpu where CUDA is present: triton was imported without the interpreter
        label = "CPU (reference)"
    rows: list[KernelRow] = []
    for name, sizes in _cases(device):
        case = make_case(name, sizes, device)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            providers = _providers(case)
            for fn in providers.values():  # warm-up: compiles the kernel, fills caches
                fn()
            _sync(device)
            expected = pack_gather_reference(case.table, torch.zeros_like(case.out))
            pack_gather(case.table, case.out.zero_())
            if not torch.equal(case.out, expected):
                raise RuntimeError(f"pack_gather differs from the reference on case {name!r}")
            floor_ms = 0.0
            for provider, fn in providers.items():
                dev_ms = _device_ms(fn, device, reps)
                floor_ms = dev_ms if provider == "memcpy" else floor_ms
                p50, p20, p80 = common.spread_ms(_blocked_s(fn, device, reps))
                rows.append(KernelRow(
                    case=name, tensors=len(sizes), mib=case.nbytes / 2**20, provider=provider,
                    blocked_ms_p50=p50, blocked_ms_p20=p20, blocked_ms_p80=p80, device_ms=dev_ms,
                    gb_per_s=case.nbytes / (dev_ms * 1e-3) / 1e9 if dev_ms > 0 else float("inf"),
                    of_floor=floor_ms / dev_ms if dev_ms > 0 else float("nan"), label=label,
                ))
        del case
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line: print the header and the table; ``--json FILE`` also writes the rows."""
    parser = argparse.ArgumentParser(
        prog="python -m stager.benchmarks.kernels", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", metavar="FILE", help="also write the rows (and the header) as JSON")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when present)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per provider for blocked ms")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if _CUDA else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    reps = args.reps or (50 if device.type == "cuda" else 3)
    if device.type != "cuda":
        # The interpreter is single-threaded; a one-thread floor is the comparable one (and
        # small parallel copies can cost milliseconds of thread wake-up on a loaded host).
        torch.set_num_threads(1)
    head = common.header(device)
    head["backend"] = kernel_backend(device)
    rows = run(device, reps)
    sys.stdout.write(common.table(head, COLUMNS, rows) + "\n")
    if args.json:
        common.write_json(args.json, head, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
