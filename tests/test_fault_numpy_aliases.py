"""Tensors over distinct storages that start at one address (``torch.from_numpy`` of two views of
one numpy buffer) stage bit-exactly, whichever comes first in the state dict."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import torch
from _helpers import as_bytes

from stager import GraphStager


def _prefix_first(a: np.ndarray) -> dict[str, Any]:
    return {"head": torch.from_numpy(a[:4]), "all": torch.from_numpy(a)}


def _reinterpreted(a: np.ndarray) -> dict[str, Any]:
    return {"ints": torch.from_numpy(a[:2].view(np.int32)), "bytes": torch.from_numpy(a.view(np.uint8))}


def _nested(a: np.ndarray) -> dict[str, Any]:
    return {
        "m": {"w": torch.from_numpy(a[:8].reshape(2, 4))},
        "opt": [torch.from_numpy(a.reshape(4, 4)[:, 1])],
    }


def _empty_first(a: np.ndarray) -> dict[str, Any]:
    return {"none": torch.from_numpy(a[:0]), "all": torch.from_numpy(a)}


CASES = [
    pytest.param(_prefix_first, id="shorter-storage-first"),
    pytest.param(_reinterpreted, id="dtype-views"),
    pytest.param(_nested, id="nested-reshaped"),
    pytest.param(_empty_first, id="empty-view-first"),
]


def _flat(sd: Any, path: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(sd, torch.Tensor):
        return [(path, sd)]
    items = sd.items() if isinstance(sd, dict) else enumerate(sd)
    return [x for k, v in items for x in _flat(v, f"{path}[{k!r}]")]


@pytest.mark.parametrize("make", CASES)
def test_views_of_one_numpy_buffer_stage_bit_exactly_and_replay(make: Callable[[np.ndarray], Any]) -> None:
    a = np.arange(16, dtype=np.float32)
    sd = make(a)
    with GraphStager() as stager:
        out = stager.stage(sd)
        want = [(p, as_bytes(t).clone()) for p, t in _flat(sd)]
        for (p, got), (_, w) in zip(_flat(out), want):
            assert torch.equal(as_bytes(got), w), p
        a *= 3  # the copy does not follow the source
        for (p, got), (_, w) in zip(_flat(out), want):
            assert torch.equal(as_bytes(got), w), p
        del out
        again = stager.stage(sd)  # the same plan again: the new bytes
        for (p, got), (_, src) in zip(_flat(again), _flat(sd)):
            assert torch.equal(as_bytes(got), as_bytes(src)), p
