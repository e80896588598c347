"""GraphStager on the CPU: bit-exact copies, containers and objects, async staging, close, bad input."""

from __future__ import annotations

import collections
import dataclasses
import gc
import threading
from concurrent.futures import Future
from typing import Any, NamedTuple

import pytest
import torch
from _helpers import ALL_DTYPES, assert_same, random_tensor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint._state_dict_stager import StateDictStager

from stager import (
    GraphStager,
    StagerClosedError,
    StagingInputError,
)


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_is_bit_exact(dtype: torch.dtype) -> None:
    sd = {"t": random_tensor((7, 5), dtype, seed=1), "s": random_tensor((), dtype, seed=2)}
    with GraphStager() as stager:
        assert_same(sd, stager.stage(sd))


def test_zero_dim_and_zero_element_tensors() -> None:
    sd = {"scalar": torch.tensor(3.5), "empty": torch.empty(0, 4), "empty_t": torch.empty(4, 0).t(),
          "step": torch.tensor(7, dtype=torch.int64)}
    with GraphStager() as stager:
        out = stager.stage(sd)
    assert_same(sd, out)
    assert out["scalar"].item() == 3.5 and out["step"].item() == 7


def test_parameters_and_requires_grad_match_pytorch_stager() -> None:
    sd = {"p": torch.nn.Parameter(torch.randn(3)), "g": torch.randn(2, requires_grad=True)}
    ref = StateDictStager().stage(sd)
    with GraphStager() as stager:
        out = stager.stage(sd)
    for k in sd:
        assert type(out[k]) is type(ref[k]) is torch.Tensor
        assert out[k].requires_grad == ref[k].requires_grad is False
        assert torch.equal(out[k], sd[k].detach())


class Pair(NamedTuple):
    first: Any
    second: Any


@dataclasses.dataclass
class Holder:
    name: str
    tensor: torch.Tensor
    extra: list


def test_containers_and_arbitrary_objects_are_deep_copied() -> None:
    t = torch.randn(4)
    od = collections.OrderedDict(a=torch.ones(2), b=torch.zeros(3))
    od._metadata = {"": {"version": 1}}
    holder = Holder("h", t, [1, 2])
    sd = {"pair": Pair(t, "x"), "od": od, "holder": holder, "list": [1, 2.5, None, "s"], "tup": (t, 3)}
    with GraphStager() as stager:
        out = stager.stage(sd)
    assert isinstance(out["pair"], Pair) and same_storage(out["pair"].first, out["tup"][0])
    assert type(out["od"]) is collections.OrderedDict and out["od"]._metadata == od._metadata
    assert out["od"]._metadata is not od._metadata
    assert isinstance(out["holder"], Holder) and out["holder"] is not holder
    assert out["holder"].extra == [1, 2] and out["holder"].extra is not holder.extra
    assert out["holder"].tensor.device.type == "cpu" and torch.equal(out["holder"].tensor, t)
    assert out["holder"].tensor.data_ptr() != t.data_ptr()
    assert same_storage(out["holder"].tensor, out["pair"].first)
    assert out["list"] == [1, 2.5, None, "s"] and out["list"] is not sd["list"]


def test_staged_copy_is_independent_of_later_updates() -> None:
    sd = {"w": torch.randn(100), "v": torch.randn(3, 3)}
    expected = {k: v.clone() for k, v in sd.items()}
    with GraphStager() as stager:
        out = stager.stage(sd)
        for v in sd.values():
            v.add_(1.0)
        for k in sd:
            assert torch.equal(out[k], expected[k])


