"""Real ``dcp.async_save`` with ``GraphStager``, then ``dcp.load`` into a fresh model: bit-exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from stager import GraphStager


def make_model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True),
        num_layers=2,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(4, 8, 32)
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def flat_tensors(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat_tensors(v, f"{prefix}/{i}"))
    return out


@pytest.mark.parametrize("async_staging", [False, True], ids=["sync", "async"])
def test_async_save_then_load_is_bit_exact(tmp_path: Path, async_staging: bool) -> None:
    model, opt = make_model(0)
    expected = {k: v.clone() for k, v in flat_tensors(full_state(model, opt)).items()}
    with GraphStager(async_staging=async_staging) as stager:
        fut = dcp.async_save(
            full_state(model, opt), checkpoint_id=tmp_path / "ckpt", async_stager=stager, no_dist=True
        )
        # Training goes on: in-place updates must not reach the checkpoint.
        if async_staging:
            fut.staging_completion.result()
            fut = fut.upload_completion
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        fut.result()

    fresh, fresh_opt = make_model(1)
    state = full_state(fresh, fresh_opt)
    dcp.load(state, checkpoint_id=tmp_path / "ckpt", no_dist=True)
    fresh.load_state_dict(state["model"])
    fresh_opt.load_state_dict(state["optim"])
    got = flat_tensors(full_state(fresh, fresh_opt))
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_repeated_checkpoints_replay_one_plan(tmp_path: Path) -> None:
    model, opt = make_model(0)
    with GraphStager() as stager:
        for step in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.01)
            expected = {k: v.clone() for k, v in flat_tensors(full_state(model, opt)).items()}
            dcp.async_save(
                full_state(model, opt), checkpoint_id=tmp_path / f"s{step}", async_stager=stager, no_dist=True
            ).result()
        assert stager.plans_built == 1
    fresh, fresh_opt = make_model(1)
    state = full_state(fresh, fresh_opt)
    dcp.load(state, checkpoint_id=tmp_path / "s2", no_dist=True)
    got = flat_tensors(state)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
