"""``python -m stager demo``: train a small transformer, checkpointing with ``wrap`` and with DCP's default.

The same model (built in, synthetic data, no downloads) is trained twice from the same seed:

1. checkpointing every ``--every`` steps through ``stager.wrap`` (``handle.checkpoint(path)``);
2. checkpointing through ``dcp.async_save`` with PyTorch's ``DefaultStager`` as ``async_save``
   uses it when given no stager: ``DefaultStager(StagingOptions(False, False, False, False))``.

It then prints, per checkpoint, how long the training loop was blocked and how much longer the
steps around the checkpoint took than the median step without one, and checks that

* the last checkpoint of each run loads with ``dcp.load`` into a fresh model and optimizer
  bit-exactly (``torch.equal`` against a copy taken when it was saved);
* ``handle.restore()`` rolls the live model back to the last checkpoint bit-exactly after a few
  more steps of training.

Each check prints PASS or FAIL; the exit status is non-zero if any failed. ``--plot FILE.png``
draws the blocked time per checkpoint (needs the optional ``plot`` extra, matplotlib).
``--trace FILE.json`` then trains a few more checkpoints under ``torch.profiler`` with the
``stager/*`` ranges on, writes the trace (Chrome JSON: open it in Perfetto) and prints the time
per ``stager/*`` range read back from it.
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
import torch.nn.functional as F
from torch import nn

from stager.tree import leaves

__all__ = ["TinyLM", "SIZES", "make_batch", "main"]

# name -> (layers, d_model, heads, vocab, seq, batch)
SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (2, 64, 4, 256, 32, 8),
    "small": (4, 128, 4, 1024, 64, 8),
    "large": (8, 1024, 16, 16384, 256, 8),
}
_EXTRA_STEPS = 3  # steps trained past the last checkpoint before the in-memory restore
_TRACE_CHECKPOINTS = 3  # checkpoints (one training step each) recorded by --trace


# ------------------------------------------------------------------------------------ the model


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # (b, t, 3d) -> 3 x (b, heads, t, d/heads)
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyLM(nn.Module):
    """A small pre-norm decoder-only transformer with tied embeddings.

    It has a persistent buffer that every forward updates in place (``tokens_seen``), so the
    checkpoint holds parameters, tied parameters, buffers and optimizer state.
    """

    def __init__(self, layers: int, d: int, heads: int, vocab: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.int64))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self.tokens_seen += idx.numel()
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def make_batch(step: int, batch: int, seq: int, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences ``x[t+1] = (a * x[t] + b) mod vocab`` with random ``a``, ``b`` per row; deterministic per step."""
    g = torch.Generator().manual_seed(10_000 + step)
    a = torch.randint(1, 8, (batch, 1), generator=g) * 2 - 1
    b = torch.randint(0, vocab, (batch, 1), generator=g)
    x = torch.empty(batch, seq + 1, dtype=torch.int64)
    x[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
    for t in range(seq):
        x[:, t + 1] = (a[:, 0] * x[:, t] + b[:, 0]) % vocab
    x = x.to(device)
    return x[:, :-1], x[:, 1:]


def _make(size: str, device: torch.device, seed: int) -> tuple[TinyLM, torch.optim.Optimizer]:
    layers, d, heads, vocab, seq, _ = SIZES[size]
    torch.manual_seed(seed)
    model = TinyLM(layers, d, heads, vocab, seq).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    return model, opt


def _train_step(model: TinyLM, opt: torch.optim.Optimizer, step: int, size: str, device: torch.device) -> torch.Tensor:
    _, _, _, vocab, seq, batch = SIZES[size]
    x, y = make_batch(step, batch, seq, vocab, device)
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _layout(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def _differences(got: Any, want: Any) -> list[str]:
    """Key paths where ``got`` and ``want`` differ (tensors by ``torch.equal``)."""
    g, w = dict(leaves(got)), dict(leaves(want))
    bad = sorted(set(g) ^ set(w))
    for k in sorted(set(g) & set(w)):
        a, b = g[k], w[k]
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
        else:
            same = a == b
        if not same:
            bad.append(k)
    return bad


# ------------------------------------------------------------------------------------ progress


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


# ------------------------------------------------------------------------------------ one run


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


def _train(
    label: str,
    args: argparse.Namespace,
    device: torch.device,
    root: Path,
    checkpoint: Callable[[nn.Module, torch.optim.Optimizer, Path], None],
    model: nn.Module,
    opt: torch.optim.Optimizer,
) -> _Run:
    run = _Run(label)
    bar = _Bar(args.steps, label, not args.no_progress)
    last_ckpt = args.steps // args.every * args.every
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        loss = _train_step(model, opt, step, args.size, device)
        if step % args.every == 0:
            path = root / label / f"step-{step:06d}"
            tb = time.perf_counter()
            checkpoint(model, opt, path)
            run.blocked_s.append(time.perf_counter() - tb)
            run.ckpt_steps.append(step)
            run.last_path = path
        _sync(device)
        run.step_s.append(time.perf_counter() - t0)
        run.losses.append(float(loss))
        if step == last_ckpt:
            run.snapshot = copy.deepcopy(_layout(model, opt))
        bar.update(step, run.losses[-1], 1e3 * run.step_s[-1])
    return run


def _check_load(run: _Run, args: argparse.Namespace, device: torch.device) -> None:
    import stager

    if run.last_path is None:
        return
    model, opt = _make(args.size, device, args.seed + 1)
    stager.load_checkpoint(run.last_path, model, opt)
    bad = _differences(_layout(model, opt), run.snapshot)
    step = run.ckpt_steps[-1]
    detail = "bit-exact" if not bad else f"{len(bad)} entries differ, first {bad[0]}"
    run.checks.append((f"dcp.load of the last {run.label} checkpoint (step {step}) into a fresh model", not bad, detail))


# ------------------------------------------------------------------------------------ report


def _device_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    return f"CPU ({torch.get_num_threads()} threads)"


def _report(runs: list[_Run], device: torch.device, out: Callable[[str], None]) -> None:
    unit = "CPU" if device.type == "cpu" else "GPU"
    wrap_run, dflt = runs
    out("")
    out(f"per checkpoint ({unit} numbers; ms):")
    head = f"{'ckpt':>4} {'step':>6} | {'wrap blocked':>12} {'inflation':>10} | {'DefaultStager blocked':>21} {'inflation':>10}"
    out(head)
    out("-" * len(head))
    for i, step in enumerate(wrap_run.ckpt_steps):
        out(
            f"{i + 1:>4} {step:>6} | {1e3 * wrap_run.blocked_s[i]:>12.2f} {1e3 * wrap_run.inflation(step):>+10.2f} | "
            f"{1e3 * dflt.blocked_s[i]:>21.2f} {1e3 * dflt.inflation(step):>+10.2f}"
        )
    if wrap_run.ckpt_steps:
        out("-" * len(head))
        med = statistics.median
        out(
            f"{'median':>11} | {1e3 * med(wrap_run.blocked_s):>12.2f} "
            f"{1e3 * med(wrap_run.inflation(s) for s in wrap_run.ckpt_steps):>+10.2f} | "
            f"{1e3 * med(dflt.blocked_s):>21.2f} {1e3 * med(dflt.inflation(s) for s in dflt.ckpt_steps):>+10.2f}"
        )
    out(
        f"median step without a checkpoint: wrap {1e3 * wrap_run.median_step():.2f} ms, "
        f"DefaultStager {1e3 * dflt.median_step():.2f} ms"
    )
    out("blocked: time checkpoint() / dcp.async_save() kept the training loop waiting (wrap's first")
    out("  checkpoint also builds the plan and allocates the host arena, once per run).")
    out("inflation: (the checkpoint's step + the next step) - 2 x the median step without a checkpoint;")
    out("  the next step is where wrap's optimizer step waits for staging, and where a background write competes.")


def _plot(path: str, runs: list[_Run], device: torch.device) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run, marker in zip(runs, "os"):
        ax.plot(run.ckpt_steps, [1e3 * b for b in run.blocked_s], marker=marker, label=run.label)
    unit = "CPU" if device.type == "cpu" else "GPU"
    ax.set_xlabel("training step")
    ax.set_ylabel(f"blocked time ({unit} numbers, ms)")
    ax.set_title(f"stager demo: blocked time per checkpoint, {_device_line(device)}")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------ trace


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


def _trace(path: str, args: argparse.Namespace, device: torch.device, root: Path, out: Callable[[str], None]) -> None:
    from torch.profiler import ProfilerActivity, profile

    import stager

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    kwargs: dict[str, Any] = {}
    try:  # the ranges of the stager's own threads (its writer) are recorded only with this
        from torch._C._profiler import _ExperimentalConfig

        kwargs["experimental_config"] = _ExperimentalConfig(profile_all_threads=True)
    except (ImportError, TypeError):  # pragma: no cover - an older torch: the caller's thread only
        pass
    model, opt = _make(args.size, device, args.seed)
    handle = stager.wrap(model, opt, nvtx=True)
    try:
        with profile(activities=activities, **kwargs) as prof:
            for i in range(1, _TRACE_CHECKPOINTS + 1):
                _train_step(model, opt, i, args.size, device)
                handle.checkpoint(root / "trace" / f"ckpt-{i}")
            _train_step(model, opt, _TRACE_CHECKPOINTS + 1, args.size, device)  # waits for the last staging
            handle.wait()
            _sync(device)
    finally:
        handle.close()
    prof.export_chrome_trace(path)
    times = range_times(path)
    unit = "CPU" if device.type == "cpu" else "GPU"
    out("")
    out(f"trace of {_TRACE_CHECKPOINTS} checkpoints: {path} (open it in Perfetto); time per stager/* range ({unit} numbers):")
    head = f"{'range':<16} {'count':>5} {'total ms':>10} {'mean ms':>9}"
    out(head)
    out("-" * len(head))
    for name, (count, total) in sorted(times.items(), key=lambda kv: -kv[1][1]):
        out(f"{name:<16} {count:>5} {1e3 * total:>10.3f} {1e3 * total / count:>9.3f}")
    if not times:
        out("(no stager/* range in the trace)")


# ------------------------------------------------------------------------------------ main


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
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="model size (default: small on CPU, large on GPU)")
    p.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary directory, removed)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="draw blocked time per checkpoint (needs matplotlib)")
    p.add_argument("--trace", default=None, metavar="FILE.json",
                   help="also record a few checkpoints with torch.profiler (stager/* ranges on), write the trace "
                   "(open it in Perfetto) and print the time per stager/* range")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available; use --device cpu")
    return device


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0 when every check passed, 1 when one failed, 2 on bad usage."""
    args = _parser().parse_args(argv)
    if args.steps < 1 or args.every < 1:
        print("error: --steps and --every must be >= 1", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                "error: --plot needs matplotlib, which is not installed; "
                "pip install 'stager[plot]' (or pip install matplotlib), or drop --plot",
                file=sys.stderr,
            )
            return 2
    from stager._cli import unusable_directory, unwritable_file
    from stager.config import StagerConfig
    from stager.errors import StagerConfigError

    try:
        StagerConfig.resolve()  # a bad STAGER_* value stops the demo before it trains
    except StagerConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Paths written at the end of the run are checked before it starts.
    if args.plot and (problem := unwritable_file(args.plot)):
        print(f"error: --plot {args.plot!r} {problem}", file=sys.stderr)
        return 2
    if args.dir is not None and (problem := unusable_directory(args.dir)):
        print(f"error: --dir {args.dir!r} {problem}", file=sys.stderr)
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
    model, opt = _make(args.size, device, args.seed)
    _train_step(model, opt, 0, args.size, device)  # creates the optimizer state, to size it
    tensors = dict(leaves(_layout(model, opt)))
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values() if isinstance(t, torch.Tensor))
    n_tensors = sum(isinstance(t, torch.Tensor) for t in tensors.values())
    n_params = sum(p.numel() for p in model.parameters())
    del model, opt, tensors
    out(f"stager demo on {_device_line(device)}, torch {torch.__version__}")
    out(
        f"model: {args.size} transformer, {layers} layers, d_model {d}, vocab {vocab}, ~{n_params / 1e6:.1f}M params; "
        f"checkpoint {nbytes / 2**20:.1f} MiB in {n_tensors} tensors (model + AdamW state)"
    )
    out(f"{args.steps} steps per run, a checkpoint every {args.every} steps, into {root}")
    if device.type == "cpu":
        out("CPU run: staging is synchronous on the CPU (there is no side stream); the writes run in the background.")

    # Process-wide one-time costs (DCP's lazy imports, its writer machinery) are paid here, by
    # neither run, so that the first checkpoint of each run costs only what that run does.
    dcp.async_save({"warm-up": torch.zeros(1)}, checkpoint_id=root / "warm-up", no_dist=True).result()

    # Run 1: stager.wrap.
    model, opt = _make(args.size, device, args.seed)
    handle = stager.wrap(model, opt)
    checkpoint = handle.checkpoint
    try:
        run_wrap = _train("wrap", args, device, root, lambda m, o, p: checkpoint(p), model, opt)
        handle.wait()
        if run_wrap.snapshot is not None:
            for step in range(args.steps + 1, args.steps + 1 + _EXTRA_STEPS):
                _train_step(model, opt, step, args.size, device)
            t0 = time.perf_counter()
            handle.restore()
            restore_ms = 1e3 * (time.perf_counter() - t0)
            bad = _differences(_layout(model, opt), run_wrap.snapshot)
            detail = f"bit-exact, {restore_ms:.2f} ms" if not bad else f"{len(bad)} entries differ, first {bad[0]}"
            run_wrap.checks.append(
                (f"in-memory restore to step {run_wrap.ckpt_steps[-1]} after {_EXTRA_STEPS} more steps", not bad, detail)
            )
    finally:
        handle.close()
    del model, opt, handle, checkpoint

    # Run 2: dcp.async_save with DCP's default stager.
    model, opt = _make(args.size, device, args.seed)
    default = DefaultStager(StagingOptions(False, False, False, False))
    uploads: list[Any] = []

    def save_default(m: nn.Module, o: torch.optim.Optimizer, path: Path) -> None:
        uploads.append(dcp.async_save(_layout(m, o), checkpoint_id=path, async_stager=default, no_dist=True))

    try:
        run_dflt = _train("DefaultStager", args, device, root, save_default, model, opt)
        for f in uploads:
            getattr(f, "upload_completion", f).result()
    finally:
        default.close()
    del model, opt

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
    out(f"  info  loss sequence identical in both runs (checkpointing did not change training): {'yes' if same else 'no'}")
    if args.plot:
        _plot(args.plot, runs, device)
        out(f"plot: {args.plot}")
    if args.trace:
        _trace(args.trace, args, device, root, out)
    out("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
