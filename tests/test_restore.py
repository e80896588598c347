"""In-memory restore: ``GraphStager.restore(staged, into)`` copies a staged dict back, bit-exact."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from stager import GraphStager, RestoreMismatchError
from stager.restore import _restore_packed, _split_packable, match_tensors, restore_state


def make_state() -> dict[str, Any]:
    """Views, tied tensors, a non-contiguous view, odd dtypes, empty and 0-dim tensors, non-tensor leaves."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, generator=g)
    weight = torch.nn.Parameter(torch.randn(5, 7, generator=g))
    return {
        "model": {
            "weight": weight,
            "tied": weight,
            "view_lo": base[:32].view(4, 8),
            "view_hi": base[30:],  # overlaps view_lo by two elements
            "transposed": torch.randn(6, 3, generator=g).t(),
            "half": torch.randn(9, generator=g).half(),
            "ints": torch.arange(11, dtype=torch.int64),
            "flags": torch.tensor([True, False, True]),
            "scalar": torch.tensor(3.5),
            "empty": torch.empty(0, 4),
        },
        "optim": {
            "state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.randn(5, 7, generator=g)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0]}],
        },
        "extra": [torch.randn(3, generator=g), ("name", torch.ones(2, dtype=torch.bfloat16))],
    }


def clone_tensors(state: Any) -> Any:
    return copy.deepcopy(state)


def scramble(state: Any) -> None:
    """Change every tensor of ``state`` in place."""
    with torch.no_grad():
        for _, t, _ in match_tensors(state, state):
            if t.dtype == torch.bool:
                t.logical_not_()
            elif t.is_floating_point():
                t.add_(1.25)
            else:
                t.add_(3)


def assert_same(got: Any, want: Any) -> None:
    for w, g, path in match_tensors(want, got):
        assert torch.equal(g, w), path


def test_restore_cpu_is_bit_exact() -> None:
    live = make_state()
    expected = clone_tensors(live)
    with GraphStager() as stager:
        staged = stager.stage(live)
        scramble(live)
        stats = stager.restore(staged, live)
    assert_same(live, expected)
    assert live["model"]["tied"] is live["model"]["weight"]
    assert stats.executor == "restore-cpu"
    assert stats.tensors == len(match_tensors(live, live))
    assert "restore" in stats.notes
    assert stats.to_dict()["blocked_s"] >= 0


