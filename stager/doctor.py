"""``python -m stager doctor``: what this machine offers the stager, and what a stage would do now.

Prints versions (Python, torch, Triton, CUDA, driver), the GPUs and NVML's state, the PCIe link,
host and device headroom with the source of every figure, where a program reads the host memory
its stager holds, the profile and every ``STAGER_*`` value with its source, stager's files in
``/dev/shm`` (owner, size, whether the owner still holds its lock, what is reclaimable;
``--reclaim`` removes the stale ones), and the path a stage of ``--bytes`` (default 1 GiB, of
which ``--small-fraction`` is small tensors) would take right now.
"""

from __future__ import annotations

import os
import platform
import time
import warnings
from typing import Mapping

import torch

from stager.config import StagerConfig, describe_unknown, load_profile, unknown_variables
from stager.envs import KNOBS, Mode, format_size, parse_size
from stager.errors import StagerConfigError, StagerConfigWarning, StagingMemoryError

__all__ = ["report", "resolve_reporting", "main"]


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception as exc:  # pragma: no cover - triton is a Linux dependency
        return f"absent ({type(exc).__name__})"


def _driver_version() -> str:
    from stager.headroom.nvml import _NVML, nvml_status

    nvml = _NVML.get()
    if nvml is None:
        return nvml_status()
    try:
        version = nvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception as exc:  # pragma: no cover - needs a driver
        return f"unknown ({exc})"


def resolve_reporting(environ: Mapping[str, str] | None = None) -> tuple[StagerConfig, list[str]]:
    """The configuration with every bad ``STAGER_*`` value left out, and one line per problem.

    Where :meth:`StagerConfig.resolve` stops at the first bad value, the doctor names each one,
    with the variable it came from and the value used instead, and goes on. Variables that
    nothing reads (misspellings) are listed too, instead of warned about.
    """
    env = dict(os.environ if environ is None else environ)
    bad: list[tuple[str, str]] = []
    for knob in KNOBS:
        if knob.env not in env:
            continue
        try:
            value = knob.convert(env[knob.env], knob.env)
            if knob.field == "profile":
                load_profile(value)
        except StagerConfigError as exc:
            bad.append((knob.field, str(exc)))
            del env[knob.env]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StagerConfigWarning)
        cfg = StagerConfig.resolve(environ=env)
    problems = []
    shown = {name: (value, source) for name, value, source in cfg.describe()}
    for field, message in bad:
        value, source = shown[next(k.env for k in KNOBS if k.field == field)]
        problems.append(f"{message}; using {value} ({source}) below")
    problems += [describe_unknown(name, closest) for name, closest in unknown_variables(environ)]
    return cfg, problems


_SHM_STATES = {
    "live": "lock held: in use",
    "stale": "no lock held: its owner is gone, reclaimable",
    "new": "being created (or stale, under a minute old)",
    "unreadable": "another user's file (its lock cannot be probed)",
}


def shm_lines(shm_dir: str | None = None) -> list[str]:
    """Stager's files in the shared-memory directory: owner, size, and what is reclaimable."""
    from stager import arena, shm

    where = shm_dir or arena.SHM_DIR
    lines = [f"shared memory ({where}):"]
    try:
        st = os.statvfs(where)
    except OSError as exc:
        return lines + [f"  not usable ({exc}); shared-memory arenas (STAGER_SHARED_MEMORY=1) would fail"]
    free, total = format_size(st.f_bavail * st.f_frsize), format_size(st.f_blocks * st.f_frsize)
    lines.append(f"  {free} free of {total} (statvfs)")
    files = shm.scan(where)
    if not files:
        return lines + ["  no stager arena files"]
    for f in files:
        owner = "pid unknown" if f.pid is None else f"pid {f.pid}" + (" (this process)" if f.mine else "")
        name, state = os.path.basename(f.path), _SHM_STATES[f.state]
        lines.append(f"  {name}  {format_size(f.nbytes)}, {owner}, {state}")
    stale = [f for f in files if f.reclaimable]
    if stale:
        lines.append(
            f"  {len(stale)} stale file(s) of {format_size(sum(f.nbytes for f in stale))} reclaimable: "
            "the next process that creates a shared arena removes them, or run "
            "python -m stager doctor --reclaim"
        )
    else:
        lines.append("  nothing to reclaim")
    return lines


