"""The staging plan: regions and leaves of a state dict, the arena layout, signatures and plan matching.

The unit tests build plans directly (``build_plan`` through ``plan_of``); the others stage through
``GraphStager`` and check what the plan decides: which storages share a region, which spans are
staged, and when a state dict is staged with the plan it has or re-planned.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch
from _helpers import assert_same
from _staging import plan_of

from stager import GraphStager, StagingInputError
from stager.plan import arena_layout, tensor_signature


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_build_plan_stages_one_region_per_storage_and_each_leaf_points_into_it() -> None:
    base = torch.arange(40, dtype=torch.float32)
    other = torch.arange(6, dtype=torch.int16)
    sd = {"a": base[4:12], "b": base[20:24].view(2, 2), "c": other, "empty": torch.empty(0, 3)}
    plan, _, _ = plan_of(sd, alignment=64)
    # base: bytes 16 (a's first) to 96 (b's last); other: all 12 bytes; the empty tensor: none.
    assert [(r.index, r.src_offset, r.nbytes) for r in plan.regions] == [(0, 16, 80), (1, 0, 12)]
    assert [r.arena_offset for r in plan.regions] == [0, 128]  # each at a multiple of 64
    assert (plan.arena_bytes, plan.nbytes) == (192, 92)
    leaves = {leaf.path: leaf for leaf in plan.leaves}
    assert (leaves["['a']"].region, leaves["['a']"].offset, leaves["['a']"].size) == (0, 0, (8,))
    b = leaves["['b']"]
    assert (b.region, b.offset, b.size, b.stride, b.dtype) == (0, 16, (2, 2), (2, 1), torch.float32)
    assert (leaves["['c']"].region, leaves["['c']"].offset) == (1, 0)
    assert leaves["['empty']"].region == -1
    assert plan.cpu_index == [0, 1] and plan.device_regions == {}
    assert torch.equal(plan.src_views[0], base.view(torch.uint8)[16:96])
    assert torch.equal(plan.src_views[1], other.view(torch.uint8))


def test_a_region_starts_at_a_multiple_of_its_largest_element_size() -> None:
    raw = torch.arange(16, dtype=torch.float32)
    plan, _, _ = plan_of({"bytes": raw.view(torch.uint8)[5:9], "f": raw[3:4]}, alignment=16)
    [region] = plan.regions
    assert (region.src_offset, region.nbytes) == (4, 12)  # byte 5 rounded down to the float's 4
    assert [leaf.offset for leaf in plan.leaves] == [1, 2]  # in each leaf's own elements


def test_tensor_signature_compares_address_size_stride_and_dtype() -> None:
    a = torch.zeros(4, 4)
    sig = tensor_signature([a])
    assert len(sig) == 1 and sig.matches([a]) and sig == tensor_signature([a.view(4, 4)])
    assert not sig.matches([a.t()])  # stride
    assert not sig.matches([a.view(2, 8)])  # size
    assert not sig.matches([a.view(torch.int32)])  # dtype
    assert not sig.matches([a[1:]])  # address
    assert not sig.matches([a, a])


def test_a_demoted_plan_adopts_the_walked_storages_and_a_released_one_matches_nothing() -> None:
    sd = {"w": torch.randn(8), "v": torch.randn(3)}
    plan, tensors, _ = plan_of(sd)
    assert plan.matches(plan.tokens, tensors)
    assert not plan.matches(plan.tokens, tensors[:1])
    plan.demote()
    assert plan.src_views == [] and not plan.dead()
    assert plan.matches(plan.tokens, tensors)  # takes the sources again, checked like any other
    assert torch.equal(plan.src_views[0], sd["w"].view(torch.uint8))
    plan.demote()
    del sd, tensors
    gc.collect()
    assert plan.dead()  # every source storage it had is freed
    again = {"w": torch.randn(8), "v": torch.randn(3)}
    fresh, tensors, _ = plan_of(again)
    fresh.release_sources()
    assert not fresh.matches(fresh.tokens, tensors)


def test_views_transposes_offsets_expansions_and_ties_share_storage() -> None:
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    sd = {
        "base": base,
        "t": base.t(),
        "slice": base[2:, 3:],
        "row": base[4],
        "expanded": base[0, :1].expand(10),
        "tied": {"decoder": base},
        "bytes": base.view(torch.uint8)[5:17],
    }
    with GraphStager() as stager:
        out = stager.stage(sd)
        assert_same(sd, out)
        for k in ("t", "slice", "row", "expanded", "bytes"):
            assert same_storage(out["base"], out[k]), k
        assert out["tied"]["decoder"] is out["base"] or same_storage(out["tied"]["decoder"], out["base"])
        assert out["slice"].storage_offset() - out["base"].storage_offset() == base[2:, 3:].storage_offset()


def test_only_the_referenced_span_is_staged() -> None:
    big = torch.zeros(1 << 20)
    sd = {"w": big[1000:1010]}
    with GraphStager() as stager:
        out = stager.stage(sd)
        assert out["w"].untyped_storage().nbytes() == 40
        assert torch.equal(out["w"], big[1000:1010])


def test_lone_tensor_storage_is_exactly_its_bytes_so_dcp_does_not_clone() -> None:
    sd = {"w": torch.randn(3, 5), "b": torch.randn(5)}
    with GraphStager() as stager:
        out = stager.stage(sd)
    for t in out.values():
        assert t.untyped_storage().nbytes() == t.nbytes
        assert t.storage_offset() == 0


def test_same_signature_reuses_the_plan_across_fresh_state_dict_objects() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    with GraphStager() as stager:
        for _ in range(4):
            sd = model.state_dict()
            assert_same(sd, stager.stage(sd))
            with torch.no_grad():
                model[0].weight.add_(1.0)
        assert stager.plans_built == 1


def _changes() -> list[Any]:
    def add_key(sd: dict) -> None:
        sd["new"] = torch.ones(2)

    def remove_key(sd: dict) -> None:
        del sd["b"]

    def resize(sd: dict) -> None:
        sd["a"].resize_(2, 2)

    def dtype(sd: dict) -> None:
        sd["a"] = sd["a"].double()

    def move(sd: dict) -> None:
        sd["a"].data = torch.randn(4, 4)

    def rebind(sd: dict) -> None:
        sd["b"] = sd["a"]

    # Same object, same data_ptr: only one column of the signature differs.
    def transpose_in_place(sd: dict) -> None:
        sd["a"].t_()  # stride only (4x4 stays 4x4)

    def unsqueeze_in_place(sd: dict) -> None:
        sd["a"].unsqueeze_(0)  # size and stride

    def reinterpret_dtype(sd: dict) -> None:
        sd["a"].data = sd["a"].view(torch.int32)  # dtype only

    changes = (
        add_key, remove_key, resize, dtype, move, rebind, transpose_in_place, unsqueeze_in_place,
        reinterpret_dtype,
    )
    return [pytest.param(f, id=f.__name__) for f in changes]


@pytest.mark.parametrize("change", _changes())
def test_a_changed_state_dict_is_replanned_and_staged_correctly(change: Any) -> None:
    sd = {"a": torch.randn(4, 4), "b": torch.randn(3)}
    with GraphStager() as stager:
        stager.stage(sd)
        change(sd)
        out = stager.stage(sd)
        assert stager.plans_built == 2
        assert_same(sd, out)


def test_lists_of_scalars_are_snapshots_and_their_values_never_force_a_replan() -> None:
    group = {"params": [0, 1, 2], "betas": (0.9, 0.999), "lr": 1e-3, "mixed": [1, "a", None, 2.5]}
    sd = {"w": torch.randn(3), "param_groups": [group]}
    with GraphStager() as stager:
        out = stager.stage(sd)
        assert out["param_groups"] == [group]
        assert out["param_groups"][0]["params"] is not group["params"]
        assert type(out["param_groups"][0]["betas"]) is tuple
        group["params"].append(3)  # the copy is a snapshot
        group["betas"] = (0.8, 0.99)
        assert out["param_groups"][0]["params"] == [0, 1, 2]
        assert out["param_groups"][0]["betas"] == (0.9, 0.999)
        group["params"].pop()
        group["mixed"][0] = 7  # same types, new value: same plan
        again = stager.stage(sd)
        assert again["param_groups"][0]["mixed"] == [7, "a", None, 2.5]
        assert again["param_groups"][0]["betas"] == (0.8, 0.99)
        assert stager.plans_built == 1
        group["params"].append(3)  # a longer list is another structure
        assert stager.stage(sd)["param_groups"][0]["params"] == [0, 1, 2, 3]
        assert stager.plans_built == 2


def test_keys_equal_across_types_come_back_with_this_calls_keys() -> None:
    a, b = torch.ones(2), torch.zeros(2)
    with GraphStager() as stager:
        stager.stage({"state": {0: {"e": a}, 1: {"e": b}}})
        out = stager.stage({"state": {False: {"e": a}, 1.0: {"e": b}}})
        assert [type(k) for k in out["state"]] == [bool, float]
        assert stager.plans_built == 1


def _lazy_bit_swaps() -> list[Any]:
    c = torch.randn(4, dtype=torch.complex64)
    return [
        pytest.param(lambda: c.imag, lambda: c.conj().imag, "negative", id="neg-view"),
        pytest.param(lambda: c, lambda: c.conj(), "conjugate", id="conj-view"),
    ]


@pytest.mark.parametrize("plain, lazy, problem", _lazy_bit_swaps())
def test_a_lazy_view_with_the_planned_signature_is_refused_not_staged_raw(
    plain: Any, lazy: Any, problem: str
) -> None:
    # Same data_ptr, shape, stride and dtype as the planned tensor: only the lazy bit differs,
    # and the raw bytes are not the view's values.
    with GraphStager() as stager:
        stager.stage({"a": plain()})
        with pytest.raises(StagingInputError, match=rf"\['a'\].*{problem}"):
            stager.stage({"a": lazy()})


@pytest.mark.parametrize(
    "make, problem",
    [
        pytest.param(lambda: torch.randn(4).to_sparse(), "layout", id="sparse"),
        pytest.param(lambda: torch.eye(2).to_sparse_csr(), "layout", id="csr"),
        pytest.param(
            lambda: torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]), "nested", id="nested"
        ),
    ],
)
@pytest.mark.filterwarnings("ignore:.*(beta|prototype):UserWarning")
def test_storage_less_tensors_get_a_staging_error_with_or_without_a_plan(make: Any, problem: str) -> None:
    with GraphStager() as stager:
        with pytest.raises(StagingInputError, match=rf"\['x'\]\['a'\].*{problem}"):
            stager.stage({"x": {"a": make()}})
        stager.stage({"x": {"a": torch.randn(4)}})
        with pytest.raises(StagingInputError, match=rf"\['x'\]\['a'\].*{problem}"):
            stager.stage({"x": {"a": make()}})


def test_arena_layout_puts_each_devices_small_regions_together() -> None:
    g0, g1, cpu = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")
    sizes = [10, 5000, 20, 5000, 30, 7, 40]
    devices = [g0, g0, g0, g0, g1, cpu, g0]
    offsets, total = arena_layout(sizes, devices, alignment=16, pack_threshold=1000)
    order = sorted(range(len(sizes)), key=offsets.__getitem__)
    assert order == [5, 0, 2, 6, 1, 3, 4]  # cpu; cuda:0 small, cuda:0 large; cuda:1
    assert all(o % 16 == 0 for o in offsets) and total == offsets[4] + 32
    plain, _ = arena_layout(sizes, devices, alignment=16, pack_threshold=None)
    assert sorted(range(len(sizes)), key=plain.__getitem__) == [5, 0, 1, 2, 3, 6, 4]
