"""The live state dict the training handle stages: built once from the live objects, rebuilt when stale.

The dict has the checkpoint layout (:func:`stager.checkpoint.checkpoint_layout`) over the live
objects: the model's parameters and buffers (``keep_vars=True``) and the optimizer's own
per-parameter state dicts. It is handed to the stager again on every checkpoint, with no
``state_dict()`` round trip, so the stager's plan (and, on a GPU, its captured graph) is replayed;
the optimizer's hyperparameters and the modules' ``get_extra_state()`` are read again each time.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch

from stager.checkpoint import checkpoint_layout
from stager.tree import holds_tensor

__all__ = ["LiveState", "Snapshot"]

_EXTRA_STATE = "_extra_state"  # torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX

Snapshot = tuple[list[dict[str, Any]], dict[int, Any]]
"""Each param group's hyperparameters, and each module's extra state by module identity."""


class LiveState:
    """The nested dict of live tensors handed to the stager: built once, rebuilt when stale.

    Stale means any of: a module added, removed or replaced anywhere in the model; a parameter or
    persistent buffer object replaced; the optimizer's state created, cleared or given new
    per-parameter dicts (``load_state_dict``, ``state.clear()``, lazy creation); a param group
    added. Checking costs one pass over the modules, their parameters and buffers, and the
    optimizer's per-parameter dicts (identity comparisons, no tensor calls).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.state: dict[str, Any] | None = None
        self.rebuilds = 0
        """How many times the dict was (re)built."""
        self._objects: list[object] = []
        self._groups: list[dict[str, Any]] = []
        self._extra: list[tuple[str, torch.nn.Module]] = []

    def _live_objects(self) -> list[object]:
        """Everything whose identity the built dict depends on, in a fixed order."""
        objects: list[object] = []
        for m in self.model.modules():
            objects.append(m)
            objects.extend(m._parameters.values())
            skip = m._non_persistent_buffers_set
            objects.extend(b for n, b in m._buffers.items() if n not in skip)
        opt = self.optimizer
        if opt is not None:
            objects.append(opt.state)
            objects.extend(opt.state)  # parameters with state, in order
            objects.extend(opt.state.values())  # their per-parameter dicts
            objects.extend(opt.param_groups)
        return objects

    def stale(self) -> bool:
        """Whether the dict was never built, or an object it was built from was replaced."""
        if self.state is None:
            return True
        objects = self._live_objects()
        return len(objects) != len(self._objects) or not all(map(operator.is_, objects, self._objects))

    def build(self) -> None:
        """Build the dict from the live objects now."""
        model, opt = self.model, self.optimizer
        # The optimizer's "state" values are its own per-parameter dicts: live tensors.
        state = checkpoint_layout(model, opt, keep_vars=True)
        if opt is not None:
            self._groups = state["optim"]["param_groups"]
        base = torch.nn.Module.get_extra_state
        keyed = (
            (f"{name}.{_EXTRA_STATE}" if name else _EXTRA_STATE, m)
            for name, m in model.named_modules(remove_duplicate=False)  # as state_dict() names them
        )
        self._extra = [
            (k, m) for k, m in keyed if type(m).get_extra_state is not base and k in state["model"]
        ]
        self._objects = self._live_objects()
        self.state = state
        self.rebuilds += 1

    def snapshot(self) -> Snapshot:
        """The small values that may change right after ``checkpoint()`` returns, read on the
        caller's thread: each param group's hyperparameters (``lr``: a scheduler steps next) and
        each known module's ``get_extra_state()`` (by module identity)."""
        groups = (
            [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            if self.optimizer is not None
            else []
        )
        return groups, {id(m): m.get_extra_state() for _, m in self._extra}

    def current(self, snapshot: Snapshot | None = None) -> dict[str, Any]:
        """The dict to stage now, with the optimizer's hyperparameters and the modules' extra
        state (``get_extra_state()``) refreshed: from ``snapshot`` (see :meth:`snapshot`) where it
        has them, else read now."""
        if self.stale():
            self.build()
        groups, extra = snapshot if snapshot is not None else ([], {})
        if self.optimizer is not None:
            for i, (packed, group) in enumerate(zip(self._groups, self.optimizer.param_groups)):
                source = groups[i] if i < len(groups) else group
                for k, v in source.items():
                    if k != "params":
                        packed[k] = v
        model_state = self.state["model"]  # type: ignore[index]  # built above
        for key, m in self._extra:
            model_state[key] = extra[id(m)] if id(m) in extra else m.get_extra_state()
        state: dict[str, Any] = self.state  # type: ignore[assignment]  # built above
        return state

    def restore_groups(self, staged: dict[str, Any]) -> None:
        """Set the optimizer's non-tensor hyperparameters and non-tensor per-parameter state
        (an ``int`` step, LBFGS's counters) to the staged values."""
        if self.optimizer is None or "optim" not in staged:
            return
        opt = self.optimizer
        for packed, group in zip(staged["optim"].get("param_groups", ()), opt.param_groups):
            for k, v in packed.items():
                if k != "params" and not isinstance(group.get(k), torch.Tensor):
                    group[k] = copy.deepcopy(v)
        params = [p for g in opt.param_groups for p in g["params"]]
        for index, entry in staged["optim"].get("state", {}).items():
            live = opt.state.get(params[index]) if isinstance(index, int) and index < len(params) else None
            if live is None:
                continue
            for k, v in entry.items():
                if not holds_tensor(v) and not holds_tensor(live.get(k)):  # tensors: restored in place
                    live[k] = copy.deepcopy(v)

    def restore_extra_state(self, staged: dict[str, Any]) -> None:
        """Give every module with extra state the staged value (``set_extra_state``)."""
        model_state = staged.get("model", {})
        for key, m in self._extra:
            if key in model_state:
                m.set_extra_state(copy.deepcopy(model_state[key]))
