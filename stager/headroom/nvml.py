"""NVML's life cycle (initialised on first use, once, under a lock; a failure remembered, never
retried) and the mapping of a torch device index through ``CUDA_VISIBLE_DEVICES`` to the NVML
handle of the physical device or MIG instance behind it."""

from __future__ import annotations

import os
import threading
from typing import Any


class _NvmlState:
    """NVML's module once initialised, or the reason it is unavailable; decided once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = False
        self.module: Any | None = None
        self.reason: str | None = None
        self.handles: dict[tuple[int, str | None], tuple[Any, str]] = {}
        # (index, CUDA_VISIBLE_DEVICES) -> (max gen, max width, handle of the PCIe device)
        self.links: dict[tuple[int, str | None], tuple[int, int, Any]] = {}
        self.gpu_count: int | None = None

    def get(self) -> Any | None:
        if self.done:  # hot path: no lock once decided
            return self.module
        with self.lock:
            if not self.done:
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self.module = pynvml
                except ImportError as exc:
                    self.reason = f"nvidia-ml-py is not installed ({exc})"
                except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
                    self.reason = f"{exc} ({type(exc).__name__})"
                self.done = True
        return self.module

    def reset(self) -> None:
        """Forget everything, shutting NVML down if it was up (tests only)."""
        with self.lock:
            if self.module is not None:
                try:
                    self.module.nvmlShutdown()  # NVML counts inits; this undoes only ours
                except Exception:
                    pass
            self.done = False
            self.module = None
            self.reason = None
            self.handles.clear()
            self.links.clear()
            self.gpu_count = None


_NVML = _NvmlState()


def nvml_status() -> str:
    """``"NVML available"`` or ``"NVML unavailable: <reason>"``; initialises NVML on first call."""
    if _NVML.get() is not None:
        return "NVML available"
    return f"NVML unavailable: {_NVML.reason}"


def _physical_gpu_count() -> int:
    if _NVML.gpu_count is None:
        nvml = _NVML.get()
        count = 0
        if nvml is not None:
            try:
                count = int(nvml.nvmlDeviceGetCount())
            except Exception:
                count = 0
        _NVML.gpu_count = count
    return _NVML.gpu_count


def parse_visible_devices(value: str | None) -> list[int] | list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as CUDA reads it: ordinals, or UUID strings; None when unset.

    Integer entries are read like ``strtoul`` (``"1gpu"`` is 1); a negative or unparsable entry
    ends the list; a repeated entry makes the whole list empty. A value starting with ``GPU-`` or
    ``MIG-`` is a list of (possibly abbreviated) UUIDs, ending at the first entry without that
    prefix.
    """
    if value is None:
        return None
    value = value.strip()
    for prefix in ("GPU-", "MIG-"):
        if value.startswith(prefix):
            uuids: list[str] = []
            for elem in value.split(","):
                elem = elem.strip()
                if elem in uuids:
                    return []
                if not elem.startswith(prefix):
                    break
                uuids.append(elem)
            return uuids
    ordinals: list[int] = []
    for elem in value.split(","):
        elem = elem.strip()
        digits = ""
        for i, ch in enumerate(elem):
            if ch.isdigit() or (i == 0 and ch in "+-"):
                digits += ch
            else:
                break
        try:
            x = int(digits)
        except ValueError:
            x = -1
        if x < 0:
            break
        if x in ordinals:
            return []
        ordinals.append(x)
    return ordinals


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _uuid_candidates(nvml: Any) -> list[tuple[str, Any]]:
    """(UUID, handle) of every physical GPU and every MIG instance NVML can see."""
    out: list[tuple[str, Any]] = []
    for i in range(int(nvml.nvmlDeviceGetCount())):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        out.append((_as_str(nvml.nvmlDeviceGetUUID(handle)), handle))
        get_count = getattr(nvml, "nvmlDeviceGetMaxMigDeviceCount", None)
        get_mig = getattr(nvml, "nvmlDeviceGetMigDeviceHandleByIndex", None)
        if get_count is None or get_mig is None:
            continue
        try:
            n_mig = int(get_count(handle))
        except Exception:  # not MIG-capable
            continue
        for j in range(n_mig):
            try:
                mig = get_mig(handle, j)
                out.append((_as_str(nvml.nvmlDeviceGetUUID(mig)), mig))
            except Exception:  # an empty MIG slot
                continue
    return out


def nvml_device_handle(index: int, *, nvml: Any, visible_devices: str | None) -> tuple[Any, str]:
    """The NVML handle of the physical device (or MIG instance) behind torch device ``index``.

    ``visible_devices`` is the ``CUDA_VISIBLE_DEVICES`` value (None: every device, NVML index =
    torch index). An ordinal entry maps by ``nvmlDeviceGetHandleByIndex``; a ``GPU-``/``MIG-``
    entry by ``nvmlDeviceGetHandleByUUID``, or, for an abbreviated UUID, by the one device whose
    UUID starts with it. Returns (handle, label naming the physical device). ``nvml`` is the
    ``pynvml`` module or any object with the same functions (tests inject a fake). Raises
    ``ValueError`` when ``index`` is not visible or its entry matches no device or several.
    """
    if index < 0:
        raise ValueError(f"device index must be >= 0, got {index}")
    entries = parse_visible_devices(visible_devices)
    if entries is None:
        return nvml.nvmlDeviceGetHandleByIndex(index), f"NVML index {index}"
    if index >= len(entries):
        raise ValueError(
            f"cuda:{index} is not visible: CUDA_VISIBLE_DEVICES={visible_devices!r} makes "
            f"{len(entries)} device(s) visible ({entries})"
        )
    entry = entries[index]
    if isinstance(entry, int):
        return nvml.nvmlDeviceGetHandleByIndex(entry), (
            f"NVML index {entry} (CUDA_VISIBLE_DEVICES={visible_devices})"
        )
    try:
        return nvml.nvmlDeviceGetHandleByUUID(entry), entry
    except nvml.NVMLError:
        pass  # abbreviated UUID, or an old MIG-GPU-.../gi/ci form: match by prefix
    matches = [(u, h) for u, h in _uuid_candidates(nvml) if u.startswith(entry)]
    if len(matches) != 1:
        what = "matches no device" if not matches else f"is ambiguous ({[u for u, _ in matches]})"
        raise ValueError(f"cuda:{index}: CUDA_VISIBLE_DEVICES entry {entry!r} {what} among NVML's devices")
    return matches[0][1], matches[0][0]


def _cached_handle(nvml: Any, index: int) -> tuple[Any, str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    key = (index, visible)
    hit = _NVML.handles.get(key)
    if hit is None:
        with _NVML.lock:
            hit = _NVML.handles.get(key)
            if hit is None:
                hit = nvml_device_handle(index, nvml=nvml, visible_devices=visible)
                _NVML.handles[key] = hit
    return hit

