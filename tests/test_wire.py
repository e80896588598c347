"""The replication wire protocol without a process group: the header, the replies and the leaves.

What travels between ranks is tested with real gloo ranks in ``test_replication.py``; here each
encoding is checked on its own: a header survives its round trip and anything that is not one is
refused, both ends agree on what round 3 carries, and the non-tensor leaves come back with every
staged tensor as its index.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
from typing import Any

import pytest
import torch

from stager.distributed.wire import (
    ABORTED,
    MAGIC,
    NEED_OTHERS,
    NEED_PLAN,
    Header,
    Ref,
    blob_parts,
    decode_leaves,
    encode_leaves,
)
from stager.errors import ReplicationError
from stager.tree import walk


@dataclasses.dataclass
class Holder:
    name: str
    tensor: torch.Tensor


class Tagged(torch.Tensor):
    pass


def _walk(sd: Any) -> tuple[list[tuple], list[torch.Tensor], list[Any]]:
    tokens: list[tuple] = []
    tensors: list[torch.Tensor] = []
    others: list[Any] = []
    walk(sd, tokens, tensors, others, [])
    return tokens, tensors, others


def test_a_header_survives_its_round_trip_as_int64_after_the_magic() -> None:
    header = Header(
        failed=True, plan_key=5, buffer_bytes=1 << 40, chunk_bytes=7, plan_len=1, leaves_len=2,
        error_len=3, leaves_changed=True, checksums=4,
    )
    wire = header.encode()
    assert wire.dtype == torch.int64 and wire.tolist() == [MAGIC, 1, 5, 1 << 40, 7, 1, 2, 3, 1, 4]
    back = Header.decode(wire, src=1)
    assert back == header and back.failed is True and back.leaves_changed is True
    assert Header.decode(Header().encode(), src=0) == Header()


@pytest.mark.parametrize(
    "field, value",
    [
        pytest.param(0, MAGIC + 1, id="bad-magic"),
        pytest.param(4, 0, id="no-chunk-bytes"),
        pytest.param(3, -1, id="negative-buffer-bytes"),
    ],
)
def test_anything_but_a_header_is_refused_naming_the_sender(field: int, value: int) -> None:
    wire = Header(buffer_bytes=64, chunk_bytes=16).encode()
    wire[field] = value
    with pytest.raises(ReplicationError, match="rank 3 sent something that is not a stager replication"):
        Header.decode(wire, src=3)


@pytest.mark.parametrize(
    "failed, reply, changed, parts",
    [
        pytest.param(False, 0, False, (False, False), id="nothing-needed"),
        pytest.param(False, NEED_PLAN, False, (True, False), id="plan"),
        pytest.param(False, NEED_OTHERS, False, (False, True), id="leaves"),
        pytest.param(False, 0, True, (False, True), id="leaves-changed"),
        pytest.param(False, NEED_PLAN | NEED_OTHERS, False, (True, True), id="both"),
        pytest.param(False, NEED_PLAN | NEED_OTHERS | ABORTED, True, (False, False), id="aborted"),
        pytest.param(True, NEED_PLAN | NEED_OTHERS, True, (False, False), id="sender-failed"),
    ],
)
def test_both_ends_agree_on_what_the_metadata_round_carries(
    failed: bool, reply: int, changed: bool, parts: tuple[bool, bool]
) -> None:
    assert blob_parts(failed, reply, changed) == parts


def test_non_tensor_leaves_come_back_with_each_tensor_as_its_index() -> None:
    t = torch.ones(2)
    tagged = torch.zeros(3).as_subclass(Tagged)
    tagged.note = "kept"
    od = collections.OrderedDict(a=torch.arange(3))
    sd = {
        "w": t, "holder": Holder("h", t), "groups": [{"lr": 0.1, "betas": (0.9, 0.99)}],
        "od": od, "tagged": tagged, "none": None, "step": 3,
    }
    tokens, tensors, others = _walk(sd)
    raw = encode_leaves(tensors, others, tokens)
    back, refs = decode_leaves(raw, len(tensors))
    assert len(refs) == len(tensors) and [r.i for r in refs] == list(range(len(tensors)))
    holder = back[0]
    assert isinstance(holder, Holder) and holder.name == "h" and isinstance(holder.tensor, Ref)
    assert tensors[holder.tensor.i] is t  # the tensor travels as its index, not by value
    assert back[1:3] == [0.1, (0.9, 0.99)] and back[4:] == [None, 3]
    # A dict subclass travels empty: its values are leaves of their own.
    assert type(back[3]) is collections.OrderedDict and back[3] == {} and len(od) == 1
    [at] = [i for i, x in enumerate(tensors) if x is tagged]
    assert refs[at].__dict__ == {"note": "kept"}  # a subclass's attributes travel with its index
    with pytest.raises(TypeError, match="placeholder"):
        pickle.dumps(refs[0])


def test_a_flat_dict_of_tensors_sends_no_leaves() -> None:
    tokens, tensors, others = _walk({"a": torch.ones(2), "b": torch.zeros(1)})
    raw = encode_leaves(tensors, others, tokens)
    assert raw == b""
    back, refs = decode_leaves(raw, len(tensors))
    assert back == [] and [r.i for r in refs] == [0, 1]


def test_a_leaf_that_stages_but_does_not_pickle_is_a_clear_replication_error() -> None:
    tokens, tensors, others = _walk({"w": torch.ones(1), "fn": lambda: 1})  # deep-copies, never pickles
    with pytest.raises(ReplicationError, match="leaf of the staged dict cannot be pickled.*lambda"):
        encode_leaves(tensors, others, tokens)
