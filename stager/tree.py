"""The state-dict tree: one walker, its structure tokens, and the rebuild around staged tensors.

:func:`walk` flattens a state dict (containers: dicts and their subclasses, lists, tuples, named
tuples; leaves: tensors, DTensors, immutable atoms, other objects) once, in pre-order, into
structure tokens (tuples headed by a :class:`Token`), the tensors and the other leaves; a plan
compares the tokens on every stage, so they hold keys and container classes, never a tensor value.
:func:`rebuild` makes the tree again around other tensors. :func:`children`, :func:`leaves` and
:func:`find_cycle` are the plain walk every other part uses, with key paths written
``['model']['fc.weight']`` (``.name`` for a named tuple's field).
"""

from __future__ import annotations

import copy
import io
import pickle
import sys
import types
from collections import OrderedDict, defaultdict, deque
from collections.abc import Mapping
from enum import IntEnum
from itertools import chain, islice
from typing import Any, Iterable, Iterator, Sequence

import torch

from stager.errors import StagingInputError

__all__ = [
    "ATOMIC_TYPES", "PLAIN_TENSOR_TYPES", "Token", "children", "consumes", "find_cycle", "holds_tensor",
    "leaves", "rebuild", "tensors_in", "walk",
]

# Leaves that deepcopy returns as themselves.
ATOMIC_TYPES: frozenset[type] = frozenset(
    {
        type(None), int, float, bool, complex, str, bytes, range, type, types.FunctionType,
        types.BuiltinFunctionType, torch.dtype, torch.device, torch.Size, torch.layout,
        torch.memory_format,
    }
)
PLAIN_TENSOR_TYPES: frozenset[type] = frozenset({torch.Tensor, torch.nn.Parameter})
"""Tensor classes staged as they are (any other tensor class is a subclass leaf)."""
_DICT_ONLY: frozenset[type] = frozenset({dict})


class Token(IntEnum):
    """The kind of one structure token (its first item); the other items are listed per kind."""

    DICT = 0
    """``(DICT, cls, keys)``, followed by the tokens of its values; a subclass's template is an other."""
    FLATDICT = 1
    """``(FLATDICT, keys)``: a plain dict whose values are all plain tensors (one tensor per key)."""
    LIST = 2
    """``(LIST, n)``, followed by the tokens of its ``n`` items."""
    TUPLE = 3
    """``(TUPLE, n)``, followed by the tokens of its ``n`` items."""
    NAMEDTUPLE = 4
    """``(NAMEDTUPLE, cls, n)``, followed by the tokens of its ``n`` fields."""
    TENSOR = 5
    """``(TENSOR,)``: one plain tensor or parameter."""
    SUBTENSOR = 6
    """``(SUBTENSOR, cls)``: one tensor of a subclass, rebuilt with ``as_subclass`` and its attributes."""
    ATOM = 7
    """``(ATOM, cls)``: one immutable scalar (an other)."""
    OBJECT = 8
    """``(OBJECT, cls, n)``: an arbitrary object (an other), followed by its ``n`` tensors' tokens."""
    DTENSOR = 9
    """``(DTENSOR, cls, spec)``: one DTensor; its local shard is the tensor."""
    ATOMS = 10
    """``(ATOMS, cls, n)``: a list or tuple of ``n`` immutable scalars (one other: their tuple)."""
    NESTEDFLAT = 11
    """``(NESTEDFLAT, keys, inner_keys, n)``: a plain dict of plain dicts of ``n`` plain tensors."""


_TENSOR_TOKEN = (Token.TENSOR,)


def consumes(tok: tuple) -> tuple[int, int]:
    """``(tensors, others)`` that one token itself stands for in :func:`walk`'s lists.

    The items of a container, and the tensors of an object, have tokens of their own (counted
    there).
    """
    kind = tok[0]
    if kind is Token.TENSOR or kind is Token.SUBTENSOR or kind is Token.DTENSOR:
        return 1, 0
    if kind is Token.FLATDICT:
        return len(tok[1]), 0
    if kind is Token.NESTEDFLAT:
        return tok[3], 0
    if kind is Token.DICT:
        return 0, int(tok[1] is not dict)
    if kind is Token.ATOM or kind is Token.ATOMS or kind is Token.OBJECT:
        return 0, 1
    return 0, 0


