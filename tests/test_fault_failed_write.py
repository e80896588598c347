"""A failed background write that still holds its staged dict does not stall the next save."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from stager import GraphStager, LeaseTimeoutError


def _save(sd: dict, path: Path, stager: GraphStager):  # type: ignore[no-untyped-def]
    response = dcp.async_save(sd, checkpoint_id=str(path), async_stager=stager, no_dist=True)
    return getattr(response, "upload_completion", response)


def test_the_next_save_goes_on_while_a_failed_write_holds_the_copy(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    sd = {"w": torch.randn(1024), "b": torch.randn(16)}
    # low_memory: one arena, and the lease policy waits for it. The timeout is the test's bound:
    # before, the second save waited all of it and then blamed "earlier staged dicts".
    with GraphStager(profile="low_memory", lease_timeout=20) as stager:
        failed = _save(sd, blocker / "ckpt", stager)  # kept, as a user who never looks at it would
        assert failed.exception(timeout=30) is not None
        sd["w"].add_(1)
        _save(sd, tmp_path / "ok", stager).result(timeout=30)
        assert any("failed write" in n for n in stager.last_stats.notes)
    loaded = {"w": torch.zeros(1024), "b": torch.zeros(16)}
    dcp.load(loaded, checkpoint_id=str(tmp_path / "ok"), no_dist=True)
    assert torch.equal(loaded["w"], sd["w"])
    del failed


def test_without_room_for_another_arena_the_error_names_the_failed_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stager.pool import ArenaPool

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    sd = {"w": torch.randn(1024)}
    with GraphStager(profile="low_memory", lease_timeout=20) as stager:
        failed = _save(sd, blocker / "ckpt", stager)
        assert failed.exception(timeout=30) is not None
        monkeypatch.setattr(ArenaPool, "_instead_of_waiting", lambda *a, **k: None)
        with pytest.raises(LeaseTimeoutError, match="held by a failed write.*release"):
            stager.stage(sd)
    del failed
