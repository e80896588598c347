"""The GPU pipeline end to end: packed staging captured once as CUDA graphs and replayed.

Every test here needs a CUDA device (conftest skips the ``cuda`` marker elsewhere); the module
imports cleanly without one. Values are compared bit for bit against a host copy taken before
staging.
"""

from __future__ import annotations

import logging
import random
import time
from concurrent.futures import Future
from typing import Any

import pytest
import torch

from stager import GraphStager
from stager.device import DeviceCopier
from stager.graphs import CudaGraphExecutor

pytestmark = pytest.mark.cuda

KiB = 1 << 10
MiB = 1 << 20


def random_state_dict(device: str | torch.device, seed: int = 0, n_small: int = 300) -> dict[str, Any]:
    """Many small tensors in a row (biases, norms, scalars), a few large ones, views, a tied pair,
    every common dtype, an odd-offset view, and a nested optimizer-like part."""
    rng = random.Random(seed)
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.uint8, torch.bool]
    model: dict[str, torch.Tensor] = {}
    for i in range(n_small):
        dtype = dtypes[i % len(dtypes)]
        n = rng.choice([1, 3, 17, 64, 255, 1000, 4097, 20_000])
        nbytes = n * torch.empty(0, dtype=dtype).element_size()
        raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
        if dtype is torch.bool:
            raw = raw % 2
        model[f"small.{i}"] = raw.view(dtype).to(device)
    for i in range(3):
        model[f"large.{i}"] = torch.randn(2 * MiB // 4 + i, generator=g).to(device)
    base = torch.randn(10_000, generator=g).to(device)
    model["view.a"] = base[7:5007]  # odd element offset
    model["view.b"] = base[6000:9000].view(100, 30).t()  # non-contiguous
    model["tied"] = model["small.0"]
    optim = {
        "state": {
            i: {"exp_avg": torch.randn(64, generator=g).to(device), "step": torch.tensor(3.0)}
            for i in range(20)
        },
        "param_groups": [{"lr": 1e-3, "params": list(range(20))}],
    }
    return {"model": model, "optim": optim, "epoch": 7}


def host_copy(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [host_copy(v) for v in obj]
    return obj


def assert_bit_exact(expected: Any, out: Any, path: str = "") -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(out, torch.Tensor) and out.device.type == "cpu", path
        assert out.dtype == expected.dtype and out.shape == expected.shape, path
        assert torch.equal(out.contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8)), path
        return
    if isinstance(expected, dict):
        assert list(out) == list(expected), path
        for k in expected:
            assert_bit_exact(expected[k], out[k], f"{path}[{k!r}]")
    elif isinstance(expected, list):
        for i, (a, b) in enumerate(zip(expected, out)):
            assert_bit_exact(a, b, f"{path}[{i}]")
    else:
        assert out == expected, path


def tensors_of(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_of(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_of(v)]
    return []


def stage_sync(stager: GraphStager, sd: Any) -> Any:
    out = stager.stage(sd)
    return out.result() if isinstance(out, Future) else out


def sleep_cycles(seconds: float) -> int:
    """GPU clock cycles that ``torch.cuda._sleep`` spins for about ``seconds``."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    per_ms = cycles / max(start.elapsed_time(end), 1e-3)
    return int(per_ms * seconds * 1e3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_state_dicts_stage_bit_exactly_through_the_graph(seed: int) -> None:
    sd = random_state_dict("cuda", seed)
    expected = host_copy(sd)
    with GraphStager(cache_policy="cached", max_arenas=1) as stager:
        for i in range(3):
            out = stage_sync(stager, sd)
            assert_bit_exact(expected, out)
            stats = stager.last_stats
            assert stats is not None
            assert stats.device_path == "packed"
            assert stats.executor == ("graph-capture" if i == 0 else "graph-replay")
            del out


def test_captured_once_then_replays_only() -> None:
    sd = random_state_dict("cuda", 5)
    n = 6
    with GraphStager(cache_policy="cached", max_arenas=1) as stager:
        for _ in range(n):
            out = stage_sync(stager, sd)
            del out  # release the lease: the same arena, the same graph
        stats = stager.last_stats
        assert stats is not None
        assert (stats.captures, stats.replays) == (1, n - 1)
        assert stats.executor == "graph-replay"
        copier = next(iter(stager._copiers.values()))
        assert copier.program is not None and copier.program.packed


def test_two_cached_arenas_get_one_graph_each() -> None:
    sd = random_state_dict("cuda", 6, n_small=50)
    expected = host_copy(sd)
    with GraphStager(cache_policy="cached", max_arenas=2) as stager:
        held = [stage_sync(stager, sd), stage_sync(stager, sd)]  # both arenas leased
        assert stager.last_stats is not None and stager.last_stats.captures == 2
        for out in held:
            assert_bit_exact(expected, out)
        del held
        for _ in range(3):
            out = stage_sync(stager, sd)
            del out
        assert stager.last_stats.captures == 2 and stager.last_stats.replays == 3


def test_in_place_updates_between_checkpoints_are_staged() -> None:
    sd = random_state_dict("cuda", 7)
    with GraphStager(cache_policy="cached", max_arenas=1) as stager:
        for step in range(4):
            for t in tensors_of(sd["model"]):
                if t.dtype.is_floating_point:
                    t.add_(1.0)
                elif t.dtype is not torch.bool:
                    t.add_(1)
            expected = host_copy(sd)
            out = stage_sync(stager, sd)
            assert_bit_exact(expected, out)
            del out
        assert stager.last_stats is not None
        assert stager.last_stats.captures == 1 and stager.last_stats.replays == 3


def test_a_reallocated_parameter_is_recaptured() -> None:
    sd = random_state_dict("cuda", 8)
    with GraphStager(cache_policy="cached", max_arenas=1) as stager:
        stage_sync(stager, sd)  # capture (result dropped: the lease ends)
        stage_sync(stager, sd)  # replay
        assert stager.last_stats is not None and stager.last_stats.captures == 1
        # p.data = new tensor (set_to_none + lazy re-creation, load_state_dict into new buffers...)
        sd["model"]["small.5"] = sd["model"]["small.5"].clone() + 1
        expected = host_copy(sd)
        out = stage_sync(stager, sd)
        stats = stager.last_stats
        assert stats.replanned and stats.executor == "graph-capture" and stats.captures == 2
        assert_bit_exact(expected, out)
        del out
        out = stage_sync(stager, sd)
        assert stager.last_stats.executor == "graph-replay"
        assert_bit_exact(expected, out)


def test_a_storage_freed_and_its_block_reused_is_replanned_not_replayed() -> None:
    # FSDP frees parameter storage with resize_(0); the caching allocator hands the same block to
    # the next allocation of that size, so the new tensor has the planned data_ptr, shape, stride
    # and dtype. Only the check of the planned storages tells the plan's view now points at nothing.
    sd = random_state_dict("cuda", 10)
    with GraphStager(cache_policy="cached", max_arenas=1) as stager:
        stage_sync(stager, sd)
        stage_sync(stager, sd)
        t = sd["model"]["large.1"]
        old = t.data_ptr()
        t.untyped_storage().resize_(0)
        new = torch.empty(t.shape, dtype=t.dtype, device="cuda").normal_()
        sd["model"]["large.1"] = new
        expected = host_copy(sd)
        out = stage_sync(stager, sd)
        stats = stager.last_stats
        assert stats.replanned and stats.executor == "graph-capture", (new.data_ptr() == old, stats)
        assert_bit_exact(expected, out)


def test_staged_tensors_are_pinned() -> None:
    sd = random_state_dict("cuda", 9, n_small=30)
    with GraphStager(cache_policy="cached") as stager:
        out = stage_sync(stager, sd)
        for t in tensors_of(out):
            if t.numel():
                assert t.is_pinned()


@pytest.mark.parametrize("pieces", [2, 5])
def test_replay_in_pieces(pieces: int) -> None:
    sd = random_state_dict("cuda", 10)
    with GraphStager(cache_policy="cached", max_arenas=1, replay_pieces=pieces) as stager:
        for _ in range(3):
            for t in tensors_of(sd["model"]):
                if t.dtype.is_floating_point:
                    t.mul_(-1)
            expected = host_copy(sd)
            out = stage_sync(stager, sd)
            assert_bit_exact(expected, out)
            del out
        assert stager.last_stats.captures == 1 and stager.last_stats.replays == 2


@pytest.mark.parametrize(
    "overrides, executor, path",
    [
        pytest.param({"graphs": "off"}, "eager", "packed", id="graphs-off"),
        pytest.param({"triton": "off"}, "graph-replay", "packed", id="triton-off-reference-pack"),
        pytest.param({"pack_threshold": 0}, "graph-replay", "direct", id="no-packing"),
        pytest.param({"chunk_size": 64 * KiB}, "graph-replay", "packed", id="small-chunks"),
        pytest.param({"cache_policy": "fresh"}, "eager", "packed", id="fresh-arena"),
    ],
)
def test_configurations_stage_bit_exactly(overrides: dict[str, Any], executor: str, path: str) -> None:
    sd = random_state_dict("cuda", 11)
    expected = host_copy(sd)
    kw: dict[str, Any] = {"cache_policy": "cached", "max_arenas": 1}
    kw.update(overrides)
    with GraphStager(**kw) as stager:
        for _ in range(2):
            out = stage_sync(stager, sd)
            assert_bit_exact(expected, out)
            del out
        assert stager.last_stats.executor == executor
        assert stager.last_stats.device_path == path


def test_chunk_oom_falls_back_to_direct_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(self: DeviceCopier, slots: int, nbytes: int) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(DeviceCopier, "_allocate_chunks", oom)
    sd = random_state_dict("cuda", 12)
    expected = host_copy(sd)
    with GraphStager(cache_policy="cached", max_arenas=1) as stager:
        out = stage_sync(stager, sd)
        stats = stager.last_stats
        assert stats.device_path == "direct"
        assert any("out of device memory" in n for n in stats.notes)
        assert_bit_exact(expected, out)


def test_a_failed_capture_falls_back_to_eager_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: CudaGraphExecutor, bindings: Any) -> Any:
        raise RuntimeError("capture refused (injected)")

    monkeypatch.setattr(CudaGraphExecutor, "_capture", broken)
    sd = random_state_dict("cuda", 13, n_small=40)
    expected = host_copy(sd)
    with (
        caplog.at_level(logging.WARNING, logger="stager"),
        GraphStager(cache_policy="cached", max_arenas=1) as stager,
    ):
        for _ in range(3):
            out = stage_sync(stager, sd)
            assert_bit_exact(expected, out)
            assert stager.last_stats.executor == "eager"
            del out
        assert stager.last_stats.captures == 0
    warnings = [r for r in caplog.records if "capture refused" in r.getMessage()]
    assert len(warnings) == 1


def test_future_resolves_only_after_the_copy_is_complete() -> None:
    sd = random_state_dict("cuda", 14)
    with GraphStager(cache_policy="cached", async_staging=True, max_arenas=1) as stager:
        for _ in range(3):
            expected = host_copy(sd)
            fut = stager.stage(sd)
            assert isinstance(fut, Future)
            out = fut.result()
            # Mutate right after the Future resolved: the staged copy must hold the old values.
            for t in tensors_of(sd["model"]):
                t.zero_()
            torch.cuda.synchronize()
            assert_bit_exact(expected, out)
            for t in tensors_of(sd["model"]):
                t.fill_(3)
            del out, fut  # the Future holds the staged dict, and so the lease on the only arena


def test_stage_never_blocks_on_the_callers_stream() -> None:
    sd = random_state_dict("cuda", 15)
    with GraphStager(cache_policy="cached", async_staging=True, max_arenas=1) as stager:
        for _ in range(2):  # warm up: compile, capture, first replay
            stager.stage(sd).result()
        cycles = sleep_cycles(0.5)
        big = sd["model"]["large.0"]
        torch.cuda._sleep(cycles)  # the caller's stream is busy for ~0.5 s...
        big.fill_(42.0)  # ...and then produces the value the checkpoint must see
        t0 = time.perf_counter()
        fut = stager.stage(sd)
        returned = time.perf_counter() - t0
        assert returned < 0.1, f"stage() blocked for {returned:.3f} s"
        assert not fut.done()
        out = fut.result()
        assert time.perf_counter() - t0 > 0.2  # it really waited for the caller's stream on the device
        assert bool((out["model"]["large.0"] == 42.0).all())
        assert stager.last_stats.executor == "graph-replay"
        assert stager.last_stats.blocked_s < 0.1


def test_sources_stay_alive_until_the_copy_is_done() -> None:
    g = torch.Generator(device="cpu").manual_seed(16)
    base = {f"t{i}": torch.randn(1000 + i, generator=g).cuda() for i in range(50)}
    expected = {k: (v * 2).cpu() for k, v in base.items()}
    with GraphStager(cache_policy="cached", async_staging=True) as stager:
        torch.cuda._sleep(sleep_cycles(0.2))  # the copy cannot start before the temporaries are dropped
        fut = stager.stage({k: v * 2 for k, v in base.items()})  # temporaries, dropped at once
        # reuse their memory
        junk = [torch.full((1000 + i,), float("nan"), device="cuda") for i in range(200)]
        out = fut.result()
        del junk
        assert_bit_exact(expected, out)


def test_a_state_dict_spread_over_devices_gets_one_program_per_device() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    sd = {
        "a": random_state_dict("cuda:0", 17, n_small=60)["model"],
        "b": random_state_dict("cuda:1", 18, n_small=60)["model"],
        "cpu": torch.arange(10),
    }
    expected = host_copy(sd)
    with GraphStager(cache_policy="cached", max_arenas=1) as stager:
        for i in range(3):
            out = stage_sync(stager, sd)
            assert_bit_exact(expected, out)
            del out
        assert sorted(str(d) for d in stager._copiers) == ["cuda:0", "cuda:1"]
        for device, copier in stager._copiers.items():
            assert copier.program is not None and copier.program.device == device
            assert copier.captures == 1 and copier.replays == 2
        assert stager.last_stats.captures == 2 and stager.last_stats.replays == 4


def test_stage_nowait_leaves_the_copy_in_flight_behind_the_callers_stream() -> None:
    sd = random_state_dict("cuda", 19)
    with GraphStager(cache_policy="cached", max_arenas=1) as stager:
        for _ in range(2):
            staged, pending = stager.stage_nowait(sd)
            pending.wait()
            del staged, pending
        torch.cuda._sleep(sleep_cycles(0.3))
        sd["model"]["large.1"].fill_(7.0)
        t0 = time.perf_counter()
        staged, pending = stager.stage_nowait(sd)
        assert time.perf_counter() - t0 < 0.1
        assert pending is not None and not pending.query()
        for e in pending.events:  # what wrap's optimizer-step hook does: wait on the device
            torch.cuda.current_stream().wait_event(e)
        sd["model"]["large.1"].fill_(8.0)  # ordered after the copy
        torch.cuda.synchronize()
        assert bool((staged["model"]["large.1"] == 7.0).all())
        assert stager.last_stats.executor == "graph-replay"


def test_a_registered_arena_is_pinned_and_takes_a_captured_device_to_host_copy() -> None:
    """The premise of the graph path: cudaHostRegister'ed memory counts as pinned, and a
    non-blocking device-to-host copy into it can be captured on a side stream and replayed."""
    from stager.arena import HostArena

    arena = HostArena(1 << 20, pinned=True)
    assert arena.tensor.is_pinned() and arena.device == torch.cuda.current_device()
    arena.tensor.zero_()
    src = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        graph.capture_begin(capture_error_mode="thread_local")
        arena.tensor.copy_(src, non_blocking=True)
        graph.capture_end()
    side.synchronize()
    assert not bool(arena.tensor.any())  # capturing copies nothing
    for _ in range(2):
        src.add_(1)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            graph.replay()
        side.synchronize()
        assert torch.equal(arena.tensor, src.cpu())


def test_a_failed_registration_leaves_no_cuda_error_behind() -> None:
    """Registering a range twice fails (CUDA error 712); the error must not surface later as the
    error of an unrelated kernel launch on this thread."""
    from stager.arena import HostArena, _cuda_register

    arena = HostArena(1 << 16, pinned=True)
    with pytest.raises(RuntimeError, match="CUDA error"):
        _cuda_register(arena.ptr, arena.mapped_bytes)
    x = torch.ones(4, device="cuda") * 2  # a kernel launch check would raise a stale error
    torch.cuda.synchronize()
    assert x.sum().item() == 8.0


def test_pinned_arenas_are_unregistered_when_released() -> None:
    """Arenas come and go (fresh path): each is unregistered before it is unmapped, so a new one
    at the same address registers again instead of failing with error 712."""
    import gc

    from stager.arena import HostArena

    for _ in range(5):
        arena = HostArena(4 << 20, pinned=True)
        assert arena.tensor.is_pinned()
        del arena
        gc.collect()
    torch.ones(1, device="cuda").add_(1)
    torch.cuda.synchronize()
