"""In-memory restore: copy a staged copy back into the live tensors, in place, bit-exact.

``restore_state(staged, into)`` pairs the tensors by key path (README.md, "In-memory restore").
Live CUDA tensors under the pack threshold go to the device in runs of at most one chunk
(``STAGER_CHUNK_SIZE``) through one reused device buffer, one ``unpack_scatter`` launch each,
straight from the pinned arena when a run lies in it, else packed on the host first; larger,
non-contiguous or partly overlapping tensors are copied one by one. A staged copy with checksums
is verified first. Only tensors are restored; ``WrapHandle.restore`` restores the optimizer's
non-tensor state itself.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Sequence

import torch

from stager import nvtx
from stager.errors import RestoreMismatchError
from stager.stats import DevicePath, Executor, StageStats
from stager.tree import holds_tensor

__all__ = ["RestoreMismatchError", "match_tensors", "restore_state"]

_ALIGN = 16  # packed-buffer offsets of the host-packed path: keeps the kernel's 16-byte path open


def _describe(t: torch.Tensor) -> str:
    return f"dtype={t.dtype}, shape={tuple(t.shape)}, device={t.device}"


def match_tensors(staged: Any, into: Any, path: str = "") -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """``(staged, live, key path)`` for every tensor leaf, checking that the structures match.

    Raises:
        RestoreMismatchError: a key, length, container type, shape or dtype differs; the message
            names the key path (``state_dict['model']['fc.weight']``).
    """
    out: list[tuple[torch.Tensor, torch.Tensor, str]] = []
    _match(staged, into, path, out)
    return out


def _mismatch(path: str, problem: str) -> RestoreMismatchError:
    return RestoreMismatchError(
        f"cannot restore state_dict{path or ''}: {problem}; restore into a state dict of the same "
        "structure as the staged copy (the model and optimizer it was staged from)"
    )


def _match(s: Any, t: Any, path: str, out: list[tuple[torch.Tensor, torch.Tensor, str]]) -> None:
    s_tensor, t_tensor = isinstance(s, torch.Tensor), isinstance(t, torch.Tensor)
    if s_tensor or t_tensor:
        if not (s_tensor and t_tensor):
            got = _describe(t) if t_tensor else type(t).__name__
            want = _describe(s) if s_tensor else type(s).__name__
            raise _mismatch(path, f"the staged copy has {want} but the target has {got}")
        if s.dtype != t.dtype or s.shape != t.shape:
            raise _mismatch(path, f"the staged copy has {_describe(s)} but the target has {_describe(t)}")
        if t.device.type == "meta":
            what = f"the target is a meta tensor ({_describe(t)}) with no memory to restore into"
            raise _mismatch(path, what)
        out.append((s, t, path))
        return
    if not (holds_tensor(s) or holds_tensor(t)):
        return  # no tensor on either side: nothing to restore here, whatever its shape
    s_cls, t_cls = type(s).__name__, type(t).__name__  # for the messages below
    if isinstance(s, Mapping):
        if not isinstance(t, Mapping):
            raise _mismatch(path, f"the staged copy has a {s_cls} but the target has {t_cls}")
        if s.keys() != t.keys():
            missing = [k for k in s if k not in t]
            extra = [k for k in t if k not in s]
            raise _mismatch(
                path, f"keys differ: missing in the target {missing[:5]}, only in the target {extra[:5]}"
            )
        for k, v in s.items():
            _match(v, t[k], f"{path}[{k!r}]", out)
    elif isinstance(s, (list, tuple)):
        if not isinstance(t, (list, tuple)) or len(s) != len(t):
            got = f"{t_cls} of length {len(t)}" if isinstance(t, (list, tuple)) else t_cls
            want = f"a {s_cls} of length {len(s)}"
            raise _mismatch(path, f"the staged copy has {want} but the target has {got}")
        for i, (a, b) in enumerate(zip(s, t)):
            _match(a, b, f"{path}[{i}]", out)
    elif isinstance(t, (Mapping, list, tuple)):
        raise _mismatch(path, f"the staged copy has a {s_cls} but the target has a {t_cls}")
    # Any other leaf holds no tensor we restore (see the module docstring).


def _writable_pair(s: torch.Tensor, t: torch.Tensor, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(source, target)`` views that copy ``s`` into ``t`` bit for bit.

    A target broadcast along a dimension (stride 0, as ``expand`` makes) holds one element there:
    both sides are narrowed to it. ``bool`` goes through ``uint8`` views, since a bool copy
    normalises bytes other than 0 and 1. A target whose elements overlap otherwise cannot be
    written element by element.
    """
    for d, (n, stride) in enumerate(zip(t.shape, t.stride())):
        if stride == 0 and n > 1:
            s, t = s.narrow(d, 0, 1), t.narrow(d, 0, 1)
    if t.numel() > 1 and torch._debug_has_internal_overlap(t) == 1:
        what = f"the target's elements overlap in memory ({_describe(t)}, stride={t.stride()})"
        raise _mismatch(path, what)
    if t.dtype is torch.bool:
        s, t = s.view(torch.uint8), t.view(torch.uint8)
    return s, t


