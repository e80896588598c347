"""``python -m stager demo``: train a small transformer, checkpointing with ``wrap`` and with DCP's default.

What it trains, prints and checks (PASS/FAIL, non-zero exit on FAIL), and its options
(``--plot``, ``--trace``): README.md, "Demo" and "Profiling".
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from stager.checkpoint import checkpoint_layout
from stager.demo_model import SIZES, make_model, train_step
from stager.envs import format_size
from stager.tree import leaves, tensors_in

__all__ = ["main", "range_times"]

_EXTRA_STEPS = 3  # steps trained past the last checkpoint before the in-memory restore
_TRACE_CHECKPOINTS = 3  # checkpoints (one training step each) recorded by --trace
_DEVICES = "cpu, cuda or cuda:N"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _differences(got: Any, want: Any) -> list[str]:
    """Key paths where ``got`` and ``want`` differ (tensors by ``torch.equal``)."""
    g, w = dict(leaves(got)), dict(leaves(want))
    bad = sorted(set(g) ^ set(w))
    for k in sorted(set(g) & set(w)):
        a, b = g[k], w[k]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            same = a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
        else:
            same = not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b
        if not same:
            bad.append(k)
    return bad


class _Bar:
    """A plain ``\\r`` progress bar on stderr (no tqdm)."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self._last = 0.0

    def update(self, done: int, loss: float, step_ms: float) -> None:
        now = time.perf_counter()
        if not self.enabled or (done < self.total and now - self._last < 0.1):
            return
        self._last = now
        width = 30
        filled = width * done // self.total
        sys.stderr.write(
            f"\r{self.label:<14} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}"
            f"  loss {loss:6.3f}  {step_ms:7.1f} ms/step"
        )
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


@dataclass
class _Run:
    label: str
    step_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    ckpt_steps: list[int] = field(default_factory=list)
    blocked_s: list[float] = field(default_factory=list)
    last_path: Path | None = None
    snapshot: Any = None
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def median_step(self) -> float:
        skip = {1} | {s for c in self.ckpt_steps for s in (c, c + 1)}
        rest = [t for i, t in enumerate(self.step_s, 1) if i not in skip] or self.step_s
        return statistics.median(rest)

    def inflation(self, ckpt: int) -> float:
        window = [s for s in (ckpt, ckpt + 1) if s <= len(self.step_s)]
        return sum(self.step_s[s - 1] for s in window) - len(window) * self.median_step()

    def check(self, name: str, bad: list[str], passed: str = "bit-exact") -> None:
        """Record a check that passed when ``bad`` (the key paths that differ) is empty."""
        detail = passed if not bad else f"{len(bad)} entries differ, first {bad[0]}"
        self.checks.append((name, not bad, detail))


def _train(
    label: str,
    args: argparse.Namespace,
    device: torch.device,
    root: Path,
    checkpoint: Callable[[Path], object],
    model: nn.Module,
    opt: torch.optim.Optimizer,
) -> _Run:
    run = _Run(label)
    bar = _Bar(args.steps, label, not args.no_progress)
    last_ckpt = args.steps // args.every * args.every
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        loss = train_step(model, opt, step, args.size, device)
        if step % args.every == 0:
            path = root / label / f"step-{step:06d}"
            tb = time.perf_counter()
            checkpoint(path)
            run.blocked_s.append(time.perf_counter() - tb)
            run.ckpt_steps.append(step)
            run.last_path = path
        _sync(device)
        run.step_s.append(time.perf_counter() - t0)
        run.losses.append(float(loss))
        if step == last_ckpt:
            run.snapshot = copy.deepcopy(checkpoint_layout(model, opt))
        bar.update(step, run.losses[-1], 1e3 * run.step_s[-1])
    return run


