"""The live state dict ``wrap`` stages (``stager.live``): built once, rebuilt when an object it was
built from is replaced, its hyperparameters, extra state and non-tensor optimizer state read at
each checkpoint and set back on restore."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from test_wrap import assert_state_equal, load_fresh, make, snapshot, train

import stager
from stager.checkpoint import checkpoint_layout as layout


def test_live_state_is_built_once_and_plan_replayed(tmp_path: Path) -> None:
    model, opt = make()
    with stager.wrap(model, opt) as handle:
        assert len(opt._optimizer_step_pre_hooks) == 1
        train(model, opt, range(1))  # creates the optimizer state: one rebuild
        for i in range(3):
            train(model, opt, range(i + 1, i + 2))
            handle.checkpoint(tmp_path / f"c{i}")
        handle.fence()  # checkpoint() returned at once: wait for the stage before looking at it
        assert handle.live_rebuilds == 2
        assert handle.stager.plans_built == 1
        assert not handle.stats.replanned
        # A replaced buffer object is noticed and staged.
        model.tokens_seen = torch.tensor(12345)
        handle.checkpoint(tmp_path / "buffer")
        handle.fence()
        assert handle.live_rebuilds == 3
        # A scheduler's lr reaches the checkpoint without a rebuild.
        opt.param_groups[0]["lr"] = 0.125
        handle.checkpoint(tmp_path / "lr")
        handle.fence()
        assert handle.live_rebuilds == 3
        handle.wait()
    assert int(load_fresh(tmp_path / "buffer")["model"]["tokens_seen"]) == 12345
    assert load_fresh(tmp_path / "lr")["optim"]["param_groups"][0]["lr"] == 0.125


def _load_model_part(path: Path, like: torch.nn.Module) -> dict[str, Any]:
    state = {"model": like.state_dict()}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    return state["model"]


class _TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_a_replaced_or_added_submodule_is_checkpointed_and_restored(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stager.wrap(model, opt) as handle:
        handle.checkpoint(tmp_path / "c1").result()
        model.head = torch.nn.Linear(4, 2)  # a new head (fine-tuning)
        with torch.no_grad():
            model.head.weight.fill_(7.0)
        handle.checkpoint(tmp_path / "c2").result()
        assert torch.equal(_load_model_part(tmp_path / "c2", _TwoHeads())["head.weight"], model.head.weight)
        with torch.no_grad():
            model.head.weight.fill_(9.0)
        handle.restore()
        assert bool((model.head.weight == 7.0).all())  # restored into the live head
        model.extra = torch.nn.Linear(2, 2)
        handle.checkpoint(tmp_path / "c3").result()
    keys = dcp.FileSystemReader(str(tmp_path / "c3")).read_metadata().state_dict_metadata
    assert "model.extra.weight" in keys


def test_optimizer_state_cleared_and_recreated_is_checkpointed(tmp_path: Path) -> None:
    model, opt = make()
    with stager.wrap(model, opt) as handle:
        train(model, opt, range(2))
        handle.checkpoint(tmp_path / "c1").result()
        opt.state.clear()  # reset the moments: same dict object, recreated per-parameter dicts
        train(model, opt, range(2, 3))
        handle.checkpoint(tmp_path / "c2").result()
        expected = snapshot(model, opt)
        train(model, opt, range(3, 4))
        handle.restore()
        assert_state_equal(layout(model, opt), expected)
    assert_state_equal(load_fresh(tmp_path / "c2"), expected)


class _Counter(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lin(x)

    def get_extra_state(self) -> Any:
        return {"calls": self.calls}

    def set_extra_state(self, state: Any) -> None:
        self.calls = state["calls"]


def test_extra_state_is_read_at_each_checkpoint(tmp_path: Path) -> None:
    model = torch.nn.Sequential(_Counter())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stager.wrap(model, opt) as handle:
        for i in range(3):
            model(torch.randn(1, 2)).sum().backward()
            opt.step()
            handle.checkpoint(tmp_path / f"c{i}").result()
            saved = _load_model_part(tmp_path / f"c{i}", torch.nn.Sequential(_Counter()))
            assert saved["0._extra_state"] == {"calls": i + 1}
        assert handle.stager.plans_built == 1  # a new value, not a new structure: no re-plan


class _IntStepSGD(torch.optim.Optimizer):
    """Keeps an ``int`` step in its per-parameter state (as some optimizers do)."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                st = self.state[p]
                st["step"] = st.get("step", 0) + 1
                p.add_(p.grad, alpha=-g["lr"] / st["step"])


def test_restore_rolls_back_non_tensor_optimizer_state(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    opt = _IntStepSGD(model.parameters(), lr=0.1)

    def step() -> None:
        model(torch.randn(1, 2)).sum().backward()
        opt.step()
        opt.zero_grad()

    with stager.wrap(model, opt) as handle:
        step()
        step()
        handle.checkpoint(tmp_path / "c")
        weight = model.weight.detach().clone()
        for _ in range(3):
            step()
        handle.restore()
        assert torch.equal(model.weight, weight)
        assert opt.state[model.weight]["step"] == 2


class _History(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.hist: list[float] = []

    def get_extra_state(self) -> Any:
        return {"hist": list(self.hist)}

    def set_extra_state(self, state: Any) -> None:
        self.hist = list(state["hist"])


def test_extra_state_under_two_names_and_its_restore(tmp_path: Path) -> None:
    model = torch.nn.Module()
    model.a = _History()
    model.b = model.a  # one module, two names in state_dict()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stager.wrap(model, opt) as handle:
        model.a.hist.append(1.0)
        handle.checkpoint(tmp_path / "c").result()
        weight = model.a.lin.weight.detach().clone()
        with torch.no_grad():
            model.a.lin.weight.add_(1)
        model.a.hist.append(2.0)  # the extra state grew: the tensors must still come back
        handle.restore()
        assert torch.equal(model.a.lin.weight, weight) and model.a.hist == [1.0]
    fresh = torch.nn.Module()
    fresh.a = _History()
    fresh.b = fresh.a
    stager.load_checkpoint(tmp_path / "c", fresh)
    assert fresh.a.hist == [1.0]


def test_hyperparameters_are_the_ones_at_the_call(tmp_path: Path) -> None:
    # checkpoint() returns before the live state is read; a scheduler that steps right after it
    # must not reach the checkpoint.
    model, opt = make()
    with stager.wrap(model, opt) as handle:
        train(model, opt, range(1))
        go = threading.Event()
        real = handle._live.current

        def late(*args: Any) -> Any:
            assert go.wait(30)  # the background thread reads the live state only after the change
            return real(*args)

        handle._live.current = late  # type: ignore[method-assign]
        opt.param_groups[0]["lr"] = 0.5
        handle.checkpoint(tmp_path / "c")
        opt.param_groups[0]["lr"] = 0.25  # the scheduler's step, before the background stage ran
        go.set()
        handle.wait()
    assert load_fresh(tmp_path / "c")["optim"]["param_groups"][0]["lr"] == 0.5