def _check_target(t: torch.Tensor, path: str) -> None:
    """Refuse a target that cannot be written in place here (before anything is written)."""
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise RestoreMismatchError(
            f"cannot restore state_dict{path}: the target is an inference tensor ({_describe(t)}, made "
            "under torch.inference_mode()), which cannot be written outside inference mode; nothing "
            "was written. Restore into tensors made outside inference mode (build the model outside "
            "it), or call restore inside torch.inference_mode()"
        )


def _span(t: torch.Tensor) -> tuple[int, int]:
    """``[first byte, one past the last byte)`` of a tensor with elements."""
    extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _mirrored(si: torch.Tensor, ti: torch.Tensor, sj: torch.Tensor, tj: torch.Tensor) -> bool:
    """Whether the staged pair overlaps exactly as the target pair does (the same byte layout,
    at the same distance), so both writes put the same staged byte at each shared address."""
    return (
        si.device == sj.device
        and si.stride() == ti.stride()
        and sj.stride() == tj.stride()
        and si.data_ptr() - sj.data_ptr() == ti.data_ptr() - tj.data_ptr()
    )


def _bytes_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors whose spans intersect share a byte (strided views can interleave)."""
    if a.is_contiguous() and b.is_contiguous():
        return True  # each covers its whole span
    (alo, ahi), (blo, bhi) = _span(a), _span(b)
    lo = min(alo, blo)
    mask = torch.zeros(max(ahi, bhi) - lo, dtype=torch.uint8)  # the union span, on the host

    def bytes_of(t: torch.Tensor) -> torch.Tensor:
        n = t.element_size()
        return mask.as_strided((*t.shape, n), (*(st * n for st in t.stride()), 1), t.data_ptr() - lo)

    try:
        bytes_of(a).fill_(1)
        return bool(bytes_of(b).any())
    except RuntimeError:  # pragma: no cover - a layout as_strided cannot express: assume the worst
        return True


def _check_overlaps(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], paths: Sequence[str]) -> None:
    """Refuse two targets that share memory unless the staged copy shares it the same way.

    Identical views (tied weights) and views that the staged copy holds as the same views of
    one staged storage are fine: every shared byte gets one value. Otherwise the result would
    depend on the order of the writes.
    """
    spans = sorted((str(t.device), *_span(t), i) for i, (_, t) in enumerate(pairs) if t.numel())
    open_: list[tuple[str, int, int]] = []  # (device, end, index) of spans that may still overlap
    for device, lo, hi, j in spans:
        open_ = [o for o in open_ if o[0] == device and o[1] > lo]
        sj, tj = pairs[j]
        for _, _, i in open_:
            si, ti = pairs[i]
            views = [(t.data_ptr(), t.stride(), t.dtype, t.shape) for t in (ti, tj)]
            if views[0] == views[1] or _mirrored(si, ti, sj, tj) or not _bytes_overlap(ti, tj):
                continue
            raise RestoreMismatchError(
                f"cannot restore state_dict{paths[i]} and state_dict{paths[j]}: their target tensors "
                f"overlap in memory ({_describe(ti)}, stride={ti.stride()}; {_describe(tj)}, "
                f"stride={tj.stride()}) but the staged copy does not hold them as the same views of one "
                "storage, so the result would depend on the order of the writes; nothing was written. "
                "Restore into targets that do not share memory, or into the state dict the copy was "
                "staged from"
            )
        open_.append((device, hi, j))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view."""
    return t.reshape(-1).view(torch.uint8)