def _check_load(run: _Run, args: argparse.Namespace, device: torch.device) -> None:
    import stager

    if run.last_path is None:
        return
    model, opt = make_model(args.size, device, args.seed + 1)
    stager.load_checkpoint(run.last_path, model, opt)
    name = f"dcp.load of the last {run.label} checkpoint (step {run.ckpt_steps[-1]}) into a fresh model"
    run.check(name, _differences(checkpoint_layout(model, opt), run.snapshot))


def _unit(device: torch.device) -> str:
    return "CPU" if device.type == "cpu" else "GPU"


def _device_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    return f"CPU ({torch.get_num_threads()} threads)"


def _row(label: str, *cells: float) -> str:
    """A line of the per-checkpoint table: blocked and inflation seconds of each run, in ms."""
    wrap_b, wrap_i, dflt_b, dflt_i = (1e3 * c for c in cells)
    return f"{label:>11} | {wrap_b:>12.2f} {wrap_i:>+10.2f} | {dflt_b:>21.2f} {dflt_i:>+10.2f}"


def _report(runs: list[_Run], device: torch.device, out: Callable[[str], None]) -> None:
    wrap_run, dflt = runs
    out("")
    out(f"per checkpoint ({_unit(device)} numbers; ms):")
    head = (
        f"{'ckpt':>4} {'step':>6} | {'wrap blocked':>12} {'inflation':>10} | "
        f"{'DefaultStager blocked':>21} {'inflation':>10}"
    )
    out(head)
    out("-" * len(head))
    for i, step in enumerate(wrap_run.ckpt_steps):
        cells = (wrap_run.blocked_s[i], wrap_run.inflation(step), dflt.blocked_s[i], dflt.inflation(step))
        out(_row(f"{i + 1:>4} {step:>6}", *cells))
    if wrap_run.ckpt_steps:
        out("-" * len(head))
        med = statistics.median
        out(_row(
            "median", med(wrap_run.blocked_s), med(wrap_run.inflation(s) for s in wrap_run.ckpt_steps),
            med(dflt.blocked_s), med(dflt.inflation(s) for s in dflt.ckpt_steps),
        ))
    out(
        f"median step without a checkpoint: wrap {1e3 * wrap_run.median_step():.2f} ms, "
        f"DefaultStager {1e3 * dflt.median_step():.2f} ms"
    )
    out("blocked: time checkpoint() / dcp.async_save() kept the training loop waiting (wrap's first")
    out("  checkpoint also builds the plan and allocates the host arena, once per run).")
    out("inflation: (the checkpoint's step + the next step) - 2 x the median step without a checkpoint;")
    out(
        "  the next step is where wrap's optimizer step waits for staging, and where a background write "
        "competes."
    )


def _plot(path: str, runs: list[_Run], device: torch.device) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run, marker in zip(runs, "os"):
        ax.plot(run.ckpt_steps, [1e3 * b for b in run.blocked_s], marker=marker, label=run.label)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"blocked time ({_unit(device)} numbers, ms)")
    ax.set_title(f"stager demo: blocked time per checkpoint, {_device_line(device)}")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tightcheckpoint_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def range_times(trace_path: str | Path, prefix: str = "stager/") -> dict[str, tuple[int, float]]:
    """``{range name: (count, total seconds)}`` of the complete events named ``prefix*`` in a
    Chrome-format trace (what ``torch.profiler``'s ``export_chrome_trace`` writes)."""
    import json

    with open(trace_path, encoding="utf-8") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    times: dict[str, tuple[int, float]] = {}
    for ev in events:
        name = ev.get("name")
        if ev.get("ph") == "X" and isinstance(name, str) and name.startswith(prefix):
            count, total = times.get(name, (0, 0.0))
            times[name] = (count + 1, total + float(ev.get("dur", 0)) * 1e-6)  # dur is in microseconds
    return times


