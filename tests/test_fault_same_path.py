"""wrap: two checkpoints to one path never write at once; training never waits for the writes."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

import stager
from test_wrap import _SlowWriter, assert_state_equal, load_fresh, make, snapshot, train


def test_checkpoints_to_one_path_are_written_in_turn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: both writes ran at once into one directory; 2 of 12 trials left nothing loadable.
    wrap_module = __import__("importlib").import_module("stager.wrap")
    slow = _SlowWriter(monkeypatch)
    active: list[str] = []
    lock = threading.Lock()
    real_save = wrap_module.WrapHandle._save

    def counting_save(self: Any, ticket: Any, record: Any, handoff: Any) -> None:
        with lock:
            active.append(ticket.path)
        real_save(self, ticket, record, handoff)

    monkeypatch.setattr(wrap_module.WrapHandle, "_save", counting_save)
    model, opt = make()
    path = tmp_path / "latest"
    with stager.wrap(model, opt) as handle:
        train(model, opt, range(1))
        first = handle.checkpoint(path)
        train(model, opt, range(1, 2))  # the step waits for the copy, not for the write
        expected = snapshot(model, opt)
        second = handle.checkpoint(path)
        handle.fence()
        assert not first.done() and not second.done()
        assert active == [str(path)]  # the second write has not started: the first one is running
        slow.release.set()
        first.result(timeout=60)
        second.result(timeout=60)
    assert active == [str(path), str(path)]
    assert_state_equal(load_fresh(path), expected)
