"""The staging plan: a state dict flattened once, its storages de-duplicated and laid out in one arena.

A plan is built from one state dict and reused for every later ``stage()`` of a dict with the same
*signature*: the same nested structure (container types and keys) and, for every tensor, the same
``(data_ptr, size, stride, dtype)``. :meth:`Plan.matches` is the one place that decides that the
sources are where the plan says; nothing downstream checks it again. Per call it compares the
structure tokens first (a different dict is rejected before any tensor is read), then reads four
C-level columns per tensor for the signature, compared column by column (addresses first), one
more per tensor for a lazy negative view (and one per complex tensor for a conjugate view), and
two per source storage (address and size: a storage that moved, or was freed and re-allocated
smaller at the same address, no longer matches), with Python's cyclic garbage collector paused.

Layout. Tensors are grouped by source storage. For each storage the plan stages one *region*: the
byte span that its tensors reference (from the lowest first byte to the highest last byte, the
start rounded down to the largest element size among them so every view keeps an integral
``storage_offset``). Regions are laid out back to back in a host arena, each at a multiple of the
configured alignment. Every staged tensor is rebuilt over its region's staged storage, which is
exactly the region's bytes, so views stay views, tied weights stay tied and DCP's writer does not
clone a staged tensor that had a storage of its own.

Unlike PyTorch's ``StateDictStager``, which copies whole storages, only the referenced span of a
storage is staged: a small view into a large buffer costs its own bytes, not the buffer's.

DTensors. A ``DTensor`` (from ``fully_shard`` or ``distribute_tensor``) is one leaf whose tensor is
its local shard: the token carries the DTensor's spec (mesh, placements, global shape and stride),
the signature covers the local tensor, and :func:`rebuild` wraps the staged local tensor in a
DTensor with the same spec. ``torch.distributed.tensor`` is never imported here: a DTensor can
only exist once its module is loaded, so the class is looked up in ``sys.modules``.

Sources. The plan keeps every source storage and a uint8 view of every source region, which keep
the sources alive, and each storage's address and the bytes the region needs of it when it was
planned. The copies read those views. A match therefore needs both halves: the walked tensors
have the planned signature, *and* every storage is still at its planned address with at least
the planned bytes. A storage can move under the plan: ``untyped_storage().resize_()``
(as FSDP does to free and re-gather parameters) gives it new memory and frees the old, which
another storage can then take, so a new tensor can turn up at a planned address while the view
the plan would copy from points elsewhere (or at nothing). While both halves hold, an equal
``data_ptr`` means the same memory. The views are dropped when the plan is replaced or the stager
is closed.
"""

from __future__ import annotations

import copy
import gc
import io
import operator
from collections import OrderedDict, defaultdict, deque
from itertools import chain, islice
from operator import attrgetter
import pickle
import sys
import threading
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from stager.errors import StagingInputError

__all__ = [
    "Region", "Leaf", "Plan", "walk", "build_plan", "arena_layout", "rebuild", "find_cycle", "tensor_signature", "TensorSignature",
    "gc_paused", "ATOMIC_TYPES",
]

# Leaves that deepcopy returns as themselves.
ATOMIC_TYPES: frozenset[type] = frozenset(
    {
        type(None), int, float, bool, complex, str, bytes, range, type, types.FunctionType,
        types.BuiltinFunctionType, torch.dtype, torch.device, torch.Size, torch.layout,
        torch.memory_format,
    }
)
_DTYPE = attrgetter("dtype")
_SHAPE = attrgetter("shape")
_PLAIN_TENSOR_TYPES: frozenset[type] = frozenset({torch.Tensor, torch.nn.Parameter})
_DICT_ONLY: frozenset[type] = frozenset({dict})

# Structure tokens, in pre-order. Each is a tuple whose first item is one of:
_DICT, _FLATDICT, _LIST, _TUPLE, _NAMEDTUPLE, _TENSOR, _SUBTENSOR, _ATOM, _OBJECT, _DTENSOR, _ATOMS, _NESTEDFLAT = range(12)
_TENSOR_TOKEN = (_TENSOR,)