def report(
    nbytes: int = 1 << 30,
    small_fraction: float = 0.1,
    config: StagerConfig | None = None,
    *,
    shm_dir: str | None = None,
) -> list[str]:
    """The doctor's lines (also used by tests). A bad ``STAGER_*`` or ``LOCAL_WORLD_SIZE`` value is
    reported (under "configuration problems") and the rest of the report goes on without it."""
    from stager import headroom

    cfg, problems = (config, []) if config is not None else resolve_reporting()
    ranks: int | None = None
    try:
        headroom.local_world_size()
    except StagerConfigError as exc:
        problems.append(f"{exc}; assuming 1 rank on this host below")
        ranks = 1
    lines = [
        "versions:",
        f"  python {platform.python_version()}, torch {torch.__version__}, triton {_triton_version()}",
        f"  CUDA runtime {torch.version.cuda or 'none (CPU build)'}, driver {_driver_version()}",
        f"  NVML: {headroom.nvml_status()}",
    ]
    cuda = torch.cuda.is_available()
    if cuda:
        for i in range(torch.cuda.device_count()):
            lines.append(f"  cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        lines.append("  GPU: none (torch.cuda.is_available() is False); staging runs the CPU path")

    if problems:
        lines.append(f"configuration problems ({len(problems)}):")
        lines += [f"  {p}" for p in problems]

    t0 = time.perf_counter()
    reading = headroom.read_headroom(
        torch.cuda.current_device() if cuda else None,
        shared_memory=cfg.shared_memory,
        reserve_bytes=cfg.host_reserve,
        ranks_per_host=ranks,
    )
    took = time.perf_counter() - t0
    lines.append(f"headroom (one reading took {took * 1e3:.3f} ms):")
    lines += [f"  {line}" for line in reading.describe()]
    lines.append(
        "  held by a stager: none in this process (a fresh doctor holds no arena); a program reads its "
        "own with GraphStager.host_bytes() -> HostBytes(total, pinned), and every StageStats records "
        "host_bytes and pinned_bytes"
    )

    lines.append(f"configuration (profile {cfg.profile!r}):")
    width = max(len(name) for name, _, _ in cfg.describe())
    lines += [f"  {name:<{width}} = {value:<12} ({source})" for name, value, source in cfg.describe()]

    lines += shm_lines(shm_dir)

    lines.append(f"a stage of {format_size(nbytes)} now ({small_fraction:.0%} in small tensors):")
    try:
        host = headroom.decide_host(
            nbytes,
            cached_arenas=0,
            max_cached_arenas=cfg.max_arenas,
            host=reading.host,
            cache_policy=cfg.cache_policy,
            lease_policy=cfg.lease_policy,
        )
        lines.append(f"  host arena: {host.value}")
    except StagingMemoryError as exc:
        lines.append(f"  host arena: would fail: {exc}")
    pinned = cfg.pinned is Mode.ON or (cfg.pinned is Mode.AUTO and cuda)
    shared = "yes" if cfg.shared_memory else "no"
    lines.append(f"  pinned: {'yes' if pinned and cuda else 'no'}; shared memory: {shared}")
    if reading.device is not None:
        small = int(nbytes * small_fraction)
        dev = headroom.decide_device(small, cfg.chunk_size, reading.device, cfg.device_reserve)
        lines.append(f"  device: {dev.mode.value} (chunk {format_size(dev.chunk_bytes)}): {dev.reason}")
        graphs = cfg.graphs is not Mode.OFF
        lines.append(f"  executor: {'CUDA graph (capture once, then replay)' if graphs else 'eager'}")
    else:
        lines.append(
            "  device: none; CPU sources are copied with _foreach_copy_ (split over threads when many)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m stager doctor``."""
    from stager._cli import Parser

    parser = Parser(prog="python -m stager doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", default="1GiB", help="size of the hypothetical stage (default 1GiB)")
    parser.add_argument("--small-fraction", type=float, default=0.1, help="share of small tensors (0-1)")
    parser.add_argument(
        "--reclaim", action="store_true",
        help="first remove stager's /dev/shm files whose owner is gone (as the next shared arena would)",
    )
    args = parser.parse_args(argv)
    try:
        nbytes = parse_size(args.bytes)
    except ValueError:
        parser.error(f"--bytes {args.bytes!r} is not a size such as 512MiB or 2GiB")
    if not 0 <= args.small_fraction <= 1:
        parser.error("--small-fraction must be between 0 and 1")
    if args.reclaim:
        from stager import arena, shm

        done = shm.reclaim_stale(arena.SHM_DIR)
        print(f"reclaimed {done.files} stale file(s) of {format_size(done.nbytes)} in {arena.SHM_DIR}")
    print("\n".join(report(nbytes, args.small_fraction)))
    return 0
