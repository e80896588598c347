"""Helpers of the integrity tests: models, live state dicts, checkpoints with checksums, flipped bytes.

The staging pipeline calls :func:`stager.integrity.checksum_staged_set` once a copy into a staged
set is complete; :func:`checksum_when_staged` does exactly that (from ``StagedSet.done``, which
every stage calls once its copy is complete on the CPU path), so the tests do not depend on where
the pipeline makes the call.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

import stager
import stager.checkpoint as checkpoint_module
from stager.integrity import ChecksumWriter, checksum_staged_set
from stager.staged_set import StagedSet


def checksum_when_staged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checksum every staged set once its copy is complete, as the pipeline does with the knob on."""
    done = StagedSet.done

    def done_with_checksums(self: StagedSet) -> None:
        checksum_staged_set(self)
        done(self)

    monkeypatch.setattr(StagedSet, "done", done_with_checksums)


def make(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 64)).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def assert_loaded_equal(model: torch.nn.Module, want: torch.nn.Module) -> None:
    for (k, a), (_, b) in zip(model.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), k


def checkpoint_with_wrap(
    path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, **overrides: Any
) -> None:
    with stager.wrap(model, opt, **overrides) as handle:
        handle.checkpoint(path)


def checkpoint_with_checksums(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and optimizer checkpointed by ``wrap``, its writer hashing every tensor on the
    writer thread (what staging left without a checksum)."""
    real = checkpoint_module.dcp_writer
    monkeypatch.setattr(
        checkpoint_module, "dcp_writer", lambda path, nvtx_enabled: real(path, nvtx_enabled, checksum=True)
    )
    model, opt = make()
    checkpoint_with_wrap(path, model, opt)
    return model, opt


def save_with_checksums(ckpt: str | Path, state: dict[str, Any]) -> None:
    """``dcp.save`` of ``state`` with a writer that hashes every tensor."""
    dcp.save(state, storage_writer=ChecksumWriter(str(ckpt), checksum=True), no_dist=True)


def flip_tensor_byte(ckpt: Path, fqn: str) -> str:
    """Flip one bit in the middle of ``fqn``'s saved bytes in its data file; return the file's name."""
    md = FileSystemReader(str(ckpt)).read_metadata()
    info = next(v for k, v in md.storage_data.items() if k.fqn == fqn)
    path = ckpt / info.relative_path
    data = bytearray(path.read_bytes())
    data[info.offset + info.length // 2] ^= 0x08
    path.write_bytes(bytes(data))
    return info.relative_path


def sidecars(ckpt: Path) -> list[dict[str, Any]]:
    return [json.loads(Path(p).read_text()) for p in sorted(glob.glob(str(ckpt / "*stager-checksums.json")))]


def saved(tmp_path: Path) -> Path:
    """A checkpoint of three tensors (64 KiB and two small ones) with checksums."""
    ckpt = tmp_path / "c"
    g = torch.Generator().manual_seed(0)
    state = {
        "model": {"w": torch.randn(256, 64, generator=g), "b": torch.arange(5, dtype=torch.int16)},
        "optim": {"state": {0: {"exp_avg": torch.randn(7, generator=g)}}, "param_groups": [{"lr": 0.1}]},
    }
    save_with_checksums(ckpt, state)
    return ckpt


def live_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, generator=g)
    return {
        "model": {"w": torch.randn(32, 16, generator=g), "b": torch.randn(16, generator=g), "tied": None},
        "views": [base[2:10], base.view(8, 8).t()],
        "flags": torch.tensor([True, False, True]),
        "step": 3,
    }
