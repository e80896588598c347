"""``python -m stager bench``: this stager against PyTorch's stagers and the memcpy floor.

One setup factory per case serves every provider; the floor is a CPU memcpy for CPU sources and a
pinned device-to-host copy for GPU sources. ``blocked`` is how long the caller of ``stage()``
waited, ``complete`` how long until the staged copy was complete (both p50 with the p20-p80 range,
in ms); ``GB/s`` is bytes / complete p50 and ``x floor`` complete / the floor's complete.
"""

from __future__ import annotations

import gc
import os
import random
import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import torch

from stager.benchmarks import common
from stager.tree import tensors_in

__all__ = ["WORKLOADS", "StagingRow", "make_workload", "run", "main"]

NAN = float("nan")


@dataclass(kw_only=True)
class StagingRow(common.Row):
    """One (workload, provider) measurement; the JSON rows have exactly these fields."""

    device: str
    blocked_ms_p50: float = NAN
    blocked_ms_p20: float = NAN
    blocked_ms_p80: float = NAN
    complete_ms_p50: float = NAN
    complete_ms_p20: float = NAN
    complete_ms_p80: float = NAN
    gbps: float = 0.0
    x_floor: float = NAN
    note: str = ""
    us_per_tensor: float = NAN
    """Blocked p50 divided by the number of tensors, in microseconds."""


COLUMNS = common.LEAD + [
    common.spread_column("blocked ms p50 (p20-p80)", "blocked_ms", 2),
    common.Column("us/tensor", lambda r: f"{r.us_per_tensor:.3f}"),
    common.spread_column("complete ms p50 (p20-p80)", "complete_ms", 2),
    common.Column("GB/s", lambda r: f"{r.gbps:.2f}"),
    common.Column("x floor", lambda r: f"{r.x_floor:.2f}"),
    common.Column("note", lambda r: r.note, left=True),
]


