"""The staging plan: a state dict flattened once, its storages de-duplicated and laid out in one arena.

README.md ("Plan once, then replay") says what a plan's *signature* is and what :meth:`Plan.matches`
reads per call; nothing downstream checks the sources again.

Layout. One *region* per source storage: the byte span its tensors reference, its start rounded
down to the largest element size among them so every view keeps an integral ``storage_offset``,
placed at a multiple of the configured alignment in the arena. Every staged tensor is rebuilt over
its region's staged storage, which is exactly the region's bytes.

DTensors. A ``DTensor`` is one leaf whose tensor is its local shard: the token carries its spec
(mesh, placements, global shape and stride), the signature covers the local tensor, and
:func:`stager.tree.rebuild` wraps the staged local tensor in a DTensor with the same spec.

Sources. The plan keeps every source storage and a uint8 view of every source region (the copies
read those), with each storage's address and the bytes the region needs of it. A match needs the
planned signature *and* every storage still at its planned address with at least those bytes:
``untyped_storage().resize_()`` (as FSDP does) gives a storage new memory and frees the old, which
a new tensor can then take at a planned address while the plan's view points elsewhere. While
both hold, an equal ``data_ptr`` means the same memory. The views are dropped when the plan is
replaced or the stager is closed.
"""

from __future__ import annotations

import gc
import operator
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Callable, Iterator, Sequence

import torch

from stager.errors import StagingInputError
from stager.tree import PLAIN_TENSOR_TYPES

__all__ = [
    "Region", "Leaf", "Plan", "build_plan", "arena_layout", "tensor_signature", "TensorSignature",
    "gc_paused",
]

_DTYPE = attrgetter("dtype")
_SHAPE = attrgetter("shape")


@dataclass(frozen=True)
class Region:
    """One contiguous byte span of one source storage, staged as one storage in the arena."""

    index: int
    device: torch.device
    nbytes: int
    arena_offset: int
    src_offset: int
    """Byte offset of the span inside its source storage."""


@dataclass(frozen=True)
class Leaf:
    """One tensor leaf: where it lives in its region, and how to rebuild it there."""

    path: str
    region: int
    """Index of its region, or -1 for a tensor with no bytes (rebuilt as an empty tensor)."""
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    """Storage offset in elements, relative to the region's first byte."""
    cls: type


