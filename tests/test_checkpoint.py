"""Checkpoint I/O (``stager.checkpoint``): the saved layout, and ``load_checkpoint`` creating exactly the
optimizer state a checkpoint holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_wrap import assert_state_equal, snapshot

import stager
from stager.checkpoint import checkpoint_layout as layout


def test_checkpoint_layout_is_the_model_and_optimizer_state_dicts() -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert list(layout(model)) == ["model"]
    state = layout(model, opt, keep_vars=True)
    assert list(state) == ["model", "optim"] and state["model"]["weight"] is model.weight
    assert state["optim"]["param_groups"] == opt.state_dict()["param_groups"]


class _Unused(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)  # never used: no gradient, no optimizer state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)


def _unused_run(path: Path, steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = _Unused()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with stager.wrap(model, opt) as handle:
        for _ in range(steps):
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
        handle.checkpoint(path)
    return snapshot(model, opt)


@pytest.mark.parametrize("steps", [0, 2], ids=["before-the-first-step", "a-parameter-without-state"])
@pytest.mark.parametrize("fresh_has_grads", [False, True], ids=["", "fresh-model-with-grads"])
def test_load_checkpoint_restores_exactly_the_state_the_checkpoint_has(
    tmp_path: Path, steps: int, fresh_has_grads: bool
) -> None:
    want = _unused_run(tmp_path / "c", steps)
    model = _Unused()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    if fresh_has_grads:
        model(torch.randn(2, 4)).sum().backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    stager.load_checkpoint(tmp_path / "c", model, opt)
    got = layout(model, opt)
    assert sorted(got["optim"]["state"]) == sorted(want["optim"]["state"])
    assert_state_equal(got, want) if steps else None
    assert all(torch.equal(g, w) for g, w in zip(got["model"].values(), want["model"].values()))
    for p, g in zip(model.parameters(), grads):  # the caller's gradients are left as they were
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)


def test_load_checkpoint_refuses_state_it_cannot_place(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)  # has max_exp_avg_sq
    with stager.wrap(model, opt) as handle:
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
        handle.checkpoint(tmp_path / "c")
    fresh = torch.nn.Linear(3, 1)
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        stager.load_checkpoint(tmp_path / "c", fresh, torch.optim.Adam(fresh.parameters(), lr=1e-2))


def test_load_checkpoint_drops_optimizer_state_the_checkpoint_does_not_have(tmp_path: Path) -> None:
    def make_pair() -> tuple[torch.nn.ModuleDict, torch.optim.Optimizer]:
        torch.manual_seed(0)
        m = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "c": torch.nn.Linear(2, 2)})
        return m, torch.optim.AdamW(m.parameters(), lr=0.01)

    model, opt = make_pair()
    with stager.wrap(model, opt) as handle:
        model["a"](torch.randn(3, 2)).sum().backward()  # "c" gets no gradient, no state
        opt.step()
        handle.checkpoint(tmp_path / "c")
        want = snapshot(model, opt)
    model2, opt2 = make_pair()
    sum(m(torch.randn(3, 2)).sum() for m in model2.values()).backward()
    opt2.step()  # state for every parameter, "c" included
    stager.load_checkpoint(tmp_path / "c", model2, opt2)
    got = layout(model2, opt2)
    assert sorted(got["optim"]["state"]) == sorted(want["optim"]["state"])
    assert_state_equal(got, want)
