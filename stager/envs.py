"""Every ``STAGER_*`` environment variable, declared once: type, default, accepted form, doc.

Values are read once, when a :class:`~stager.config.StagerConfig` resolves, never on the hot path.
A bad value raises :class:`~stager.errors.StagerConfigError` naming the variable, the value and
the accepted form. Booleans are exactly ``0`` or ``1``. Sizes accept a plain byte count or a
number with a binary unit: ``512``, ``64KiB``, ``64MiB``, ``1.5GiB`` (also ``K``/``M``/``G``).
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from stager.errors import StagerConfigError
from stager.nvtx import CheckpointSet, parse_checkpoints

__all__ = [
    "Knob", "KNOBS", "KNOBS_BY_FIELD", "OTHER_VARIABLES", "Mode", "CachePolicy", "LeasePolicy", "parse_size",
    "format_size",
]


class Mode(str, enum.Enum):
    """Tri-state switch for a feature that depends on the machine."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class CachePolicy(str, enum.Enum):
    """Which host arena a ``stage()`` call may use."""

    AUTO = "auto"  # cached arenas while the host has room, fresh ones otherwise
    CACHED = "cached"  # only persistent arenas (wait or fail if none is free)
    FRESH = "fresh"  # a new arena for every call, freed when its staged dict is released


class LeasePolicy(str, enum.Enum):
    """What ``stage()`` does when the cached arena is still held by an earlier staged dict."""

    WAIT = "wait"  # wait for the holder to release it, up to the lease timeout
    ALLOCATE = "allocate"  # take another arena (cached up to max_arenas, else fresh)


_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Parse ``"64MiB"``-style sizes into bytes; raises ``ValueError`` on anything else."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r}")
    number, unit, _ = m.groups()
    value = float(number) * _UNITS[unit.upper()]
    if value != math.floor(value):
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(value)


def format_size(nbytes: float) -> str:
    """Format a byte count with a binary unit, for messages and tables."""
    n = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def _parse_bool(text: str) -> bool:
    if text == "1":
        return True
    if text == "0":
        return False
    raise ValueError(text)