@st.composite
def nested_state_dicts(draw: st.DrawFn) -> dict[str, Any]:
    bases = []
    for i in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from(ALL_DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=3)))
        bases.append(random_tensor(shape, dtype, seed=draw(st.integers(0, 10_000))))

    def leaf() -> Any:
        kind = draw(st.sampled_from(["base", "view", "t", "int", "str"]))
        b = draw(st.sampled_from(bases))
        if kind == "base":
            return b
        if kind == "view" and b.dim() >= 1 and b.shape[0] > 1:
            return b[1:]
        if kind == "t" and b.dim() >= 2:
            return b.transpose(0, 1)
        if kind == "str":
            return draw(st.text(max_size=3))
        return draw(st.integers())

    def tensor_leaf() -> Any:
        b = draw(st.sampled_from(bases))
        kind = draw(st.sampled_from(["base", "view", "t"]))
        if kind == "view" and b.dim() >= 1 and b.shape[0] > 1:
            return b[1:]
        if kind == "t" and b.dim() >= 2:
            return b.transpose(0, 1)
        return b

    def node(depth: int) -> Any:
        if depth == 0 or draw(st.booleans()):
            return leaf()
        kind = draw(st.sampled_from(["dict", "list", "tuple", "per-parameter"]))
        if kind == "per-parameter":  # a dict of flat dicts of tensors, some empty
            return {
                p: {f"s{j}": tensor_leaf() for j in range(draw(st.integers(0, 3)))}
                for p in range(draw(st.integers(1, 3)))
            }
        n = draw(st.integers(0, 3))
        children = [node(depth - 1) for _ in range(n)]
        if kind == "dict":
            return {f"k{i}": c for i, c in enumerate(children)}
        return children if kind == "list" else tuple(children)

    return {f"top{i}": node(3) for i in range(draw(st.integers(1, 4)))}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sd=nested_state_dicts())
def test_random_nested_state_dicts_are_bit_exact(sd: dict[str, Any]) -> None:
    with GraphStager() as stager:
        out = stager.stage(sd)
        assert_same(sd, out)
        again = stager.stage(sd)  # a replay of the same plan
        assert_same(sd, again)
        assert stager.plans_built == 1


def test_async_staging_returns_a_future_of_the_staged_dict() -> None:
    sd = {"w": torch.randn(100)}
    with GraphStager(async_staging=True) as stager:
        fut = stager.stage(sd)
        assert isinstance(fut, Future)
        assert_same(sd, fut.result(timeout=30))
        stager.synchronize_staging()


def test_close_twice_is_harmless_and_stage_after_close_raises() -> None:
    stager = GraphStager()
    out = stager.stage({"w": torch.ones(3)})
    stager.close()
    stager.close()
    with pytest.raises(StagerClosedError):
        stager.stage({"w": torch.ones(3)})
    gc.collect()
    assert torch.equal(out["w"], torch.ones(3))  # handed-out copies outlive the stager


def test_implements_dcp_async_stager_protocol() -> None:
    from torch.distributed.checkpoint.staging import AsyncStager

    assert isinstance(GraphStager(), AsyncStager)


class _Unsupported(torch.Tensor):
    @staticmethod
    def __new__(cls, size: int) -> "_Unsupported":
        return torch.Tensor._make_wrapper_subclass(cls, (size,), dtype=torch.float32)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError(f"{func}")


def _bad_inputs() -> list[Any]:
    return [
        pytest.param(torch.empty(3, device="meta"), "meta tensor", id="meta"),
        pytest.param(torch.eye(3).to_sparse(), "layout torch.sparse_coo", id="sparse"),
        pytest.param(torch.randn(3, dtype=torch.complex64).conj(), "conjugate", id="conj"),
        pytest.param(threading.Lock(), "cannot be copied", id="lock"),
        pytest.param(_Unsupported(3), "no storage of its own", id="wrapper-subclass"),
    ]


@pytest.mark.parametrize("bad, problem", _bad_inputs())
def test_bad_input_names_the_key_path_before_anything_is_staged(bad: Any, problem: str) -> None:
    sd = {"ok": torch.randn(4), "model": {"layers": [torch.randn(2), bad]}}
    with GraphStager() as stager:
        with pytest.raises(StagingInputError, match=r"\['model'\]\['layers'\]\[1\]") as info:
            stager.stage(sd)
        assert problem in str(info.value)
        assert stager._sets == [] and stager.last_stats is None and stager.plan is None


