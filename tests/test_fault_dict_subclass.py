"""Dict subclasses in a state dict are rebuilt as themselves, without calling their own methods."""

from __future__ import annotations

import collections
from typing import Any

import pytest
import torch

from stager import GraphStager, StagingInputError


class AttrDict(dict):
    """easydict-style: attributes and items are the same thing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for k, v in self.items():
            object.__setattr__(self, k, v)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        self[name] = value


class ReadOnly(dict):
    def __setitem__(self, key: Any, value: Any) -> None:
        raise TypeError("read-only")

    def update(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("read-only")


class NeedsArgs(dict):
    def __new__(cls, required: int) -> "NeedsArgs":  # cls.__new__(cls) fails
        return super().__new__(cls)

    def __init__(self, required: int) -> None:
        super().__init__()


def _stage_twice(sd: dict[str, Any]) -> list[Any]:
    with GraphStager() as stager:
        return [stager.stage(sd), stager.stage(sd)]  # planned, then replayed


def test_counter_is_rebuilt_with_its_counts() -> None:
    # Rebuilding through Counter.update counted the (key, value) pairs: {('the', 10): 1}.
    sd = {"token_counts": collections.Counter({"the": 10, "a": 3}), "w": torch.ones(2)}
    for out in _stage_twice(sd):
        assert type(out["token_counts"]) is collections.Counter
        assert out["token_counts"] == collections.Counter({"the": 10, "a": 3})


def test_attribute_and_read_only_dicts_are_rebuilt() -> None:
    ad = AttrDict(lr=0.1, w=torch.arange(4.0))
    ro = dict.__new__(ReadOnly)
    dict.__setitem__(ro, "x", torch.ones(3))
    for out in _stage_twice({"cfg": ad, "ro": ro}):
        assert type(out["cfg"]) is AttrDict and out["cfg"]["lr"] == 0.1 and out["cfg"].lr == 0.1
        assert torch.equal(out["cfg"]["w"], torch.arange(4.0))
        assert type(out["ro"]) is ReadOnly and torch.equal(out["ro"]["x"], torch.ones(3))


def test_ordered_and_default_dicts_keep_their_order_and_factory() -> None:
    od = collections.OrderedDict([("b", torch.ones(1)), ("a", torch.zeros(1))])
    dd = collections.defaultdict(list, {"k": torch.ones(2)})
    for out in _stage_twice({"od": od, "dd": dd}):
        assert type(out["od"]) is collections.OrderedDict and list(out["od"]) == ["b", "a"]
        out["od"].move_to_end("b")  # a working OrderedDict, not one corrupted by dict.__setitem__
        assert list(out["od"]) == ["a", "b"]
        assert type(out["dd"]) is collections.defaultdict and out["dd"].default_factory is list
        assert out["dd"]["missing"] == []


def test_a_dict_subclass_that_cannot_be_rebuilt_is_refused_before_copying() -> None:
    bad = NeedsArgs(1)
    dict.__setitem__(bad, "w", torch.ones(2))
    with GraphStager() as stager:
        with pytest.raises(StagingInputError, match=r"state_dict\['opt'\].*NeedsArgs cannot be rebuilt"):
            stager.stage({"w": torch.ones(1), "opt": bad})
        assert stager.last_stats is None  # nothing was staged


class Slotted(dict):
    __slots__ = ("meta",)


def test_slots_of_a_dict_subclass_are_kept() -> None:
    d = Slotted(w=torch.ones(2))
    d.meta = {"version": 3}
    for out in _stage_twice({"d": d}):
        assert type(out["d"]) is Slotted and out["d"].meta == {"version": 3}
        assert out["d"].meta is not d.meta and torch.equal(out["d"]["w"], torch.ones(2))