def _enum_parser(cls: type[enum.Enum]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return cls(str(text).strip().lower())

    return parse


def _parse_positive_int(text: str) -> int:
    value = int(str(text).strip())
    if value < 1:
        raise ValueError(text)
    return value


def _parse_nonneg_float(text: str) -> float:
    value = float(str(text).strip())
    if not value >= 0 or math.isinf(value):
        raise ValueError(text)
    return value


def _parse_power_of_two_size(text: str) -> int:
    value = parse_size(text)
    if value < 1 or value & (value - 1):
        raise ValueError(text)
    return value


class _OutOfRange(ValueError):
    """A value of the right form but outside the accepted range; the message says why."""


MIN_ALIGNMENT = 16
"""Smallest region alignment: the largest element (complex128) is 16 bytes, and a tensor whose
address is not a multiple of its element size crashes vectorised CPU kernels."""
MAX_ALIGNMENT = 2 << 20
"""Largest region alignment (a huge page): beyond it the padding only wastes host memory."""


def _parse_alignment(text: str) -> int:
    value = _parse_power_of_two_size(text)
    if value < MIN_ALIGNMENT:
        raise _OutOfRange(
            f"the smallest alignment allowed is {MIN_ALIGNMENT} (a complex128 tensor below it sits at "
            "an address that is not a multiple of its 16-byte element and can crash the process)"
        )
    if value > MAX_ALIGNMENT:
        raise _OutOfRange(
            f"the largest alignment allowed is {format_size(MAX_ALIGNMENT)} ({MAX_ALIGNMENT} bytes, a huge "
            "page); a larger one only pads every region with unused host memory"
        )
    return value


def _parse_positive_size(text: str) -> int:
    value = parse_size(text)
    if value < 1:
        raise ValueError(text)
    return value


@dataclass(frozen=True)
class Knob:
    """One tunable: its config field, its environment variable and how to read it."""

    field: str
    env: str
    default: Any
    form: str
    doc: str
    parse: Callable[[str], Any]

    def convert(self, raw: Any, origin: str) -> Any:
        """Convert ``raw`` (a string from the environment, or a value from a profile or keyword).

        ``origin`` names where the value came from (``STAGER_X``, ``profile 'p'``, ``keyword``),
        for the error message.
        """
        is_bool_knob = isinstance(self.default, bool)
        form = self.form + (" (or True/False)" if is_bool_knob and not origin.startswith("STAGER_") else "")
        if isinstance(raw, str):
            text = raw
        elif isinstance(raw, enum.Enum):
            text = str(raw.value)
        elif isinstance(raw, bool):
            if not is_bool_knob:
                raise StagerConfigError(f"{origin}={raw!r} is invalid; expected {form}")
            text = "1" if raw else "0"
        elif isinstance(raw, (int, float)):
            text = str(raw)
        else:
            raise StagerConfigError(f"{origin}: got {raw!r} of type {type(raw).__name__}; expected {form}")
        try:
            return self.parse(text)
        except _OutOfRange as exc:
            raise StagerConfigError(f"{origin}={text!r} is invalid: {exc}; expected {form}") from None
        except (ValueError, TypeError):
            raise StagerConfigError(f"{origin}={text!r} is invalid; expected {form}") from None


KNOBS: tuple[Knob, ...] = (
    Knob("profile", "STAGER_PROFILE", "default",
         "a profile name from profiles/ (default, low_memory, throughput)",
         "Tuning preset applied under the environment and explicit arguments.", str),
    Knob("async_staging", "STAGER_ASYNC", False, "0 or 1",
         "When 1, stage() returns a concurrent.futures.Future of the staged dict.", _parse_bool),
    Knob("pinned", "STAGER_PINNED", Mode.AUTO, "auto, on or off",
         "Pin the host arena (auto: when CUDA is available).", _enum_parser(Mode)),
    Knob("shared_memory", "STAGER_SHARED_MEMORY", False, "0 or 1",
         "Put the host arena in shared memory (/dev/shm) for process-based writers.", _parse_bool),
    Knob("cache_policy", "STAGER_CACHE_POLICY", CachePolicy.AUTO, "auto, cached or fresh",
         "Reuse persistent arenas (cached), allocate per call (fresh), or choose by headroom (auto).",
         _enum_parser(CachePolicy)),
    Knob("lease_policy", "STAGER_LEASE_POLICY", LeasePolicy.ALLOCATE, "wait or allocate",
         "When the cached arena is still held: wait for it, or allocate another.", _enum_parser(LeasePolicy)),
    Knob("lease_timeout", "STAGER_LEASE_TIMEOUT", 300.0, "seconds, a number >= 0",
         "How long stage() waits for a held arena before raising LeaseTimeoutError.", _parse_nonneg_float),
    Knob("max_arenas", "STAGER_MAX_ARENAS", 2, "an integer >= 1",
         "Most persistent (cached) host arenas kept at once.", _parse_positive_int),
    Knob("max_plans", "STAGER_MAX_PLANS", 3, "an integer >= 1",
         "Most plans kept at once, so that state dicts staged in turn (model only and full, an EMA "
         "copy) each replay their own plan; each plan keeps its source storages alive.",
         _parse_positive_int),
    Knob("alignment", "STAGER_ALIGNMENT", 256, "a power of two size from 16 to 2MiB such as 64 or 4KiB",
         "Byte alignment of every region in the host arena and the device chunks.", _parse_alignment),
    Knob("pack_threshold", "STAGER_PACK_THRESHOLD", 1 << 20, "a size such as 1MiB",
         "Regions smaller than this are packed on the device; larger ones are copied directly.", parse_size),
    Knob("chunk_size", "STAGER_CHUNK_SIZE", 64 << 20, "a size > 0 such as 64MiB",
         "Size of each device staging chunk that small regions are packed into.", _parse_positive_size),
    Knob("replay_pieces", "STAGER_REPLAY_PIECES", 1, "an integer >= 1",
         "Replay the staging program in this many pieces, to hold the copy engine in shorter bursts.",
         _parse_positive_int),
    Knob("graphs", "STAGER_GRAPHS", Mode.AUTO, "auto, on or off",
         "Capture the device staging program as a CUDA graph (auto: when CUDA is available).",
         _enum_parser(Mode)),
    Knob("triton", "STAGER_TRITON", Mode.AUTO, "auto, on or off",
         "Pack small regions with the Triton kernel (auto: when Triton and CUDA are available).",
         _enum_parser(Mode)),
    Knob("checksum", "STAGER_CHECKSUM", Mode.AUTO, "auto, on or off",
         "Checksum every staged region and saved tensor (stager-lanes64): on everywhere (GPU "
         "sources in the staging program's kernels, inside its CUDA graph; a CPU pass after the "
         "copy for CPU sources); auto takes none anywhere until the GPU path is measured; off "
         "never. Stored checksums are always verified.", _enum_parser(Mode)),
    Knob("nvtx", "STAGER_NVTX", False, "0 or 1",
         "Emit profiler ranges (stager/plan, stager/replay, ...) for torch.profiler and nsys.", _parse_bool),
    Knob("profile_checkpoints", "STAGER_PROFILE_CHECKPOINTS", CheckpointSet(),
         "none, or checkpoint numbers counted from 1 such as 2, 2-3 or 1,4-5",
         "Bracket these checkpoints with cudaProfilerStart/Stop for nsys --capture-range=cudaProfilerApi.",
         parse_checkpoints),
    Knob("host_reserve", "STAGER_HOST_RESERVE", 1 << 30, "a size such as 2GiB",
         "Host memory left untouched for the rest of the process and the host.", parse_size),
    Knob("device_reserve", "STAGER_DEVICE_RESERVE", 512 << 20, "a size such as 512MiB",
         "Device memory left untouched when sizing staging chunks.", parse_size),
)

KNOBS_BY_FIELD: dict[str, Knob] = {k.field: k for k in KNOBS}

OTHER_VARIABLES: frozenset[str] = frozenset()
"""``STAGER_*`` variables the project reads outside :data:`KNOBS` (never reported as unknown).
A module that reads such a variable adds its name here."""