def test_a_dict_of_flat_dicts_keeps_its_structure_ties_and_key_paths() -> None:
    # The shape of an optimizer's per-parameter state, staged without a step per inner dict.
    shared = torch.randn(6)
    state = {
        0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3), "exp_avg_sq": shared[:3]},
        1: {},
        "x": {"exp_avg": shared, "view": shared[2:].view(2, 2)},
    }
    sd = {"state": state, "after": torch.arange(4), "empty": {0: {}, 1: {}}}
    with GraphStager() as stager:
        out = stager.stage(sd)
        assert_same(sd, out)
        assert list(out["state"]) == [0, 1, "x"]
        assert list(out["state"][0]) == ["step", "exp_avg", "exp_avg_sq"]
        assert out["state"][1] == {} and out["empty"] == {0: {}, 1: {}}
        staged_shared = out["state"]["x"]["exp_avg"]
        assert same_storage(out["state"][0]["exp_avg_sq"], staged_shared)
        view = out["state"]["x"]["view"]
        assert view.untyped_storage().data_ptr() == staged_shared.untyped_storage().data_ptr()
        assert view.storage_offset() == staged_shared.storage_offset() + 2
        del view, staged_shared
        del out
        state[1]["exp_avg"] = torch.zeros(1)  # a key added to one inner dict: another structure
        assert_same(sd, stager.stage(sd))
        assert stager.plans_built == 2
        state[1]["bad"] = torch.empty(1, device="meta")
        with pytest.raises(StagingInputError, match=r"\['state'\]\[1\]\['bad'\]"):
            stager.stage(sd)


def test_a_namedtuple_with_its_own_constructor_is_rebuilt() -> None:
    class Pair(collections.namedtuple("Pair", "a b")):
        def __new__(cls, pair: tuple) -> "Pair":
            return super().__new__(cls, *pair)

    sd = {"x": Pair((torch.ones(2), 3))}
    with GraphStager() as stager:
        out = stager.stage(sd)
        assert type(out["x"]) is Pair and out["x"].b == 3
        assert torch.equal(out["x"].a, sd["x"].a)


def test_a_state_dict_that_contains_itself_is_refused_with_the_path() -> None:
    inner: dict[str, Any] = {"w": torch.ones(2)}
    inner["loop"] = [inner]
    with GraphStager() as stager:
        with pytest.raises(StagingInputError, match=r"\['m'\]\['loop'\]\[0\].*cycle"):
            stager.stage({"m": inner})


def test_a_stage_inside_inference_mode_leaves_later_stages_working() -> None:
    sd = {"w": torch.arange(8.0)}
    with GraphStager(cache_policy="cached", max_arenas=1) as stager:
        with torch.inference_mode():
            out = stager.stage(sd)
        assert not out["w"].is_inference()
        del out
        sd["w"].add_(1)
        again = stager.stage(sd)  # the arena made inside inference mode is written outside it
        assert_same(sd, again)
        assert stager.last_stats.arena == "cached"


def test_close_on_another_thread_waits_for_a_stage_in_progress() -> None:
    src = {f"t{i}": torch.full((20_000,), float(i)) for i in range(300)}
    stager = GraphStager()
    started, release = threading.Event(), threading.Event()
    real_copy = stager._copy_cpu

    def slow_copy(*args: Any) -> None:
        started.set()
        release.wait(10)
        real_copy(*args)

    stager._copy_cpu = slow_copy  # type: ignore[method-assign]
    out: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: out.setdefault("staged", stager.stage(src)))
    worker.start()
    assert started.wait(10)
    closer = threading.Thread(target=stager.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # close() waits for the stage in progress...
    release.set()
    worker.join(10)
    closer.join(10)
    assert not closer.is_alive()
    assert_same(src, out["staged"])  # ...which completes with its plan intact
    with pytest.raises(StagerClosedError):
        stager.stage(src)


def test_module_level_last_stats_follows_the_latest_stage() -> None:
    import stager

    with GraphStager() as a, GraphStager() as b:
        a.stage({"w": torch.ones(3)})
        assert stager.last_stats is a.last_stats
        b.stage({"w": torch.ones(5), "v": torch.ones(2)})
        assert stager.last_stats is b.last_stats and stager.last_stats.tensors == 2
        assert stager.last_stats.to_dict()["nbytes"] == 28

