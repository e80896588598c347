"""torchtitan: ``StagerCheckpointManager`` in torchtitan's own CheckpointManager flow.

The README's snippet (the llama3 ``debugmodel`` on a one-rank gloo group, three saves) runs in a
child process per ``async_mode``, under a time limit; the checkpoints are then loaded bit-exactly
through a stock synchronous ``CheckpointManager``. One more child saves once per writer kind
with checksums on; ``python -m stager verify`` then checks the sidecars and names a flipped byte.
Skipped where torchtitan is not installed (``make test`` installs it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torchtitan")

README = Path(__file__).resolve().parents[1] / "README.md"
PINNED, ASYNC = "async_with_pinned_mem", "async"


def readme_snippet(name: str) -> str:
    """The README's Python block marked ``<!-- snippet: name -->``."""
    m = re.search(rf"<!-- snippet: {re.escape(name)} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert m, f"README has no snippet {name!r}"
    return m.group(1)


def _flat_state(checkpointer: Any) -> dict[str, Any]:
    """What the checkpointer saves, as DCP sees it: model and optimizer state, cloned."""
    import torch

    out: dict[str, Any] = {}
    for key, value in checkpointer.states["model"].state_dict().items():
        out[f"model/{key}"] = value.detach().clone()
    for key, value in checkpointer.states["optimizer"].state_dict().items():
        out[f"optim/{key}"] = value.detach().clone() if isinstance(value, torch.Tensor) else value
    return out


def _mismatches(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    import torch

    bad = sorted(set(got) ^ set(want))
    for key in sorted(set(got) & set(want)):
        a, b = got[key], want[key]
        if isinstance(b, torch.Tensor):
            same = isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
            same = same and torch.equal(a, b)
        else:
            same = a == b
        if not same:
            bad.append(key)
    return bad


def _build_parts() -> tuple[Any, Any, Any]:
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
    from torchtitan.models.llama3 import model_registry

    model = model_registry("debugmodel").model.build()
    model.init_weights(buffer_device=None)
    optimizers = default_adamw(lr=8e-4).build(model_parts=[model])
    lr_schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(
        optimizers=optimizers, training_steps=10
    )
    return model, optimizers, lr_schedulers


def _prewarm_check(base: str) -> dict[str, Any]:
    """A second manager: prewarm() after the first optimizer step, then one save."""
    import torch

    from stager.integrations.torchtitan import StagerCheckpointManager

    model, optimizers, lr_schedulers = _build_parts()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizers.step()
    config = StagerCheckpointManager.Config(enable=True, interval=1, keep_latest_k=0, async_mode=ASYNC)
    checkpointer = config.build(
        dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=lr_schedulers,
        states={}, sd_adapter=None, base_folder=base,
    )
    gs = checkpointer.stager
    empty = gs.host_bytes().total
    checkpointer.prewarm()
    prewarmed = gs.host_bytes().total
    checkpointer.save(1)
    checkpointer.maybe_wait_for_staging()
    checkpointer.maybe_wait_for_saving()
    stats = gs.last_stats
    out = {
        "empty": empty, "prewarmed": prewarmed, "after_save": gs.host_bytes().total,
        "plans_built": gs.plans_built, "replanned": stats.replanned, "arena": stats.arena,
        "alloc_s": stats.alloc_s,
    }
    checkpointer.close()
    return out


def child(mode: str, out_path: str) -> None:
    """Run the README snippet in ``mode``, load its last checkpoint with a stock manager, report."""
    import torch.distributed as dist
    from torchtitan.components.checkpointer import CheckpointManager

    from stager.segments import SHARE_COUNTS

    ns: dict[str, Any] = {"__name__": "readme_snippet"}
    exec(compile(readme_snippet("torchtitan"), "README.md (torchtitan snippet)", "exec"), ns)
    SHARE_COUNTS.reset()
    checkpointer = ns["train"](mode)
    gs = checkpointer.stager
    saved = _flat_state(checkpointer)  # nothing changed the state after save(3)
    folder = checkpointer.folder
    report: dict[str, Any] = {
        "pid": os.getpid(),
        "manager": type(checkpointer).__name__,
        "async_staging": gs.config.async_staging,
        "shared_memory": gs.config.shared_memory,
        "staging_future": checkpointer.staging_future is not None,
        "plans_built": gs.plans_built,
        "regions": gs.last_stats.regions,
        "by_reference": SHARE_COUNTS.by_reference,
        "delegated": SHARE_COUNTS.delegated,
        "steps": sorted(
            p for p in os.listdir(folder) if os.path.exists(os.path.join(folder, p, ".metadata"))
        ),
    }

    model, optimizers, lr_schedulers = _build_parts()
    stock = CheckpointManager.Config(enable=True, interval=1, keep_latest_k=0, async_mode="disabled").build(
        dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=lr_schedulers,
        states={}, sd_adapter=None, base_folder=os.path.dirname(folder),
    )
    report["loaded"] = stock.load(step=3)
    stock.close()
    loaded = _flat_state(stock)
    report["mismatches"] = _mismatches(loaded, saved)
    report["model_tensors"] = sum(k.startswith("model/") for k in saved)
    report["optimizer_tensors"] = sum(
        k.startswith("optim/") and hasattr(v, "dtype") for k, v in saved.items()
    )
    if mode == ASYNC:
        report["prewarm"] = _prewarm_check(os.path.dirname(folder))
    Path(out_path).write_text(json.dumps(report))
    dist.destroy_process_group()


def checksum_child(base: str) -> None:
    """One "async" save with ``stager_checksum="on"`` and one "async_with_pinned_mem" save with
    ``STAGER_CHECKSUM=on``, each into its own folder under ``base``."""
    import torch
    import torch.distributed as dist

    from stager.integrations.torchtitan import StagerCheckpointManager

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    for mode, field in [(ASYNC, "on"), (PINNED, None)]:
        if field is None:
            os.environ["STAGER_CHECKSUM"] = "on"
        model, optimizers, lr_schedulers = _build_parts()
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizers.step()
        checkpointer = StagerCheckpointManager.Config(
            enable=True, interval=1, keep_latest_k=0, async_mode=mode, stager_checksum=field,
        ).build(
            dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=lr_schedulers,
            states={}, sd_adapter=None, base_folder=os.path.join(base, mode),
        )
        checkpointer.save(1)
        checkpointer.maybe_wait_for_staging()
        checkpointer.maybe_wait_for_saving()
        checkpointer.close()
    dist.destroy_process_group()


def _shm_files_of(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"stager-arena-{pid}-")]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [PINNED, ASYNC])
def test_torchtitan_checkpoint_manager_flow(mode: str, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, __file__, mode, str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["manager"] == "StagerCheckpointManager"
    assert r["steps"] == ["step-1", "step-2", "step-3"]
    # Staged asynchronously: save() left a staging future for maybe_wait_for_staging().
    assert r["async_staging"] and r["staging_future"]
    assert r["plans_built"] == 1
    assert r["loaded"] is True and r["mismatches"] == []
    assert r["model_tensors"] > 0 and r["optimizer_tensors"] > 0
    if mode == PINNED:
        # The writer is a process: every staged storage went by reference, none was copied.
        assert r["shared_memory"] is True
        assert r["delegated"] == 0 and r["by_reference"] == 3 * r["regions"] > 0
    else:
        assert r["shared_memory"] is False and r["by_reference"] == 0
        p = r["prewarm"]
        assert p["empty"] == 0 and p["prewarmed"] > 0 and p["after_save"] == p["prewarmed"]
        assert p["plans_built"] == 1 and not p["replanned"] and p["arena"] == "cached" and p["alloc_s"] == 0
    assert _shm_files_of(r["pid"]) == []


def test_saves_carry_checksums_that_verify_finds_and_a_flipped_byte_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    from stager.verify import main as verify_main

    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGER_")}
    proc = subprocess.run(
        [sys.executable, __file__, "checksums", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for mode in (ASYNC, PINNED):
        ckpt = tmp_path / mode / "checkpoint" / "step-1"
        [sidecar] = ckpt.glob("*stager-checksums.json")
        md = FileSystemReader(str(ckpt)).read_metadata()
        tensors = {k for k, v in md.state_dict_metadata.items() if hasattr(v, "chunks")}
        assert {e["fqn"] for e in json.loads(sidecar.read_text())["entries"]} == tensors, mode
        assert verify_main([str(ckpt), "--require", "--no-progress"]) == 0, mode
        assert capsys.readouterr().out.startswith(f"OK: {len(tensors)} tensor chunk(s) verified"), mode

        index, info = max(md.storage_data.items(), key=lambda kv: kv[1].length)  # the largest tensor
        fqn = index.fqn
        data = bytearray((ckpt / info.relative_path).read_bytes())
        data[info.offset + info.length // 2] ^= 0x08
        (ckpt / info.relative_path).write_bytes(bytes(data))
        assert verify_main([str(ckpt), "--no-progress"]) == 1, mode
        assert capsys.readouterr().out.startswith(f"MISMATCH {fqn}: file {info.relative_path}"), mode


def test_config_is_a_checkpoint_manager_config_that_builds_the_stager_manager() -> None:
    from torchtitan.components.checkpointer import BaseCheckpointManager, CheckpointManager

    from stager.integrations.torchtitan import StagerCheckpointManager

    cfg = StagerCheckpointManager.Config(enable=True, async_mode=PINNED, stager_profile="low_memory")
    assert isinstance(cfg, CheckpointManager.Config) and isinstance(cfg, BaseCheckpointManager.Config)
    assert StagerCheckpointManager.Config._owner is StagerCheckpointManager
    assert issubclass(StagerCheckpointManager, CheckpointManager)


def test_stager_config_per_mode_and_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    from stager.envs import LeasePolicy, Mode
    from stager.integrations.torchtitan import StagerCheckpointManager

    pinned = StagerCheckpointManager.Config(async_mode=PINNED).stager_config()
    assert pinned.async_staging and pinned.shared_memory and pinned.profile == "default"
    threaded = StagerCheckpointManager.Config(async_mode=ASYNC).stager_config()
    assert threaded.async_staging and not threaded.shared_memory
    monkeypatch.setenv("STAGER_MAX_ARENAS", "3")
    monkeypatch.setenv("STAGER_PROFILE", "throughput")
    from_env = StagerCheckpointManager.Config(async_mode=ASYNC).stager_config()
    assert from_env.max_arenas == 3 and from_env.profile == "throughput"
    fields = StagerCheckpointManager.Config(
        async_mode=ASYNC, stager_profile="low_memory", stager_max_arenas=1, stager_lease_policy="allocate",
        stager_nvtx=True, stager_profile_checkpoints="2-3",
    ).stager_config()
    assert (fields.profile, fields.max_arenas, fields.lease_policy, fields.nvtx) == (
        "low_memory", 1, LeasePolicy.ALLOCATE, True
    )
    assert tuple(fields.profile_checkpoints) == (2, 3)
    assert from_env.checksum is Mode.AUTO
    monkeypatch.setenv("STAGER_CHECKSUM", "off")
    checksum_on = StagerCheckpointManager.Config(async_mode=ASYNC, stager_checksum="on")
    assert checksum_on.stager_config().checksum is Mode.ON


@pytest.mark.parametrize(
    "field, value, words",
    [
        pytest.param(
            "stager_max_arenas", 0, ["checkpoint.stager_max_arenas", "an integer >= 1"], id="max_arenas"
        ),
        pytest.param("stager_profile", "fast", ["checkpoint.stager_profile", "low_memory"], id="profile"),
        pytest.param(
            "stager_lease_policy", "block", ["checkpoint.stager_lease_policy", "wait or allocate"], id="lease"
        ),
        pytest.param(
            "stager_profile_checkpoints", "3-2", ["checkpoint.stager_profile_checkpoints"], id="window"
        ),
        pytest.param(
            "stager_checksum", "yes", ["checkpoint.stager_checksum", "auto, on or off"], id="checksum"
        ),
    ],
)
def test_a_bad_stager_field_fails_when_the_config_is_built(field: str, value: Any, words: list[str]) -> None:
    from stager.errors import StagerConfigError
    from stager.integrations.torchtitan import StagerCheckpointManager

    with pytest.raises(StagerConfigError) as info:
        StagerCheckpointManager.Config(async_mode=ASYNC, **{field: value})
    assert all(w in str(info.value) for w in words), str(info.value)


def test_disabled_manager_has_no_stager() -> None:
    import torch

    from stager.integrations.torchtitan import StagerCheckpointManager

    model = torch.nn.Linear(4, 4)
    kwargs = dict(
        dataloader=None, model_parts=[model], optimizers=None, lr_schedulers=None, states={}, sd_adapter=None
    )
    off = StagerCheckpointManager.Config(enable=False).build(**kwargs)
    assert off.stager is None
    sync = StagerCheckpointManager.Config(enable=True, async_mode="disabled").build(**kwargs)
    assert sync.stager is None
    sync.close()


if __name__ == "__main__":
    if sys.argv[1] == "checksums":
        checksum_child(sys.argv[2])
    else:
        child(sys.argv[1], sys.argv[2])
