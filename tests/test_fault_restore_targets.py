"""restore() refuses targets it cannot write faithfully, naming the key path(s), before it writes
anything: two targets that share memory the staged copy does not share the same way, and
inference tensors (outside inference mode)."""

from __future__ import annotations

import pytest
import torch

from stager import GraphStager, RestoreMismatchError
from stager.restore import restore_state


def test_partly_overlapping_targets_with_independent_staged_tensors_are_refused() -> None:
    base = torch.full((10,), -1.0)
    into = {"keep": torch.full((3,), -1.0), "m": {"a": base[0:6], "b": base[4:10]}}
    staged = {"keep": torch.ones(3), "m": {"a": torch.ones(6), "b": torch.full((6,), 2.0)}}
    with pytest.raises(RestoreMismatchError) as info:
        restore_state(staged, into)
    msg = str(info.value)
    assert "state_dict['m']['a']" in msg and "state_dict['m']['b']" in msg
    assert "overlap in memory" in msg
    assert torch.equal(base, torch.full((10,), -1.0))  # nothing written
    assert torch.equal(into["keep"], torch.full((3,), -1.0))


def test_overlap_at_a_different_distance_in_the_staged_copy_is_refused() -> None:
    staged_base = torch.arange(10.0)
    staged = {"a": staged_base[0:6], "b": staged_base[3:9]}  # one storage, but shifted by 3
    base = torch.zeros(10)
    with pytest.raises(RestoreMismatchError, match=r"state_dict\['a'\] and state_dict\['b'\]"):
        restore_state(staged, {"a": base[0:6], "b": base[4:10]})
    assert not base.any()


def test_strided_views_that_share_a_column_are_refused() -> None:
    x = torch.zeros(4, 3)
    into = {"left": x[:, 0:2], "right": x[:, 1:3]}
    staged = {"left": torch.ones(4, 2), "right": torch.full((4, 2), 2.0)}
    with pytest.raises(RestoreMismatchError, match=r"\['left'\] and state_dict\['right'\]"):
        restore_state(staged, into)
    assert not x.any()


def test_interleaved_views_that_share_no_byte_are_restored() -> None:
    x = torch.zeros(5, 2)
    into = {"re": x[:, 0], "im": x[:, 1]}  # spans intersect, elements do not
    staged = {"re": torch.arange(5.0), "im": -torch.arange(5.0)}
    restore_state(staged, into)
    assert torch.equal(x[:, 0], staged["re"]) and torch.equal(x[:, 1], staged["im"])


def test_overlapping_views_staged_from_the_same_state_and_tied_targets_still_restore() -> None:
    base = torch.arange(16.0)
    weight = torch.randn(3, 3)
    sd = {"lo": base[:10].view(2, 5), "hi": base[8:], "w": weight, "tied": weight}
    want = {k: v.clone() for k, v in sd.items()}
    with GraphStager() as stager:
        staged = stager.stage(sd)
        base.zero_()
        weight.zero_()
        stager.restore(staged, sd)
    for k in sd:
        assert torch.equal(sd[k], want[k]), k


def test_an_inference_tensor_target_is_refused_with_its_key_path() -> None:
    first = torch.zeros(4)
    with torch.inference_mode():
        frozen = torch.zeros(3)
    into = {"a": first, "net": {"frozen": frozen}}
    staged = {"a": torch.ones(4), "net": {"frozen": torch.ones(3)}}
    with GraphStager() as stager:
        with pytest.raises(RestoreMismatchError) as info:
            stager.restore(staged, into)
    msg = str(info.value)
    assert "state_dict['net']['frozen']" in msg and "inference tensor" in msg
    assert "torch.inference_mode()" in msg
    assert not first.any() and not frozen.any()  # nothing written
    with torch.inference_mode():  # where inference tensors can be written, restore writes them
        restore_state(staged, into)
    assert torch.equal(frozen, torch.ones(3)) and torch.equal(first, torch.ones(4))