def _dtensor_class() -> type | None:
    """``DTensor`` if ``torch.distributed.tensor`` is loaded (no DTensor can exist otherwise)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


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
    alignment: int
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
    devices: list[torch.device] = field(default_factory=list)
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


# --------------------------------------------------------------------------------------------
# Walking a state dict
# --------------------------------------------------------------------------------------------


class _Finder(pickle.Pickler):
    """Finds the tensors inside an arbitrary object, the way pickling (and deepcopy) reaches them."""

    def __init__(self, found: list[torch.Tensor]) -> None:
        super().__init__(io.BytesIO(), protocol=pickle.HIGHEST_PROTOCOL)
        self.found = found

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            self.found.append(obj)
            return len(self.found) - 1
        return None


def walk(
    obj: Any,
    tokens: list[tuple],
    tensors: list[torch.Tensor],
    others: list[Any],
    paths: list[str] | None = None,
    path: str = "",
) -> None:
    """Flatten ``obj`` in pre-order into structure ``tokens``, ``tensors`` and non-tensor ``others``.

    ``paths`` (planning only) receives the key path of every tensor, for error messages.
    """
    cls = type(obj)
    if cls in _PLAIN_TENSOR_TYPES:
        tokens.append(_TENSOR_TOKEN)
        tensors.append(obj)
        if paths is not None:
            paths.append(path)
    elif isinstance(obj, dict):
        keys = tuple(obj)
        values = list(obj.values())
        if cls is dict and values:
            types = set(map(type, values))
            if types <= _PLAIN_TENSOR_TYPES:
                # A flat dict of tensors (model.state_dict()): no per-value recursion.
                tokens.append((_FLATDICT, keys))
                tensors.extend(values)
                if paths is not None:
                    paths.extend(f"{path}[{k!r}]" for k in keys)
                return
            if types == _DICT_ONLY:
                # A dict of flat dicts of tensors (an optimizer's per-parameter ``state``): one
                # token, and no Python-level step per inner dict.
                flat = list(chain.from_iterable(map(dict.values, values)))
                if set(map(type, flat)) <= _PLAIN_TENSOR_TYPES:
                    tokens.append((_NESTEDFLAT, keys, tuple(map(tuple, values)), len(flat)))
                    tensors.extend(flat)
                    if paths is not None:
                        paths.extend(f"{path}[{k!r}][{ik!r}]" for k, d in zip(keys, values) for ik in d)
                    return
        tokens.append((_DICT, cls, keys))
        if cls is not dict:
            if paths is not None:
                _check_mapping(obj, path)
            others.append(obj)  # the template: its class and attributes, refilled with staged items
        for k, v in zip(keys, values):
            walk(v, tokens, tensors, others, paths, f"{path}[{k!r}]" if paths is not None else "")
    elif cls is list or cls is tuple:
        if obj and set(map(type, obj)) <= ATOMIC_TYPES:
            # Only immutable scalars (an optimizer's ``params`` ids, ``betas``): one token, and one
            # snapshot of the values; like other atoms, their values are not part of the signature.
            tokens.append((_ATOMS, cls, len(obj)))
            others.append(tuple(obj))
            return
        tokens.append((_LIST if cls is list else _TUPLE, len(obj)))
        for i, v in enumerate(obj):
            walk(v, tokens, tensors, others, paths, f"{path}[{i}]" if paths is not None else "")
    elif isinstance(obj, tuple) and hasattr(cls, "_fields"):
        tokens.append((_NAMEDTUPLE, cls, len(obj)))
        for name, v in zip(cls._fields, obj):
            walk(v, tokens, tensors, others, paths, f"{path}.{name}" if paths is not None else "")
    elif isinstance(obj, torch.Tensor):
        dtensor = _dtensor_class()
        if dtensor is not None and isinstance(obj, dtensor):
            # The local shard is the leaf; the spec (mesh, placements, global shape/stride) is
            # structure, compared on every stage like the keys.
            local = obj._local_tensor
            if type(local) not in _PLAIN_TENSOR_TYPES:
                raise StagingInputError(
                    path or "<root>",
                    f"DTensor whose local tensor is a {type(local).__qualname__} is not supported "
                    f"(placements={obj._spec.placements}, local shape={tuple(local.shape)})",
                    "stage DTensors over plain local tensors",
                )
            tokens.append((_DTENSOR, cls, obj._spec))
            tensors.append(local)
        else:
            tokens.append((_SUBTENSOR, cls))
            tensors.append(obj)
        if paths is not None:
            paths.append(path)
    elif cls in ATOMIC_TYPES:
        tokens.append((_ATOM, cls))
        others.append(obj)
    else:
        # An arbitrary object (list/tuple subclass, scheduler, dataclass...): deep-copied on every
        # stage, with any tensor it holds staged through the plan like any other leaf.
        found: list[torch.Tensor] = []
        try:
            _Finder(found).dump(obj)
        except Exception as exc:
            raise StagingInputError(
                path or "<root>",
                f"object of type {cls.__qualname__} cannot be copied ({type(exc).__name__}: {exc})",
                "make it picklable/deep-copyable or remove it from the state dict",
            ) from None
        tokens.append((_OBJECT, cls, len(found)))
        others.append(obj)
        for i, t in enumerate(found):
            walk(t, tokens, tensors, others, paths, f"{path}<{cls.__qualname__} tensor {i}>")


def find_cycle(obj: Any) -> str | None:
    """Key path of the first container that contains itself, or ``None`` (for error messages)."""
    stack: list[tuple[Any, str, frozenset[int]]] = [(obj, "", frozenset())]
    while stack:
        o, path, ancestors = stack.pop()
        if isinstance(o, dict):
            items: Any = ((f"[{k!r}]", v) for k, v in o.items())
        elif isinstance(o, (list, tuple)):
            items = ((f"[{i}]", v) for i, v in enumerate(o))
        else:
            continue
        if id(o) in ancestors:
            return path or "<root>"
        inner = ancestors | {id(o)}
        stack.extend((v, path + k, inner) for k, v in items)
    return None


def rebuild(
    tokens: list[tuple],
    staged: list[torch.Tensor],
    sources: list[torch.Tensor],
    others: list[Any],
    attr_index: Sequence[int] = (),
) -> Any:
    """Rebuild the nested structure from ``tokens`` around the ``staged`` tensors.

    ``sources`` are the walked source tensors (same order as ``staged``), needed to deep-copy
    arbitrary objects with their tensors replaced by the staged ones, and the Python attributes
    of the plain tensors at ``attr_index`` (:attr:`Plan.attr_index`) onto their staged tensors.
    """
    tok_it = iter(tokens)
    ten_it = iter(range(len(staged)))
    oth_it = iter(others)
    memo: dict[int, Any] = {}
    for i in attr_index:
        for name, value in sources[i].__dict__.items():
            setattr(staged[i], name, copy.deepcopy(value, memo))
    return _build(tok_it, ten_it, oth_it, staged, sources, memo)


def _build(
    tok_it: Iterator[tuple],
    ten_it: Iterator[int],
    oth_it: Iterator[Any],
    staged: list[torch.Tensor],
    sources: list[torch.Tensor],
    memo: dict[int, Any],
) -> Any:
    tok = next(tok_it)
    kind = tok[0]
    if kind == _TENSOR:
        return staged[next(ten_it)]
    if kind == _FLATDICT:
        keys = tok[1]
        first = next(ten_it)
        deque(islice(ten_it, len(keys) - 1), maxlen=0)
        return dict(zip(keys, staged[first : first + len(keys)]))
    if kind == _NESTEDFLAT:
        keys, inner, n = tok[1], tok[2], tok[3]
        if not n:
            return {k: {} for k in keys}
        first = next(ten_it)
        deque(islice(ten_it, n - 1), maxlen=0)
        values = iter(staged[first : first + n])
        return {k: dict(zip(ik, values)) for k, ik in zip(keys, inner)}  # zip takes ik first: no overrun
    if kind == _DICT:
        cls, keys = tok[1], tok[2]
        template = None if cls is dict else next(oth_it)
        values = [_build(tok_it, ten_it, oth_it, staged, sources, memo) for _ in keys]
        if template is None:
            return dict(zip(keys, values))
        return _new_mapping(template, zip(keys, values), memo)
    if kind == _LIST:
        return [_build(tok_it, ten_it, oth_it, staged, sources, memo) for _ in range(tok[1])]
    if kind == _TUPLE:
        return tuple(_build(tok_it, ten_it, oth_it, staged, sources, memo) for _ in range(tok[1]))
    if kind == _NAMEDTUPLE:
        cls = tok[1]
        values = [_build(tok_it, ten_it, oth_it, staged, sources, memo) for _ in range(tok[2])]
        # _make, not cls(*values): a subclass may give __new__ another signature.
        make = getattr(cls, "_make", None)
        return make(values) if make is not None else cls(*values)
    if kind == _SUBTENSOR:
        i = next(ten_it)
        src = sources[i]
        out = staged[i].as_subclass(tok[1])
        for name, value in getattr(src, "__dict__", {}).items():
            setattr(out, name, copy.deepcopy(value, memo))
        return out
    if kind == _DTENSOR:
        return _make_dtensor(tok[1], staged[next(ten_it)], tok[2])
    if kind == _ATOM:
        return next(oth_it)
    if kind == _ATOMS:
        values = next(oth_it)
        return list(values) if tok[1] is list else values
    if kind == _OBJECT:
        obj = next(oth_it)
        local = dict(memo)
        for _ in range(tok[2]):
            next(tok_it)  # the tensor tokens of the object, consumed here
            i = next(ten_it)
            local[id(sources[i])] = staged[i]
        return copy.deepcopy(obj, local)
    raise AssertionError(f"unknown structure token {tok!r}")  # pragma: no cover


def _new_mapping(template: dict, items: Iterator[tuple[Any, Any]], memo: dict[int, Any]) -> dict:
    """A dict of ``template``'s class holding ``items``, with a deep copy of its attributes.

    None of the subclass's own methods is called (as with PyTorch's ``StateDictStager``): its
    ``update`` may mean something else (``Counter`` counts the items), its ``__setitem__`` or
    ``__setattr__`` may refuse or redirect (read-only and attribute-style dicts). Items go in
    through the builtin base (``OrderedDict``'s, which keeps its own order, or ``dict``'s), and
    attributes straight into the instance ``__dict__``; ``defaultdict`` keeps its factory.
    """
    cls = type(template)
    out = cls.__new__(cls)
    setitem = OrderedDict.__setitem__ if isinstance(template, OrderedDict) else dict.__setitem__
    for k, v in items:
        setitem(out, k, v)
    if isinstance(template, defaultdict):
        defaultdict.__init__(out, template.default_factory)  # no arguments: keeps the items
    attrs = getattr(template, "__dict__", None)
    if attrs:
        vars(out).update(copy.deepcopy(attrs, memo))
    for name in _slot_names(cls):
        if hasattr(template, name):
            object.__setattr__(out, name, copy.deepcopy(getattr(template, name), memo))
    return out


def _slot_names(cls: type) -> tuple[str, ...]:
    """The ``__slots__`` attributes a dict subclass declares (itself and its bases)."""
    names: list[str] = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else list(slots)
    return tuple(n for n in names if n not in ("__dict__", "__weakref__"))


def _check_mapping(obj: dict, path: str) -> None:
    """Refuse, before anything is copied, a dict subclass that :func:`_new_mapping` cannot make."""
    cls = type(obj)
    try:
        _new_mapping(obj, iter(()), {})
    except Exception as exc:
        raise StagingInputError(
            path or "<root>",
            f"dict subclass {cls.__qualname__} cannot be rebuilt without calling its constructor "
            f"({type(exc).__name__}: {exc})",
            "stage a plain dict (dict(obj)) or make the class constructible with cls.__new__(cls)",
        ) from None


def _make_dtensor(cls: type, local: torch.Tensor, spec: Any) -> Any:
    """A DTensor with ``spec`` (the source's mesh, placements, global shape and stride) around
    ``local``.

    DTensor's own constructor is what ``DTensor.from_local`` ends in, without its checks and its
    autograd function (a fifth of the cost); ``from_local`` is the fallback should that private
    signature change.
    """
    try:
        return cls(local, spec, requires_grad=False)
    except TypeError:  # pragma: no cover - another torch version
        return cls.from_local(
            local, spec.mesh, spec.placements, run_check=False, shape=spec.shape, stride=spec.stride
        )


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


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
    if type(t) not in _PLAIN_TENSOR_TYPES:
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

    devices = sorted({r.device for r in regions}, key=str)
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
        alignment=alignment,
        src_views=src_views,
        src_storages=src_storages,
        src_ptrs=[st.data_ptr() for st in src_storages],
        src_ends=[r.src_offset + r.nbytes for r in regions],
        region_first=region_first,
        attr_index=[i for i, t in enumerate(tensors) if type(t) in _PLAIN_TENSOR_TYPES and t.__dict__],
        complex_index=[i for i, t in enumerate(tensors) if t.is_complex()],
        devices=devices,
        cpu_index=cpu_index,
        cpu_src=[src_views[i] for i in cpu_index],
        device_regions=device_regions,
    )