def _small(n: int, lo: int, hi: int, device: str) -> dict[str, torch.Tensor]:
    rng = random.Random(0)
    return {
        f"t{i}": torch.empty(rng.randint(lo, hi) // 4, dtype=torch.float32, device=device).normal_()
        for i in range(n)
    }


def _mixed(layers: int, d: int, vocab: int, device: str) -> dict[str, Any]:
    """A transformer-like model state dict plus AdamW optimizer state (exp_avg, exp_avg_sq, step)."""
    model: dict[str, torch.Tensor] = {"embed.weight": torch.randn(vocab, d, device=device)}
    for i in range(layers):
        p = f"layers.{i}."
        model[p + "attn.qkv.weight"] = torch.randn(3 * d, d, device=device)
        model[p + "attn.qkv.bias"] = torch.randn(3 * d, device=device)
        model[p + "attn.out.weight"] = torch.randn(d, d, device=device)
        model[p + "attn.out.bias"] = torch.randn(d, device=device)
        model[p + "mlp.up.weight"] = torch.randn(4 * d, d, device=device)
        model[p + "mlp.up.bias"] = torch.randn(4 * d, device=device)
        model[p + "mlp.down.weight"] = torch.randn(d, 4 * d, device=device)
        model[p + "mlp.down.bias"] = torch.randn(d, device=device)
        model[p + "norm1.weight"] = torch.randn(d, device=device)
        model[p + "norm1.bias"] = torch.randn(d, device=device)
        model[p + "norm2.weight"] = torch.randn(d, device=device)
        model[p + "norm2.bias"] = torch.randn(d, device=device)
    model["head.weight"] = model["embed.weight"]  # tied
    state = {
        i: {
            "step": torch.tensor(10.0),
            "exp_avg": torch.randn_like(t),
            "exp_avg_sq": torch.rand_like(t),
        }
        for i, (k, t) in enumerate(model.items())
        if k != "head.weight"
    }
    groups = [{"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "params": list(state)}]
    return {"model": model, "optim": {"state": state, "param_groups": groups}}


def _large(n: int, nbytes: int, device: str) -> dict[str, torch.Tensor]:
    return {f"big{i}": torch.empty(nbytes // 4, device=device).normal_() for i in range(n)}


def _tiny(n: int, device: str) -> dict[str, torch.Tensor]:
    """``n`` tensors of 16 floats: nothing but per-tensor overhead."""
    return {f"t{i}": torch.randn(16, device=device) for i in range(n)}


WORKLOADS: dict[str, dict[str, Callable[[], Any]]] = {
    "cpu": {
        "tiny": lambda: _tiny(100_000, "cpu"),
        "small": lambda: _small(20_000, 1024, 16 * 1024, "cpu"),
        "mixed": lambda: _mixed(12, 512, 8192, "cpu"),
        "large": lambda: _large(3, 256 * common.MiB, "cpu"),
    },
    "cuda": {
        "tiny": lambda: _tiny(100_000, "cuda"),
        "small": lambda: _small(50_000, 8 * 1024, 76 * 1024, "cuda"),
        "mixed": lambda: _mixed(24, 2048, 32768, "cuda"),
        "large": lambda: _large(8, 1024 * common.MiB, "cuda"),
    },
}


def make_workload(device: str, case: str) -> Any:
    """Build one benchmark state dict (shared by every provider)."""
    return WORKLOADS[device][case]()


def _unique_bytes(sd: Any) -> int:
    seen: dict[int, int] = {}
    for t in tensors_in(sd):
        key = t.untyped_storage().data_ptr()
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
    return sum(seen.values())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _providers(device: str) -> dict[str, Callable[[], Any]]:
    """name -> factory of an object with ``stage(sd)`` and ``close()``."""
    from torch.distributed.checkpoint.staging import BlockingAsyncStager, DefaultStager, StagingOptions

    from stager import GraphStager

    providers: dict[str, Callable[[], Any]] = {
        "stager": lambda: GraphStager(cache_policy="cached"),
        # blocked = until stage() returned its Future; complete = until the Future resolved
        "stager (async)": lambda: GraphStager(cache_policy="cached", async_staging=True),
        "stager (fresh arena per call)": lambda: GraphStager(cache_policy="fresh"),
        "dcp-default (no stager)": lambda: DefaultStager(StagingOptions(False, False, False, False)),
        "bare _foreach_copy_": _BareForeach,
    }
    if device == "cuda":
        providers["DefaultStager(StagingOptions())"] = lambda: DefaultStager(StagingOptions())
        cached = "BlockingAsyncStager(cache=True)"
        providers[cached] = lambda: BlockingAsyncStager(cache_staged_state_dict=True)
        providers["torch-pack"] = _TorchPack
    else:
        providers["BlockingAsyncStager()"] = lambda: BlockingAsyncStager()
    return providers


class _BareForeach:
    """One ``torch._foreach_copy_`` of the state dict's tensors into destinations made once.

    The tensor list is collected on the first call only: what is timed is the copy alone.
    """

    def __init__(self) -> None:
        self._src: list[torch.Tensor] | None = None

    def stage(self, sd: Any) -> Any:
        if self._src is None:
            self._src = tensors_in(sd)
            pin = bool(self._src) and self._src[0].is_cuda
            self._dst = [torch.empty_like(t, device="cpu", pin_memory=pin) for t in self._src]
        torch._foreach_copy_(self._dst, self._src)
        return self._dst

    def close(self) -> None:
        self._src = None


class _TorchPack:
    """Plain-torch packing: ``_foreach_copy_`` of byte views into one device buffer, one D2H copy."""

    def __init__(self) -> None:
        self._key: Any = None

    def stage(self, sd: Any) -> Any:
        tensors = [t for t in tensors_in(sd) if t.numel()]
        views = [t.reshape(-1).view(torch.uint8) for t in tensors]
        sizes = [v.numel() for v in views]
        if self._key != sizes:
            total = sum(sizes)
            self._dev = torch.empty(total, dtype=torch.uint8, device=tensors[0].device)
            self._host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
            self._dst = list(torch.split(self._dev, sizes))
            self._key = sizes
        torch._foreach_copy_(self._dst, views)
        self._host.copy_(self._dev, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return self._host

    def close(self) -> None:
        pass


def _time_floor(nbytes: int, device: str, iters: int) -> tuple[list[float], list[float]]:
    if device == "cuda":
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    else:
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty(nbytes, dtype=torch.uint8)
    times = []
    for i in range(iters + 2):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=device == "cuda")
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return times, times


def _time_provider(
    factory: Callable[[], Any], sd: Any, device: str, iters: int, budget_s: float = float("inf")
) -> tuple[list[float], list[float]]:
    """Time ``iters`` calls after two warm-ups; stop early once ``budget_s`` seconds have passed
    (after at least one timed call), so one slow provider cannot use up a short session."""
    stager = factory()
    blocked, complete = [], []
    start = time.perf_counter()
    try:
        for i in range(iters + 2):
            if blocked and time.perf_counter() - start > budget_s:
                break
            _sync(device)
            t0 = time.perf_counter()
            out = stager.stage(sd)
            t1 = time.perf_counter()
            if isinstance(out, Future):
                out = out.result()
            _sync(device)
            t2 = time.perf_counter()
            if i >= 2:
                blocked.append(t1 - t0)
                complete.append(t2 - t0)
            del out
            gc.collect()
    finally:
        stager.close()
    return blocked, complete


def run(
    device: str,
    cases: list[str],
    iters: int,
    providers: list[str] | None = None,
    budget_s: float = float("inf"),
) -> tuple[dict, list[StagingRow]]:
    """Measure every provider on every case; returns the header and the rows.

    ``budget_s`` bounds each provider's time on each case: a provider that runs past it stops
    after its current call, and its row says how many calls were timed.
    """
    head = common.header(device)
    rows: list[StagingRow] = []
    all_providers = _providers(device)
    chosen = {k: v for k, v in all_providers.items() if providers is None or any(p in k for p in providers)}
    for case in cases:
        sd = make_workload(device, case)
        n_tensors = len(tensors_in(sd))
        nbytes = _unique_bytes(sd)
        fb, fc = _time_floor(nbytes, device, iters)
        floor = common.spread_ms(fc)[0]
        results = [("floor (one memcpy)", fb, fc, "")]
        for name, factory in chosen.items():
            try:
                b, c = _time_provider(factory, sd, device, iters, budget_s)
                note = "" if len(c) == iters else f"{len(c)} of {iters} calls (--budget)"
                results.append((name, b, c, note))
            except Exception as exc:  # a provider that cannot run here is reported, not fatal
                results.append((name, [], [], f"failed: {type(exc).__name__}: {exc}"[:120]))
        for name, b, c, note in results:
            row = StagingRow(device=device, case=case, tensors=n_tensors, mib=nbytes / common.MiB,
                             provider=name)
            row.note = note
            if c:
                row.mib = round(row.mib, 1)
                row.blocked_ms_p50, row.blocked_ms_p20, row.blocked_ms_p80 = common.spread_ms(b)
                row.complete_ms_p50, row.complete_ms_p20, row.complete_ms_p80 = common.spread_ms(c)
                row.gbps = nbytes / (row.complete_ms_p50 / 1e3) / 1e9
                row.x_floor = row.complete_ms_p50 / floor
                row.us_per_tensor = row.blocked_ms_p50 * 1e3 / max(n_tensors, 1)
            rows.append(row)
        del sd
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return head, rows


def wrap_checkpoint_times(
    n_params: int = 5000, checkpoints: int = 6, numel: int = 64,
) -> tuple[list[float], int]:
    """How long ``stager.wrap(model, AdamW).checkpoint(path)`` keeps the training loop waiting.

    The model has ``n_params`` parameters of ``numel`` floats; each checkpoint follows an
    optimizer step (synthetic gradients) and is written to a temporary directory. Returns the
    seconds each ``checkpoint()`` call took (the first included) and the tensors per checkpoint.
    """
    import tempfile

    import stager

    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(numel)) for _ in range(n_params)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="stager-bench-wrap-") as root:
        with stager.wrap(model, opt) as handle:
            for i in range(checkpoints):
                for p in model:
                    p.grad = torch.ones_like(p)
                opt.step()  # waits for the previous checkpoint's copy (the step pre-hook)
                t0 = time.perf_counter()
                handle.checkpoint(os.path.join(root, f"ckpt-{i}"))
                times.append(time.perf_counter() - t0)
            handle.wait()
            tensors = handle.stats.tensors if handle.stats else 0
    return times, tensors


def format_table(head: dict[str, Any], rows: list[StagingRow]) -> str:
    """The human-readable table."""
    return common.table(head, COLUMNS, rows)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m stager bench``."""
    from stager._cli import Parser, fail, unwritable_file

    parser = Parser(prog="python -m stager bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    every = "tiny,small,mixed,large"
    parser.add_argument("--cases", default=every, help=f"comma-separated: {every}")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per provider (after 2 warm-ups)")
    parser.add_argument("--providers", default=None, help="comma-separated substrings of provider names")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    parser.add_argument(
        "--budget", type=float, default=None, metavar="SECONDS",
        help="at most this long per provider and case (default: no limit); fewer calls are noted in the row",
    )
    parser.add_argument(
        "--wrap", action="store_true",
        help="also time stager.wrap(model, AdamW).checkpoint() for a model of 5,000 parameters",
    )
    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error(f"--iters {args.iters}: expected an integer >= 1 (timed calls per provider)")
    if args.budget is not None and not args.budget >= 0:
        parser.error(f"--budget {args.budget}: expected a number of seconds >= 0")
    if args.json:
        problem = unwritable_file(args.json)  # checked now, not after the whole run
        if problem:
            parser.error(f"--json {args.json!r} {problem}")
    from stager.config import StagerConfig
    from stager.errors import StagerConfigError

    try:
        StagerConfig.resolve()  # a bad STAGER_* value stops the run here, not row by row
    except StagerConfigError as exc:
        return fail(parser.prog, exc)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in WORKLOADS[args.device]]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(WORKLOADS[args.device])}")
    providers = args.providers.split(",") if args.providers else None
    budget = float("inf") if args.budget is None else args.budget
    head, rows = run(args.device, cases, args.iters, providers, budget)
    print(format_table(head, rows))
    if args.wrap:
        times, tensors = wrap_checkpoint_times()
        p50, p20, p80 = common.spread_ms(times[1:] or times)
        print(
            f"wrap: checkpoint() returned in {p50:.3f} ms p50 ({p20:.3f}-{p80:.3f}) after the first "
            f"({times[0] * 1e3:.3f} ms), 5,000 parameters with "
            f"AdamW ({tensors} tensors), {'CPU' if args.device == 'cpu' else args.device} figures"
        )
    if args.json:
        try:
            common.write_json(args.json, head, rows)
        except OSError as exc:
            return fail(parser.prog, f"could not write --json {args.json!r}: {exc.strerror or exc}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