@dataclass(eq=False)
class Plan:
    """A flattened, de-duplicated, laid-out state dict, reusable while its signature holds.

    A plan is not changed once built (only :meth:`release_sources` drops its references), so
    several threads may read it; compared and hashed by identity.
    """

    tokens: list[tuple]
    signature: TensorSignature
    leaves: list[Leaf]
    regions: list[Region]
    arena_bytes: int
    """Host bytes one staged copy needs (regions with their alignment padding)."""
    nbytes: int
    """Bytes that one stage copies (sum of region sizes, without padding)."""
    src_views: list[torch.Tensor] = field(repr=False)
    """uint8 view of every region's source span, in region order (keeps the sources alive)."""
    src_storages: list[torch.UntypedStorage] = field(default_factory=list, repr=False)
    """The source storage of every region, in region order."""
    src_ptrs: list[int] = field(default_factory=list, repr=False)
    """Address of every ``src_storages`` storage when planned (checked on every match)."""
    src_ends: list[int] = field(default_factory=list, repr=False)
    """Bytes of its storage each region reaches (offset + size; checked on every match)."""
    holds_sources: bool = True
    """False once :meth:`release_sources` dropped the sources: the plan matches nothing."""
    region_first: list[int] = field(default_factory=list, repr=False)
    """Index of the first tensor of every region (whose storage a demoted plan adopts again)."""
    demoted: bool = False
    """The plan keeps no strong reference to its sources (see :meth:`demote`)."""
    src_weak: list[Any] = field(default_factory=list, repr=False)
    """A weak reference to every source storage, taken when demoted (see :meth:`dead`)."""
    attr_index: list[int] = field(default_factory=list, repr=False)
    """Indices of the plain tensors that carried Python attributes (``t.note = ...``) when planned:
    their staged tensors get a deep copy of the attributes on every stage."""
    complex_index: list[int] = field(default_factory=list, repr=False)
    """Indices of the complex tensors (the only ones that can carry a lazy conjugate bit)."""
    cpu_index: list[int] = field(default_factory=list)
    """Indices of the regions whose source is on the CPU."""
    cpu_src: list[torch.Tensor] = field(default_factory=list, repr=False)
    """``src_views`` of the CPU regions, in ``cpu_index`` order."""
    device_regions: dict[torch.device, list[int]] = field(default_factory=dict)
    """Indices of the regions on each accelerator device."""

    def matches(self, tokens: list[tuple], tensors: Sequence[torch.Tensor]) -> bool:
        """Whether a walked state dict (its ``tokens`` and ``tensors``) can be staged with this plan.

        Structure first (cheap, and what tells two different dicts apart), then the tensors'
        signature, then that every source storage the plan copies from is still at its planned
        address with at least the bytes the plan reads of it (see the module's docstring), then
        that no tensor is a lazy negative or conjugate view (whose bytes are not its values: same
        address, shape, stride and dtype as the plain tensor, so the signature alone cannot tell
        them apart).
        """
        if not self.holds_sources or len(tensors) != len(self.signature) or tokens != self.tokens:
            return False
        T = torch.Tensor
        S = torch.UntypedStorage
        with gc_paused():
            if not (
                self.signature.matches(tensors)
                and not any(map(T.is_neg, tensors))
                and not any(map(T.is_conj, map(tensors.__getitem__, self.complex_index)))
            ):
                return False
            storages = (
                list(map(T.untyped_storage, map(tensors.__getitem__, self.region_first)))
                if self.demoted
                else self.src_storages
            )
            if not (
                list(map(S.data_ptr, storages)) == self.src_ptrs
                and all(map(operator.le, self.src_ends, map(S.nbytes, storages)))
            ):
                return False
        if self.demoted:
            self._adopt(storages)
        return True

    def demote(self) -> None:
        """Keep the layout but no strong reference to the sources (another plan is in use).

        The source storages may then be freed; a later :meth:`matches` takes the storages of the
        walked tensors again, checked like any other (address and size of every region).
        """
        if self.demoted or not self.holds_sources:
            return
        from torch.multiprocessing.reductions import StorageWeakRef

        self.src_weak = [StorageWeakRef(st) for st in self.src_storages]
        self.demoted = True
        self.src_views = []
        self.src_storages = []
        self.cpu_src = []

    def dead(self) -> bool:
        """Whether a demoted plan can never match again: every source storage it had is freed."""
        return self.demoted and bool(self.src_weak) and all(w.expired() for w in self.src_weak)

    def _adopt(self, storages: list[torch.UntypedStorage]) -> None:
        self.src_views = [
            torch.empty(0, dtype=torch.uint8, device=r.device).set_(st, r.src_offset, (r.nbytes,), (1,))
            for r, st in zip(self.regions, storages)
        ]
        self.src_storages = storages
        self.cpu_src = [self.src_views[i] for i in self.cpu_index]
        self.src_weak = []
        self.demoted = False

    def release_sources(self) -> None:
        """Drop the references to the source storages (the plan matches nothing afterwards)."""
        self.holds_sources = False
        self.src_weak = []
        self.src_views = []
        self.src_storages = []
        self.cpu_src = []