def _split_packable(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Split pairs into byte-copyable ones (deduplicated, non-overlapping live spans) and the rest."""
    fast: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    slow: list[tuple[torch.Tensor, torch.Tensor]] = []
    for s, t in pairs:
        n = _nbytes(t)
        if n == 0:
            continue
        if s.is_contiguous() and t.is_contiguous():
            fast.setdefault((t.data_ptr(), n), (s, t))  # tied weights: one region
        else:
            slow.append((s, t))
    # Live spans that partly overlap another cannot be scattered concurrently: copy them one by one.
    spans = sorted(fast)
    overlapping: set[tuple[int, int]] = set()
    end, last = -1, None
    for key in spans:
        addr, n = key
        if addr < end and last is not None:
            overlapping.update((key, last))
        if addr + n > end:
            end, last = addr + n, key
    slow.extend(fast.pop(k) for k in sorted(overlapping))
    return list(fast.values()), slow


def _host_source(
    staged: list[torch.Tensor], host_buffers: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, list[int]]:
    """One host uint8 tensor holding every staged tensor's bytes, and each tensor's offset in it.

    The span of a known host buffer (the stager's arena) when it holds them all; else a new
    buffer packed on the host.
    """
    lo = min(s.data_ptr() for s in staged)
    hi = max(s.data_ptr() + _nbytes(s) for s in staged)
    spans = sorted((s.data_ptr(), s.data_ptr() + _nbytes(s)) for s in staged)
    disjoint = all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # packed regions may not overlap
    for buf in host_buffers if disjoint else ():
        base = buf.data_ptr()
        if buf.device.type == "cpu" and buf.dtype == torch.uint8 and base <= lo and hi <= base + buf.numel():
            return buf[lo - base : hi - base], [s.data_ptr() - lo for s in staged]
    offsets, cursor = [], 0
    for s in staged:
        offsets.append(cursor)
        cursor = (cursor + _nbytes(s) + _ALIGN - 1) // _ALIGN * _ALIGN
    packed = torch.empty(max(cursor, 1), dtype=torch.uint8)
    torch._foreach_copy_(
        [packed[o : o + _nbytes(s)] for s, o in zip(staged, offsets)], [_as_bytes(s) for s in staged]
    )
    return packed, offsets


def _batches(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], max_bytes: int
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Consecutive runs of ``pairs`` of at most ``max_bytes`` (aligned) each (a larger pair alone)."""
    out: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    run: list[tuple[torch.Tensor, torch.Tensor]] = []
    size = 0
    for s, t in pairs:
        n = (_nbytes(t) + _ALIGN - 1) // _ALIGN * _ALIGN
        if run and size + n > max_bytes:
            out.append(run)
            run, size = [], 0
        run.append((s, t))
        size += n
    if run:
        out.append(run)
    return out


def _restore_packed(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    host_buffers: Sequence[torch.Tensor] = (),
    *,
    pack_threshold: int = 1 << 20,
    chunk_bytes: int = 64 << 20,
) -> tuple[int, int]:
    """Copy host ``staged`` tensors into live tensors on ``device`` (the CUDA path of the module
    docstring), queued in order on its current stream; returns ``(regions unpacked, copied one by one)``."""
    from stager.kernels import prepare_table, table_from_triples, unpack_scatter

    fast, slow = _split_packable(pairs)
    small = [(s, t) for s, t in fast if _nbytes(t) < pack_threshold]
    slow = [(s, t) for s, t in fast if _nbytes(t) >= pack_threshold] + slow
    runs = _batches(small, chunk_bytes)
    buf: torch.Tensor | None = None
    for run in runs:
        staged = [s for s, _ in run]
        src, offsets = _host_source(staged, host_buffers)
        if src.numel() > chunk_bytes:  # an arena span with other regions in between: pack instead
            src, offsets = _host_source(staged, ())
        table = table_from_triples((t.data_ptr(), o, _nbytes(t)) for (_, t), o in zip(run, offsets))
        prepared = prepare_table(table, device)
        if buf is None or buf.numel() < src.numel():  # (a run of one tensor may exceed a chunk)
            total = sum(_nbytes(t) + _ALIGN for _, t in small)
            buf = torch.empty(max(min(chunk_bytes, total), src.numel()), dtype=torch.uint8, device=device)
        part = buf[: src.numel()]
        part.copy_(src, non_blocking=src.is_pinned() if device.type == "cuda" else False)
        unpack_scatter(prepared, part)
    with torch.no_grad():
        for s, t in slow:
            t.copy_(s, non_blocking=device.type == "cuda")
    return len(small), len(slow)


def _verify_staged(matched: Sequence[tuple[torch.Tensor, torch.Tensor, str]], stats: StageStats) -> None:
    """Integrity phase: hash the staged copy again and compare with the checksums stored when it
    was staged (or received by a replicator); a region that changed refuses the whole restore,
    before anything is written. Tensors with no stored checksum are restored unverified."""
    from stager.integrity import verify_staged_tensors

    result = verify_staged_tensors(((s, path) for s, _, path in matched), what="restore")
    stats.verify_s = result.seconds
    if result.regions:
        stats.notes.append(
            f"verified {result.regions} staged regions ({result.nbytes} bytes) against their checksums"
        )
    if result.unverified:
        stats.notes.append(
            f"{len(result.unverified)} tensors restored unverified (staged without checksums; "
            "see STAGER_CHECKSUM)"
        )


def restore_state(
    staged: Any,
    into: Any,
    *,
    nvtx_enabled: bool = False,
    host_buffers: Sequence[torch.Tensor] = (),
    pack_threshold: int = 1 << 20,
    chunk_bytes: int = 64 << 20,
) -> StageStats:
    """Copy every tensor of ``staged`` into the matching tensor of ``into``, in place.

    Args:
        staged: a staged copy (``GraphStager.stage()``'s result) or any state dict of CPU tensors.
        into: the live state dict of the same structure; its tensors are overwritten in place
            (parameters included; autograd is not involved).
        nvtx_enabled: mark the restore as the NVTX range ``stager/restore``.
        host_buffers: host ``uint8`` buffers that may contain the staged bytes (the stager's
            arenas); a run of small tensors inside one is sent to the device without a host copy.
        pack_threshold: CUDA targets this size or larger are copied one by one, straight from
            the host; smaller ones are unpacked on the device.
        chunk_bytes: the device buffer the small ones go through, run by run (the most device
            memory a restore allocates).

    Returns:
        A :class:`StageStats` (``executor`` ``restore-cpu`` or ``restore-unpack``).

    Raises:
        RestoreMismatchError: (a ``ValueError``) the structures, shapes or dtypes differ, a target
            is an inference tensor (outside inference mode), or two targets share memory that
            the staged copy does not share the same way; raised before anything is copied,
            naming the key path(s).
        IntegrityError: (a ``ValueError``) the staged copy no longer matches the checksums stored
            when it was staged; raised before anything is copied, naming the key path.
    """
    t0 = time.perf_counter()
    stats = StageStats(notes=["restore"])
    with nvtx.range("stager/restore", nvtx_enabled):
        matched = match_tensors(staged, into)
        for _, t, path in matched:
            _check_target(t, path)
        pairs_checked = [_writable_pair(s, t, path) for s, t, path in matched]
        _check_overlaps(pairs_checked, [path for _, _, path in matched])
        _verify_staged(matched, stats)
        cpu_src: list[torch.Tensor] = []
        cpu_dst: list[torch.Tensor] = []
        by_device: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for s, t in pairs_checked:
            if t.device.type == "cpu":
                cpu_src.append(s)
                cpu_dst.append(t)
            else:
                by_device.setdefault(t.device, []).append((s, t))
        stats.plan_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        if cpu_dst:
            with torch.no_grad():
                torch._foreach_copy_(cpu_dst, cpu_src)
        regions, single = len(cpu_dst), 0
        for device, pairs in by_device.items():
            if device.type != "cuda":
                with torch.no_grad():
                    for s, t in pairs:
                        t.copy_(s)
                single += len(pairs)
                continue
            with torch.cuda.device(device):
                n_fast, n_slow = _restore_packed(
                    pairs, device, host_buffers, pack_threshold=pack_threshold, chunk_bytes=chunk_bytes
                )
                torch.cuda.current_stream(device).synchronize()
            regions += n_fast
            single += n_slow
        stats.copy_s = time.perf_counter() - t1
    stats.tensors = len(matched)
    stats.regions = regions + single
    stats.nbytes = sum(_nbytes(t) for _, t, _ in matched)
    stats.device_path = DevicePath.UNPACK if by_device else DevicePath.CPU
    stats.executor = Executor.RESTORE_UNPACK if by_device else Executor.RESTORE_CPU
    if single:
        stats.notes.append(f"{single} tensors copied one by one (not contiguous or overlapping)")
    stats.blocked_s = stats.complete_s = time.perf_counter() - t0
    if stats.copy_s > 0:
        stats.gbps = stats.nbytes / stats.copy_s / 1e9
    return stats