def _dtensor_class() -> type | None:
    """``DTensor`` if ``torch.distributed.tensor`` is loaded (no DTensor can exist otherwise)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def children(obj: Any) -> Iterable[tuple[str, Any]] | None:
    """``(key path suffix, child)`` for every item of a mapping, list or tuple; ``None`` for a leaf.

    The suffix is ``[key]`` for a mapping's key, ``[i]`` for a list or tuple index and ``.name``
    for a named tuple's field, as :func:`walk` writes them.
    """
    if isinstance(obj, Mapping):
        return ((f"[{k!r}]", v) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):
        return ((f".{name}", v) for name, v in zip(type(obj)._fields, obj))
    if isinstance(obj, (list, tuple)):
        return ((f"[{i}]", v) for i, v in enumerate(obj))
    return None


def leaves(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(key path, leaf)`` for every leaf under ``obj``, in order (a leaf is anything but a
    mapping, list or tuple; an empty container has none)."""
    stack: list[tuple[str, Any]] = [(path, obj)]
    while stack:
        p, o = stack.pop()
        items = children(o)
        if items is None:
            yield p, o
        else:
            stack.extend(reversed([(p + k, v) for k, v in items]))


def _values(obj: Any) -> Iterator[Any]:
    """The leaves under ``obj`` in order, as :func:`leaves` finds them, without their key paths."""
    if isinstance(obj, Mapping):
        for v in obj.values():
            yield from _values(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _values(v)
    else:
        yield obj


def holds_tensor(obj: Any) -> bool:
    """Whether ``obj`` is a tensor, or a mapping, list or tuple with a tensor somewhere inside
    (stops at the first)."""
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, Mapping):
        return any(map(holds_tensor, obj.values()))
    return isinstance(obj, (list, tuple)) and any(map(holds_tensor, obj))


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor leaf under ``obj``, in order (tensors inside other objects are not reached)."""
    return [v for v in _values(obj) if isinstance(v, torch.Tensor)]


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
    if cls in PLAIN_TENSOR_TYPES:
        tokens.append(_TENSOR_TOKEN)
        tensors.append(obj)
        if paths is not None:
            paths.append(path)
    elif isinstance(obj, dict):
        keys = tuple(obj)
        values = list(obj.values())
        if cls is dict and values:
            types = set(map(type, values))
            if types <= PLAIN_TENSOR_TYPES:
                # A flat dict of tensors (model.state_dict()): no per-value recursion.
                tokens.append((Token.FLATDICT, keys))
                tensors.extend(values)
                if paths is not None:
                    paths.extend(f"{path}[{k!r}]" for k in keys)
                return
            if types == _DICT_ONLY:
                # A dict of flat dicts of tensors (an optimizer's per-parameter ``state``): one
                # token, and no Python-level step per inner dict.
                flat = list(chain.from_iterable(map(dict.values, values)))
                if set(map(type, flat)) <= PLAIN_TENSOR_TYPES:
                    tokens.append((Token.NESTEDFLAT, keys, tuple(map(tuple, values)), len(flat)))
                    tensors.extend(flat)
                    if paths is not None:
                        paths.extend(f"{path}[{k!r}][{ik!r}]" for k, d in zip(keys, values) for ik in d)
                    return
        tokens.append((Token.DICT, cls, keys))
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
            tokens.append((Token.ATOMS, cls, len(obj)))
            others.append(tuple(obj))
            return
        tokens.append((Token.LIST if cls is list else Token.TUPLE, len(obj)))
        for i, v in enumerate(obj):
            walk(v, tokens, tensors, others, paths, f"{path}[{i}]" if paths is not None else "")
    elif isinstance(obj, tuple) and hasattr(cls, "_fields"):
        tokens.append((Token.NAMEDTUPLE, cls, len(obj)))
        for name, v in zip(cls._fields, obj):
            walk(v, tokens, tensors, others, paths, f"{path}.{name}" if paths is not None else "")
    elif isinstance(obj, torch.Tensor):
        dtensor = _dtensor_class()
        if dtensor is not None and isinstance(obj, dtensor):
            # The local shard is the leaf; the spec (mesh, placements, global shape/stride) is
            # structure, compared on every stage like the keys.
            local = obj._local_tensor
            if type(local) not in PLAIN_TENSOR_TYPES:
                raise StagingInputError(
                    path or "<root>",
                    f"DTensor whose local tensor is a {type(local).__qualname__} is not supported "
                    f"(placements={obj._spec.placements}, local shape={tuple(local.shape)})",
                    "stage DTensors over plain local tensors",
                )
            tokens.append((Token.DTENSOR, cls, obj._spec))
            tensors.append(local)
        else:
            tokens.append((Token.SUBTENSOR, cls))
            tensors.append(obj)
        if paths is not None:
            paths.append(path)
    elif cls in ATOMIC_TYPES:
        tokens.append((Token.ATOM, cls))
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
        tokens.append((Token.OBJECT, cls, len(found)))
        others.append(obj)
        for i, t in enumerate(found):
            walk(t, tokens, tensors, others, paths, f"{path}<{cls.__qualname__} tensor {i}>")


def find_cycle(obj: Any) -> str | None:
    """Key path of the first container that contains itself, or ``None`` (for error messages)."""
    stack: list[tuple[Any, str, frozenset[int]]] = [(obj, "", frozenset())]
    while stack:
        o, path, ancestors = stack.pop()
        items = children(o)
        if items is None:
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
    if kind == Token.TENSOR:
        return staged[next(ten_it)]
    if kind == Token.FLATDICT:
        keys = tok[1]
        first = next(ten_it)
        deque(islice(ten_it, len(keys) - 1), maxlen=0)
        return dict(zip(keys, staged[first : first + len(keys)]))
    if kind == Token.NESTEDFLAT:
        keys, inner, n = tok[1], tok[2], tok[3]
        if not n:
            return {k: {} for k in keys}
        first = next(ten_it)
        deque(islice(ten_it, n - 1), maxlen=0)
        values = iter(staged[first : first + n])
        return {k: dict(zip(ik, values)) for k, ik in zip(keys, inner)}  # zip takes ik first: no overrun
    if kind == Token.DICT:
        cls, keys = tok[1], tok[2]
        template = None if cls is dict else next(oth_it)
        values = [_build(tok_it, ten_it, oth_it, staged, sources, memo) for _ in keys]
        if template is None:
            return dict(zip(keys, values))
        return _new_mapping(template, zip(keys, values), memo)
    if kind == Token.LIST:
        return [_build(tok_it, ten_it, oth_it, staged, sources, memo) for _ in range(tok[1])]
    if kind == Token.TUPLE:
        return tuple(_build(tok_it, ten_it, oth_it, staged, sources, memo) for _ in range(tok[1]))
    if kind == Token.NAMEDTUPLE:
        cls = tok[1]
        values = [_build(tok_it, ten_it, oth_it, staged, sources, memo) for _ in range(tok[2])]
        # _make, not cls(*values): a subclass may give __new__ another signature.
        make = getattr(cls, "_make", None)
        return make(values) if make is not None else cls(*values)
    if kind == Token.SUBTENSOR:
        i = next(ten_it)
        src = sources[i]
        out = staged[i].as_subclass(tok[1])
        for name, value in getattr(src, "__dict__", {}).items():
            setattr(out, name, copy.deepcopy(value, memo))
        return out
    if kind == Token.DTENSOR:
        return _make_dtensor(tok[1], staged[next(ten_it)], tok[2])
    if kind == Token.ATOM:
        return next(oth_it)
    if kind == Token.ATOMS:
        values = next(oth_it)
        return list(values) if tok[1] is list else values
    if kind == Token.OBJECT:
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