def test_restore_into_fresh_state_dict() -> None:
    """Restore into ``model.state_dict()`` (detached tensors) writes the parameters."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    expected = copy.deepcopy(model.state_dict())
    with GraphStager() as stager:
        staged = stager.stage(model.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-2)
        model.train()(torch.randn(16, 4))  # updates the BatchNorm buffers
        stager.restore(staged, model.state_dict())
    assert_same(model.state_dict(), expected)


def _mismatched(kind: str) -> tuple[dict[str, Any], str]:
    target = make_state()
    if kind == "shape":
        target["model"]["weight"] = torch.nn.Parameter(torch.zeros(5, 8))
        return target, "['model']['weight']"
    if kind == "dtype":
        target["optim"]["state"][0]["step"] = torch.tensor(7, dtype=torch.int64)
        return target, "['optim']['state'][0]['step']"
    if kind == "missing key":
        del target["model"]["ints"]
        return target, "state_dict['model']"
    if kind == "extra key":
        target["optim"]["state"][1] = {"step": torch.tensor(1.0)}
        return target, "['optim']['state']"
    if kind == "length":
        target["extra"].append(torch.zeros(1))
        return target, "['extra']"
    if kind == "not a tensor":
        target["extra"][1] = ("name", 2.0)
        return target, "['extra'][1][1]"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["shape", "dtype", "missing key", "extra key", "length", "not a tensor"])
def test_mismatch_raises_value_error_naming_the_path(kind: str) -> None:
    live = make_state()
    with GraphStager() as stager:
        staged = stager.stage(live)
    target, path = _mismatched(kind)
    before = clone_tensors(target)
    with pytest.raises(ValueError, match="cannot restore") as info:
        restore_state(staged, target)
    assert isinstance(info.value, RestoreMismatchError)
    assert path in str(info.value)
    assert_same(target, before)  # raised before anything was copied


def test_non_tensor_leaves_are_left_alone() -> None:
    live = make_state()
    with GraphStager() as stager:
        staged = stager.stage(live)
    live["optim"]["param_groups"][0]["lr"] = 0.5
    restore_state(staged, live)
    assert live["optim"]["param_groups"][0]["lr"] == 0.5


# the device path, run on the CPU


def test_split_packable_dedupes_tied_and_isolates_overlaps() -> None:
    live = make_state()
    staged = clone_tensors(live)
    pairs = [(s, t) for s, t, _ in match_tensors(staged, live)]
    fast, slow = _split_packable(pairs)
    fast_live = [t for _, t in fast]
    slow_live = [t for _, t in slow]
    m = live["model"]
    assert sum(t is m["weight"] for t in fast_live) == 1  # tied: one region
    assert any(t is m["view_lo"] for t in slow_live) and any(t is m["view_hi"] for t in slow_live)
    assert any(t is m["transposed"] for t in slow_live)  # not contiguous
    assert all(t.numel() for t in fast_live + slow_live)  # empty tensors copy nothing
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in fast_live)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize(
    "from_arena, limits, counts",
    [
        pytest.param(True, {}, (5, 1), id="arena-span"),
        pytest.param(False, {}, (5, 1), id="host-packed"),
        pytest.param(True, {"chunk_bytes": 64}, (5, 1), id="runs-of-one-small-chunk"),
        pytest.param(True, {"pack_threshold": 64}, (3, 3), id="large-ones-copied-directly"),
    ],
)
def test_restore_packed_unpacks_every_byte_and_nothing_else(
    from_arena: bool, limits: dict[str, int], counts: tuple[int, int]
) -> None:
    """``_restore_packed`` (the CUDA path's core) on CPU tensors: runs through one buffer, each
    one unpack_scatter; tensors over the threshold copied directly."""
    g = torch.Generator().manual_seed(1)
    pool = torch.full((4096,), 0xA5, dtype=torch.uint8)  # live tensors live inside a poisoned pool
    shapes = [(3,), (5, 7), (1,), (33,), (2, 2, 2)]
    dtypes = [torch.float32, torch.float16, torch.int64, torch.uint8, torch.float64]
    live, offset = [], 8
    for shape, dtype in zip(shapes, dtypes):
        n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        live.append(pool[offset : offset + n].view(dtype).view(shape))
        offset = (offset + n + 24 + 7) // 8 * 8
    live.append(live[1])  # tied
    live.append(pool[2000:2064].view(torch.float32).view(4, 4).t())  # non-contiguous: copied alone
    with GraphStager() as stager:
        staged_dict = stager.stage({str(i): t for i, t in enumerate(live)})
        staged = [staged_dict[str(i)] for i in range(len(live))]
        want = [
            torch.randint(0, 255, (t.numel() * t.element_size(),), dtype=torch.uint8, generator=g)
            for t in staged
        ]
        for s, w in zip(staged, want):
            if s.is_contiguous():
                s.reshape(-1).view(torch.uint8).copy_(w)
        staged[-2] = staged[1]
        before = pool.clone()
        buffers = [s.arena.tensor for s in stager._sets] if from_arena else []
        n_fast, n_slow = _restore_packed(list(zip(staged, live)), torch.device("cpu"), buffers, **limits)
    assert (n_fast, n_slow) == counts
    for s, t in zip(staged, live):  # random bytes include NaNs: compare bytes
        assert torch.equal(
            t.contiguous().reshape(-1).view(torch.uint8), s.contiguous().reshape(-1).view(torch.uint8)
        )
    touched = torch.zeros(4096, dtype=torch.bool)
    for t in live:
        lo = t.data_ptr() - pool.data_ptr()
        touched[lo : lo + t.numel() * t.element_size()] = True
    assert torch.equal(pool[~touched], before[~touched])


# awkward targets


def test_restore_into_a_broadcast_target_and_bool_bytes_is_bit_exact() -> None:
    sd = {
        "a": torch.arange(3.0),
        "exp": torch.ones(1, 3).expand(4, 3),  # stride 0: one row in memory
        "b": torch.tensor([1, 2, 255], dtype=torch.uint8).view(torch.bool),  # bytes other than 0/1
    }
    want = {k: v.clone() for k, v in sd.items()}
    with GraphStager() as stager:
        staged = stager.stage(sd)
        sd["a"].zero_()
        sd["exp"].untyped_storage().fill_(0)
        sd["b"].view(torch.uint8).zero_()
        stager.restore(staged, sd)
    assert torch.equal(sd["a"], want["a"]) and torch.equal(sd["exp"], want["exp"])
    assert sd["b"].view(torch.uint8).tolist() == [1, 2, 255]


def test_restore_into_overlapping_windows_is_bit_exact() -> None:
    base = torch.arange(6.0)
    sd = {"a": torch.arange(3.0), "win": base.as_strided((3, 3), (1, 1))}  # overlapping windows
    want = {k: v.clone() for k, v in sd.items()}
    with GraphStager() as stager:
        staged = stager.stage(sd)
        sd["a"].zero_()
        base.zero_()
        stager.restore(staged, sd)
    assert torch.equal(sd["a"], want["a"]) and torch.equal(sd["win"], want["win"])


def test_restore_takes_the_future_of_an_async_stage_and_refuses_a_leaf_for_a_container() -> None:
    model = torch.nn.Linear(4, 4)
    with GraphStager(async_staging=True) as stager:
        staged = stager.stage(model.state_dict())
        staged.result()  # staging done: the source may change (the Future goes to restore)
        want = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            model.weight.add_(1)
        assert stager.restore(staged, model.state_dict()).tensors == 2
        assert torch.equal(model.weight, want["weight"])
        with pytest.raises(RestoreMismatchError, match=r"\['a'\]"):
            stager.restore({"a": None}, {"a": {"w": torch.zeros(1)}})