def _trace(
    path: str, args: argparse.Namespace, device: torch.device, root: Path, out: Callable[[str], None]
) -> None:
    from torch.profiler import ProfilerActivity, profile

    import stager

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    kwargs: dict[str, Any] = {}
    try:  # the ranges of the stager's own threads (its writer) are recorded only with this
        from torch._C._profiler import _ExperimentalConfig

        kwargs["experimental_config"] = _ExperimentalConfig(profile_all_threads=True)
    except (ImportError, TypeError):  # pragma: no cover - an older torch: the caller's thread only
        pass
    model, opt = make_model(args.size, device, args.seed)
    handle = stager.wrap(model, opt, nvtx=True)
    try:
        with profile(activities=activities, **kwargs) as prof:
            for i in range(1, _TRACE_CHECKPOINTS + 1):
                train_step(model, opt, i, args.size, device)
                handle.checkpoint(root / "trace" / f"ckpt-{i}")
            train_step(model, opt, _TRACE_CHECKPOINTS + 1, args.size, device)  # waits for the last staging
            handle.wait()
            _sync(device)
    finally:
        handle.close()
    prof.export_chrome_trace(path)
    times = range_times(path)
    out("")
    out(
        f"trace of {_TRACE_CHECKPOINTS} checkpoints: {path} (open it in Perfetto); time per stager/* range "
        f"({_unit(device)} numbers):"
    )
    head = f"{'range':<16} {'count':>5} {'total ms':>10} {'mean ms':>9}"
    out(head)
    out("-" * len(head))
    for name, (count, total) in sorted(times.items(), key=lambda kv: -kv[1][1]):
        out(f"{name:<16} {count:>5} {1e3 * total:>10.3f} {1e3 * total / count:>9.3f}")
    if not times:
        out("(no stager/* range in the trace)")