@dataclass(frozen=True, eq=True)
class TensorSignature:
    """``(data_ptr, size, stride, dtype)`` of every tensor, kept as four columns.

    Per tensor this costs four C-level calls under ``map`` and no Python tuple. :meth:`matches`
    compares the columns one at a time, addresses first (the cheapest call and the one a moved
    source changes), and stops at the first column that differs.
    """

    ptrs: list[int]
    shapes: list[torch.Size]
    strides: list[tuple[int, ...]]
    dtypes: list[torch.dtype]

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor]) -> "TensorSignature":
        """Read the signature of ``tensors``."""
        T = torch.Tensor
        with gc_paused():
            return cls(
                list(map(T.data_ptr, tensors)),
                list(map(_SHAPE, tensors)),
                list(map(T.stride, tensors)),
                list(map(_DTYPE, tensors)),
            )

    def __len__(self) -> int:
        return len(self.ptrs)

    def matches(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether ``tensors`` have exactly these addresses, sizes, strides and dtypes."""
        if len(tensors) != len(self.ptrs):
            return False
        T = torch.Tensor
        with gc_paused():
            return (
                list(map(T.data_ptr, tensors)) == self.ptrs
                and list(map(_SHAPE, tensors)) == self.shapes
                and list(map(T.stride, tensors)) == self.strides
                and list(map(_DTYPE, tensors)) == self.dtypes
            )


def tensor_signature(tensors: Sequence[torch.Tensor]) -> TensorSignature:
    """The :class:`TensorSignature` of ``tensors``: what a replay must find unchanged."""
    return TensorSignature.of(tensors)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a block that allocates per tensor.

    Walking or fingerprinting tens of thousands of tensors allocates enough small objects to set
    off several collections, each of which traverses every tracked object in the process (a
    training process has millions): on a 2-core CPU, 50,000 signatures took 317 ms with the
    collector on and 35 ms with it paused. Pausing only defers collection: any cycle created inside
    (a deep-copied user object) is collected after the block.

    The pause is shared by every thread that asks for it (a staging thread and a capture, a
    wrap thread and the caller): the collector is switched off by the first and back on by the
    last, and only if it was on before the first, so one thread's block never switches it back
    on in the middle of another's (a collection during a CUDA-graph capture can run a finalizer
    whose CUDA call invalidates the capture).
    """
    global _gc_depth, _gc_was_enabled
    with _gc_lock:
        if _gc_depth == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_depth += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_depth -= 1
            if _gc_depth == 0 and _gc_was_enabled:
                gc.enable()


_gc_lock = threading.Lock()
_gc_depth = 0
_gc_was_enabled = False


def _span_bytes(t: torch.Tensor) -> int:
    """Bytes from a tensor's first element to one past its last (0 for no elements)."""
    if t.numel() == 0:
        return 0
    extent = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return extent * t.element_size()


def _check_leaf(t: torch.Tensor, path: str) -> None:
    """Raise ``StagingInputError`` for a tensor this stager cannot stage faithfully."""
    if t.is_nested:
        raise StagingInputError(
            path, f"nested tensors are not supported (dtype={t.dtype}, device={t.device})",
            "stage its components (t.unbind()) or a padded tensor instead",
        )
    described = f"(dtype={t.dtype}, shape={tuple(t.shape)}, device={t.device}, layout={t.layout})"
    if t.layout != torch.strided:
        raise StagingInputError(
            path, f"layout {t.layout} is not supported {described}",
            "convert it with .to_dense() or keep it out of the state dict",
        )
    if t.device.type == "meta":
        raise StagingInputError(
            path, f"meta tensor has no data to stage {described}",
            "materialise it (e.g. module.to_empty(device=...) and load or initialise it) first",
        )
    if t.is_quantized:
        raise StagingInputError(path, f"quantized tensors are not supported {described}")
    if t.is_conj() or t.is_neg():
        raise StagingInputError(
            path, f"lazy conjugate/negative view {described}", "call .resolve_conj()/.resolve_neg() first"
        )
    if type(t) not in PLAIN_TENSOR_TYPES:
        try:
            t.untyped_storage().data_ptr()
            t.data_ptr()
        except (RuntimeError, NotImplementedError) as exc:
            raise StagingInputError(
                path, f"tensor subclass {type(t).__qualname__} has no storage of its own ({exc})",
                "stage its local tensor(s) instead",
            ) from None
    if t.numel() and _span_bytes(t) + t.storage_offset() * t.element_size() > t.untyped_storage().nbytes():
        raise StagingInputError(
            path, f"tensor reaches past the end of its storage {described}; was its storage freed or resized?"
        )


def _align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def arena_layout(
    sizes: list[int], devices: list[torch.device], *, alignment: int, pack_threshold: int | None
) -> tuple[list[int], int]:
    """Arena offsets for regions of ``sizes`` bytes on ``devices``, and the arena's total size.

    Each region starts at a multiple of ``alignment``. Order: CPU regions, then per device (by
    name) its regions below ``pack_threshold`` and then the rest, each group in the given order.
    Without a threshold: CPU regions, then each device's regions in the given order.
    """

    def key(i: int) -> tuple:
        device = devices[i]
        large = pack_threshold is not None and device.type != "cpu" and sizes[i] >= pack_threshold
        return (device.type != "cpu", str(device), large, i)

    offsets = [0] * len(sizes)
    offset = 0
    for i in sorted(range(len(sizes)), key=key):
        offsets[i] = offset
        offset = _align_up(offset + sizes[i], alignment)
    return offsets, offset


def build_plan(
    tokens: list[tuple],
    tensors: list[torch.Tensor],
    paths: list[str],
    *,
    alignment: int,
    pack_threshold: int | None = None,
    check: Callable[[torch.Tensor, str], None] | None = None,
) -> Plan:
    """Validate every tensor, group them by storage and lay the regions out in one arena.

    Region indices follow the order of first appearance. With ``pack_threshold``, arena offsets
    are assigned CPU regions first, then per device its small regions (below the threshold)
    followed by its large ones: the small regions of a device are then adjacent in the arena,
    so the GPU pipeline packs them into chunks that each reach the host in one copy, however
    the state dict interleaves biases and norms with large weights.

    Raises :class:`~stager.errors.StagingInputError` (naming the key path) before anything is
    allocated or copied.
    """
    for t, p in zip(tensors, paths):
        _check_leaf(t, p)
        if check is not None:
            check(t, p)

    # storage key -> [min start byte, max end byte, max itemsize, storage, index of its tensor]
    groups: dict[tuple[int, torch.device], list[Any]] = {}
    order: list[tuple[int, torch.device]] = []
    per_tensor: list[tuple[tuple[int, torch.device], int] | None] = []
    for j, t in enumerate(tensors):
        span = _span_bytes(t)
        if span == 0:
            per_tensor.append(None)
            continue
        st = t.untyped_storage()
        key = (st.data_ptr(), t.device)
        start = t.storage_offset() * t.element_size()
        g = groups.get(key)
        if g is None:
            groups[key] = [start, start + span, t.element_size(), st, j]
            order.append(key)
        else:
            g[0] = min(g[0], start)
            g[1] = max(g[1], start + span)
            g[2] = max(g[2], t.element_size())
            if st.nbytes() > g[3].nbytes():
                # Distinct storages can start at one address (two torch.from_numpy views of one
                # buffer): the largest covers every tensor of the group, each lying in its own.
                g[3] = st
                g[4] = j
        per_tensor.append((key, start))

    spans: list[tuple[int, int]] = []  # (lo, nbytes) per region, in appearance order
    for key in order:
        lo, hi, itemsize, _, _ = groups[key]
        lo -= lo % itemsize
        spans.append((lo, hi - lo))

    offsets, offset = arena_layout(
        [n for _, n in spans], [key[1] for key in order], alignment=alignment, pack_threshold=pack_threshold
    )

    regions: list[Region] = []
    src_views: list[torch.Tensor] = []
    src_storages: list[torch.UntypedStorage] = []
    region_first: list[int] = []
    index_of: dict[tuple[int, torch.device], int] = {}
    for i, key in enumerate(order):
        st = groups[key][3]
        lo, nbytes = spans[i]
        region_first.append(groups[key][4])
        region = Region(index=i, device=key[1], nbytes=nbytes, arena_offset=offsets[i], src_offset=lo)
        index_of[key] = i
        regions.append(region)
        src_views.append(torch.empty(0, dtype=torch.uint8, device=key[1]).set_(st, lo, (nbytes,), (1,)))
        src_storages.append(st)

    leaves: list[Leaf] = []
    for t, p, where in zip(tensors, paths, per_tensor):
        size, stride = tuple(t.shape), tuple(t.stride())
        if where is None:
            leaves.append(Leaf(p, -1, t.dtype, size, stride, 0, type(t)))
            continue
        key, start = where
        r = regions[index_of[key]]
        rel = start - r.src_offset
        leaves.append(Leaf(p, r.index, t.dtype, size, stride, rel // t.element_size(), type(t)))

    cpu_index = [r.index for r in regions if r.device.type == "cpu"]
    device_regions: dict[torch.device, list[int]] = {}
    for r in regions:
        if r.device.type != "cpu":
            device_regions.setdefault(r.device, []).append(r.index)
    return Plan(
        tokens=tokens,
        signature=tensor_signature(tensors),
        leaves=leaves,
        regions=regions,
        arena_bytes=max(offset, 1),
        nbytes=sum(r.nbytes for r in regions),
        src_views=src_views,
        src_storages=src_storages,
        src_ptrs=[st.data_ptr() for st in src_storages],
        src_ends=[r.src_offset + r.nbytes for r in regions],
        region_first=region_first,
        attr_index=[i for i, t in enumerate(tensors) if type(t) in PLAIN_TENSOR_TYPES and t.__dict__],
        complex_index=[i for i, t in enumerate(tensors) if t.is_complex()],
        cpu_index=cpu_index,
        cpu_src=[src_views[i] for i in cpu_index],
        device_regions=device_regions,
    )
