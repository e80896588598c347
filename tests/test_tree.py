"""The state-dict tree: walk and rebuild are inverse, tokens account for every leaf, key paths."""

from __future__ import annotations

import threading
from collections import OrderedDict, defaultdict, namedtuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stager.errors import StagingInputError
from stager.tree import Token, children, consumes, find_cycle, holds_tensor, leaves, rebuild, tensors_in, walk

Pair = namedtuple("Pair", "left right")


def _walk(obj):
    tokens, tensors, others, paths = [], [], [], []
    walk(obj, tokens, tensors, others, paths)
    return tokens, tensors, others, paths


def _tensor(seed: int) -> torch.Tensor:
    return torch.arange(seed % 5 + 1, dtype=torch.float32) + seed


atoms = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=4), st.booleans())
trees = st.recursive(
    st.one_of(atoms, st.integers(0, 100).map(_tensor)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=3), inner, max_size=4),
        st.dictionaries(st.text(max_size=3), inner, max_size=4).map(OrderedDict),
        st.tuples(inner, inner).map(lambda t: Pair(*t)),
    ),
    max_leaves=12,
)


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    items_a, items_b = children(a), children(b)
    if items_a is None:
        return a == b
    pairs_a, pairs_b = list(items_a), list(items_b)
    return len(pairs_a) == len(pairs_b) and all(
        ka == kb and _same(va, vb) for (ka, va), (kb, vb) in zip(pairs_a, pairs_b)
    )


@settings(max_examples=150, deadline=None)
@given(trees)
def test_rebuild_of_a_walk_is_the_same_tree_around_the_given_tensors(tree) -> None:
    tokens, tensors, others, _ = _walk(tree)
    clones = [t.clone() for t in tensors]
    out = rebuild(tokens, clones, tensors, others)
    assert _same(out, tree)
    assert [id(t) for t in tensors_in(out)] == [id(t) for t in clones]


@settings(max_examples=150, deadline=None)
@given(trees)
def test_tokens_account_for_every_tensor_and_other(tree) -> None:
    tokens, tensors, others, paths = _walk(tree)
    assert all(isinstance(tok[0], Token) for tok in tokens)
    counts = [consumes(tok) for tok in tokens]
    assert sum(n for n, _ in counts) == len(tensors) == len(paths)
    assert sum(m for _, m in counts) == len(others)


@settings(max_examples=100, deadline=None)
@given(trees)
def test_the_walker_and_leaves_agree_on_tensors_and_key_paths(tree) -> None:
    _, tensors, _, paths = _walk(tree)
    found = [(p, v) for p, v in leaves(tree) if isinstance(v, torch.Tensor)]
    assert [p for p, _ in found] == paths
    assert [id(v) for _, v in found] == [id(t) for t in tensors]
    assert holds_tensor(tree) == bool(tensors)


def test_flat_and_nested_flat_dicts_are_one_token_each() -> None:
    a, b, c = torch.ones(2), torch.zeros(3), torch.full((1,), 7.0)
    tokens, tensors, _, paths = _walk({"model": {"w": a, "b": b}, "state": {0: {"exp_avg": c}}})
    kinds = [tok[0] for tok in tokens]
    assert kinds == [Token.DICT, Token.FLATDICT, Token.NESTEDFLAT]
    assert paths == ["['model']['w']", "['model']['b']", "['state'][0]['exp_avg']"]
    assert tensors == [a, b, c]


def test_dict_subclasses_keep_their_class_order_and_factory() -> None:
    dd = defaultdict(list, {"x": torch.ones(1)})
    od = OrderedDict([("b", torch.ones(1)), ("a", torch.zeros(1))])
    tokens, tensors, others, _ = _walk({"dd": dd, "od": od})
    out = rebuild(tokens, [t.clone() for t in tensors], tensors, others)
    assert type(out["dd"]) is defaultdict and out["dd"].default_factory is list
    assert type(out["od"]) is OrderedDict and list(out["od"]) == ["b", "a"]


class Box:
    def __init__(self, t: torch.Tensor) -> None:
        self.t, self.note = t, ["kept"]


def test_objects_are_deep_copied_with_their_tensors_replaced() -> None:
    box = Box(torch.ones(2))
    tokens, tensors, others, paths = _walk({"box": box})
    assert tokens[1][0] is Token.OBJECT and paths == ["['box']<Box tensor 0>"]
    staged = [torch.full((2,), 5.0)]
    out = rebuild(tokens, staged, tensors, others)
    assert out["box"] is not box and out["box"].t is staged[0] and out["box"].note == ["kept"]


def test_an_object_that_cannot_be_copied_is_refused_with_its_key_path() -> None:
    with pytest.raises(StagingInputError, match=r"\['opt'\]\['lock'\].*cannot be copied"):
        _walk({"opt": {"lock": threading.Lock()}})


def test_leaves_and_find_cycle_write_key_paths_the_same_way() -> None:
    t = torch.ones(1)
    assert list(leaves({"a": [t, 3], "b": ()})) == [("['a'][0]", t), ("['a'][1]", 3)]
    loop: dict = {"x": {"y": []}}
    loop["x"]["y"].append(loop["x"])
    assert find_cycle(loop) == "['x']['y'][0]"
    assert find_cycle({"a": [1, 2]}) is None
    assert not holds_tensor({"a": [1, "t"]}) and tensors_in(t) == [t]