def _parser() -> argparse.ArgumentParser:
    from stager._cli import Parser  # usage errors on one line

    p = Parser(
        prog="python -m stager demo",
        description="Train a small transformer on synthetic data, checkpointing with stager.wrap and with "
        "dcp.async_save's DefaultStager; compare blocked time and step-time inflation; verify the "
        "checkpoints and the in-memory restore bit-exactly.",
    )
    p.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    p.add_argument("--every", type=int, default=50, help="checkpoint every N steps (default 50)")
    p.add_argument("--device", default="auto", help=f"auto (cuda when available), {_DEVICES}")
    p.add_argument(
        "--size", choices=sorted(SIZES), default=None,
        help="model size (default: small on CPU, large on GPU)",
    )
    p.add_argument(
        "--dir", default=None, help="where checkpoints go (default: a temporary directory, removed)"
    )
    p.add_argument(
        "--plot", default=None, metavar="FILE.png", help="draw blocked time per checkpoint (needs matplotlib)"
    )
    p.add_argument(
        "--trace", default=None, metavar="FILE.json",
        help="also record a few checkpoints with torch.profiler (stager/* ranges on), write the trace "
        "(open it in Perfetto) and print the time per stager/* range",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device: torch.device | None = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device {name!r}: expected auto, {_DEVICES}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available; use --device cpu")
    return device


def _usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments or the environment, found before anything trains."""
    from stager._cli import unusable_directory, unwritable_file
    from stager.config import StagerConfig
    from stager.errors import StagerConfigError

    if args.steps < 1 or args.every < 1:
        return "--steps and --every must be >= 1"
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return (
                "--plot needs matplotlib, which is not installed; "
                "pip install 'stager[plot]' (or pip install matplotlib), or drop --plot"
            )
    try:
        StagerConfig.resolve()  # a bad STAGER_* value stops the demo before it trains
    except StagerConfigError as exc:
        return str(exc)
    # Paths written at the end of the run are checked before it starts.
    if args.plot and (problem := unwritable_file(args.plot)):
        return f"--plot {args.plot!r} {problem}"
    if args.dir is not None and (problem := unusable_directory(args.dir)):
        return f"--dir {args.dir!r} {problem}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0 when every check passed, 1 when one failed, 2 on bad usage."""
    args = _parser().parse_args(argv)
    problem = _usage_problem(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    device = _resolve_device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    args.size = args.size or ("large" if device.type == "cuda" else "small")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        if args.dir is None:
            with tempfile.TemporaryDirectory(prefix="stager-demo-") as tmp:
                return _main(args, device, Path(tmp))
        return _main(args, device, Path(args.dir))


def _main(args: argparse.Namespace, device: torch.device, root: Path) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    import stager

    out = print
    layers, d, heads, vocab, seq, batch = SIZES[args.size]
    model, opt = make_model(args.size, device, args.seed)
    train_step(model, opt, 0, args.size, device)  # creates the optimizer state, to size it
    tensors = tensors_in(checkpoint_layout(model, opt))
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    n_params = sum(p.numel() for p in model.parameters())
    out(f"stager demo on {_device_line(device)}, torch {torch.__version__}")
    out(
        f"model: {args.size} transformer, {layers} layers, d_model {d}, vocab {vocab}, "
        f"~{n_params / 1e6:.1f}M params; checkpoint {format_size(nbytes)} in {len(tensors)} tensors "
        "(model + AdamW state)"
    )
    del model, opt, tensors
    out(f"{args.steps} steps per run, a checkpoint every {args.every} steps, into {root}")
    if device.type == "cpu":
        out(
            "CPU run: staging is synchronous on the CPU (there is no side stream); the writes run in the "
            "background."
        )

    # Process-wide one-time costs (DCP's lazy imports, its writer machinery) are paid here, by
    # neither run, so that the first checkpoint of each run costs only what that run does.
    dcp.async_save({"warm-up": torch.zeros(1)}, checkpoint_id=root / "warm-up", no_dist=True).result()

    # Run 1: stager.wrap.
    model, opt = make_model(args.size, device, args.seed)
    handle = stager.wrap(model, opt)
    try:
        run_wrap = _train("wrap", args, device, root, handle.checkpoint, model, opt)
        handle.wait()
        if run_wrap.snapshot is not None:
            for step in range(args.steps + 1, args.steps + 1 + _EXTRA_STEPS):
                train_step(model, opt, step, args.size, device)
            t0 = time.perf_counter()
            handle.restore()
            restore_ms = 1e3 * (time.perf_counter() - t0)
            run_wrap.check(
                f"in-memory restore to step {run_wrap.ckpt_steps[-1]} after {_EXTRA_STEPS} more steps",
                _differences(checkpoint_layout(model, opt), run_wrap.snapshot),
                f"bit-exact, {restore_ms:.2f} ms",
            )
    finally:
        handle.close()
    del model, opt, handle

    # Run 2: dcp.async_save with DCP's default stager.
    model, opt = make_model(args.size, device, args.seed)
    default = DefaultStager(StagingOptions(False, False, False, False))
    uploads: list[Any] = []

    def save_default(path: Path, m: nn.Module = model, o: torch.optim.Optimizer = opt) -> None:
        state = checkpoint_layout(m, o)
        uploads.append(dcp.async_save(state, checkpoint_id=path, async_stager=default, no_dist=True))

    try:
        run_dflt = _train("DefaultStager", args, device, root, save_default, model, opt)
        for f in uploads:
            getattr(f, "upload_completion", f).result()
    finally:
        default.close()
    del model, opt, save_default

    runs = [run_wrap, run_dflt]
    _report(runs, device, out)
    for run in runs:
        _check_load(run, args, device)

    out("")
    out("checks:")
    ok = True
    for run in runs:
        for name, passed, detail in run.checks:
            ok &= passed
            out(f"  {'PASS' if passed else 'FAIL'}  {name}: {detail}")
    same = run_wrap.losses == run_dflt.losses
    out(
        "  info  loss sequence identical in both runs (checkpointing did not change training): "
        f"{'yes' if same else 'no'}"
    )
    if args.plot:
        _plot(args.plot, runs, device)
        out(f"plot: {args.plot}")
    if args.trace:
        _trace(args.trace, args, device, root, out)
    out("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
