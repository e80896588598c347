"""wrap: checkpoints to one path are written one after the other, in order, and training never
waits for the writes."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from test_wrap import _SlowWriter, assert_state_equal, load_fresh, make, snapshot, train

import stager
from stager.checkpoint import CheckpointWrites


def test_checkpoints_to_one_path_are_written_in_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: writes ran at once into one directory (2 of 12 trials left nothing loadable), and a
    # write held back behind another one could be handed another checkpoint's dict.
    slow = _SlowWriter(monkeypatch)
    started: list[int] = []
    lock = threading.Lock()
    real_save = CheckpointWrites._save

    def counting_save(self: Any, record: Any, result: Any, staged: Any, handoff: Any) -> None:
        with lock:
            started.append(int(staged["model"]["pos"].flatten()[0].item()))
        real_save(self, record, result, staged, handoff)

    monkeypatch.setattr(CheckpointWrites, "_save", counting_save)
    model, opt = make()
    path = tmp_path / "latest"
    futures = []
    with stager.wrap(model, opt) as handle:
        train(model, opt, range(1))
        for i in range(4):
            handle.fence()  # a write outside optimizer.step(): wait for the previous copy first
            with torch.no_grad():
                model.pos.fill_(float(i))
            futures.append(handle.checkpoint(path))
        expected = snapshot(model, opt)
        handle.fence()
        assert not any(f.done() for f in futures)
        assert started == [0]  # the later writes wait for the first one, which is held
        slow.release.set()
        for f in futures:
            f.result(timeout=60)  # every write succeeds
    assert started == [0, 1, 2, 3]  # one at a time, in order, each with its own copy
    assert_state_equal(load_fresh(path), expected)  # the file holds the last checkpoint
