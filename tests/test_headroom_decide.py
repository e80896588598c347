"""Tests of ``stager.headroom.decide``: the host and device decision tables, driven by injected
readings."""

from __future__ import annotations

import re
from typing import Any

import pytest
from _headroom import FIXTURES, GiB, MiB, clear_rank_env, host_reading

from stager import headroom as hr
from stager.envs import CachePolicy, LeasePolicy
from stager.errors import StagingMemoryError
from stager.headroom import (
    DeviceDecision,
    DeviceMode,
    DeviceReading,
    HostDecision,
    decide_device,
    decide_host,
    read_host,
)


@pytest.fixture(autouse=True)
def _no_rank_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_rank_env(monkeypatch)


N = 100


def decide(
    cache: str, lease: str, arenas: int, max_arenas: int, fresh_leased: int, available: int
) -> HostDecision:
    """``decide_host`` for ``N`` bytes with no cached arena free (the stager reuses a free one)."""
    return decide_host(
        N,
        cached_arenas=arenas,
        max_cached_arenas=max_arenas,
        host=host_reading(available),
        cache_policy=cache,
        lease_policy=lease,
        fresh_leased=fresh_leased,
    )


# id: (cache policy, lease policy, cached arenas, max cached, fresh leased, available) -> decision.
# Every row of decide_host's docstring table, from both sides.
HOST_TABLE = [
    pytest.param(("fresh", "wait", 1, 1, 0, N), HostDecision.FRESH, id="fresh-ignores-cached-arena"),
    # held cached arena, lease policy wait: wait even with room for another
    pytest.param(("cached", "wait", 1, 2, 0, 10 * N), HostDecision.WAIT, id="cached-held-wait-despite-room"),
    pytest.param(("auto", "wait", 1, 2, 0, 10 * N), HostDecision.WAIT, id="auto-held-wait-despite-room"),
    # new cached arena: cached needs room, auto needs a margin of one more arena
    pytest.param(("cached", "wait", 0, 1, 0, N), HostDecision.NEW_CACHED, id="cached-first-arena"),
    pytest.param(
        ("cached", "allocate", 1, 2, 0, N), HostDecision.NEW_CACHED, id="cached-held-allocate-second"
    ),
    pytest.param(
        ("auto", "wait", 0, 1, 0, 2 * N), HostDecision.NEW_CACHED, id="auto-first-arena-with-margin"
    ),
    pytest.param(
        ("auto", "allocate", 1, 2, 0, 2 * N), HostDecision.NEW_CACHED, id="auto-held-allocate-second"
    ),
    # fresh arenas: auto without margin or at the maximum; fresh policy with room
    pytest.param(("auto", "wait", 0, 1, 0, 2 * N - 1), HostDecision.FRESH, id="auto-no-margin-fresh"),
    pytest.param(("auto", "allocate", 2, 2, 0, N), HostDecision.FRESH, id="auto-at-max-allocate-fresh"),
    pytest.param(("auto", "allocate", 0, 0, 0, N), HostDecision.FRESH, id="auto-max-zero-fresh"),
    pytest.param(("fresh", "allocate", 0, 0, 3, N), HostDecision.FRESH, id="fresh-with-room"),
    # no room: wait for whatever is leased, when waiting is allowed
    pytest.param(("cached", "wait", 1, 1, 0, N - 1), HostDecision.WAIT, id="cached-no-room-wait"),
    pytest.param(("auto", "wait", 0, 1, 2, N - 1), HostDecision.WAIT, id="auto-no-room-wait-for-fresh-lease"),
    pytest.param(
        ("fresh", "wait", 0, 0, 1, N - 1), HostDecision.WAIT, id="fresh-no-room-wait-for-fresh-lease"
    ),
]
Row = tuple[str, str, int, int, int, int]


@pytest.mark.parametrize(("row", "expected"), HOST_TABLE)
def test_decide_host_table(row: Row, expected: HostDecision) -> None:
    got = decide(*row)
    assert got is expected
    assert got.value == expected.value  # str-valued


def test_decide_host_accepts_str_enums() -> None:
    got = decide_host(
        N, cached_arenas=1, max_cached_arenas=1, host=host_reading(0),
        cache_policy=CachePolicy.CACHED, lease_policy=LeasePolicy.WAIT,
    )
    assert got is HostDecision.WAIT


@pytest.mark.parametrize(
    ("row", "knob"),
    [
        pytest.param(
            ("cached", "allocate", 1, 1, 0, N - 1), "STAGER_LEASE_POLICY=wait", id="allocate-never-waits"
        ),
        pytest.param(
            ("cached", "allocate", 2, 2, 0, N), "raise STAGER_MAX_ARENAS (now 2)",
            id="cached-at-max-with-room",
        ),
        pytest.param(("cached", "wait", 0, 0, 0, N), "STAGER_CACHE_POLICY=auto", id="cached-max-zero"),
        pytest.param(
            ("fresh", "allocate", 0, 0, 1, N - 1), "STAGER_LEASE_TIMEOUT", id="fresh-leased-allocate"
        ),
        pytest.param(("fresh", "wait", 0, 0, 0, N - 1), "more memory", id="nothing-to-wait-for"),
        pytest.param(("auto", "wait", 0, 1, 0, N - 1), "more memory", id="first-arena-no-room"),
        pytest.param(
            ("auto", "allocate", 2, 2, 1, N - 1), "STAGER_CACHE_POLICY=fresh", id="pinned-arenas-held"
        ),
    ],
)
def test_decide_host_raises(row: Row, knob: str) -> None:
    available = row[-1]
    with pytest.raises(StagingMemoryError, match=re.escape(knob)) as info:
        decide(*row)
    assert isinstance(info.value, MemoryError)
    msg = str(info.value)
    assert msg.startswith("staging needs 100 B of host memory ")
    assert f" {available} B is available to this rank" in msg
    if available < N:
        assert f"but only {available} B is available" in msg
    else:
        assert "but the policies allow no arena for it" in msg
    assert "cgroup v2 memory.max at /sys/fs/cgroup/kubepods.slice/pod1/memory.max" in msg


def test_decide_host_error_message_from_real_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    host = read_host(root=FIXTURES / "v2_pod", reserve_bytes=512 * MiB)
    assert host.available_bytes == 2 * GiB  # 5 GiB / 2 - 512 MiB
    with pytest.raises(StagingMemoryError) as info:
        decide_host(
            8 * GiB,
            cached_arenas=1,
            max_cached_arenas=1,
            host=host,
            cache_policy="cached",
            lease_policy="allocate",
        )
    msg = str(info.value)
    assert "needs 8.00 GiB of host memory" in msg
    assert "only 2.00 GiB is available to this rank" in msg
    assert f"cgroup v2 memory.max at {FIXTURES / 'v2_pod/sys/fs/cgroup/memory.max'}" in msg
    assert "2 rank(s) per host (LOCAL_WORLD_SIZE)" in msg
    for knob in (
        "STAGER_HOST_RESERVE",
        "STAGER_LEASE_POLICY=wait",
        "STAGER_LEASE_TIMEOUT",
        "STAGER_CACHE_POLICY=fresh",
    ):
        assert knob in msg


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        pytest.param({"max_cached_arenas": -1}, ValueError, "max_cached_arenas=-1", id="negative-max"),
        pytest.param({"cache_policy": "sometimes"}, ValueError, "CachePolicy", id="unknown-cache-policy"),
        pytest.param({"lease_policy": "block"}, ValueError, "LeasePolicy", id="unknown-lease-policy"),
    ],
)
def test_decide_host_bad_inputs(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    args: dict[str, Any] = dict(cached_arenas=1, max_cached_arenas=1, host=host_reading(N))
    args.update(kwargs)
    with pytest.raises(error, match=message):
        decide_host(N, **args)


def device_reading(free: int, slack: int = 0) -> DeviceReading:
    return DeviceReading(
        index=0,
        free_bytes=free + slack,
        source="NVML nvmlDeviceGetMemoryInfo on NVML index 0 + allocator slack",
        nvml_free=free,
        allocator_slack=slack,
        total_bytes=80 * GiB,
        physical="NVML index 0",
    )


PACKED, SHRUNK, DIRECT = DeviceMode.PACKED, DeviceMode.PACKED_SHRUNK, DeviceMode.DIRECT


@pytest.mark.parametrize(
    ("needed", "chunk", "free", "slack", "reserve", "in_flight", "mode", "chunk_out", "device_bytes"),
    [
        pytest.param(1 * GiB, 64 * MiB, 10 * GiB, 0, 0, 1, PACKED, 64 * MiB, 64 * MiB, id="packed"),
        pytest.param(3 * MiB, 64 * MiB, 4 * MiB, 0, 0, 1, PACKED, 64 * MiB, 3 * MiB, id="packed-small-total"),
        pytest.param(
            1 * GiB, 64 * MiB, 100 * MiB, 0, 0, 2, SHRUNK, 32 * MiB, 64 * MiB, id="shrunk-two-in-flight"
        ),
        pytest.param(
            1 * GiB, 64 * MiB, 40 * MiB, 30 * MiB, 0, 1, PACKED, 64 * MiB, 64 * MiB, id="slack-counts"
        ),
        pytest.param(
            1 * GiB, 64 * MiB, 64 * MiB, 0, 1, 1, SHRUNK, 32 * MiB, 32 * MiB, id="reserve-forces-shrink"
        ),
        pytest.param(
            1 * GiB, 64 * MiB, 3 * MiB + 5, 0, 0, 1, SHRUNK, 2 * MiB, 2 * MiB, id="shrunk-to-power-of-two"
        ),
        pytest.param(1 * GiB, 64 * MiB, MiB - 1, 0, 0, 1, DIRECT, 0, 0, id="below-minimum-direct"),
        pytest.param(1 * GiB, 64 * MiB, 3 * MiB, 0, 0, 4, DIRECT, 0, 0, id="in-flight-below-minimum-direct"),
        pytest.param(0, 64 * MiB, 10 * GiB, 0, 0, 1, DIRECT, 0, 0, id="nothing-to-pack"),
    ],
)
def test_decide_device(
    needed: int,
    chunk: int,
    free: int,
    slack: int,
    reserve: int,
    in_flight: int,
    mode: DeviceMode,
    chunk_out: int,
    device_bytes: int,
) -> None:
    d = decide_device(needed, chunk, device_reading(free, slack), reserve, chunks_in_flight=in_flight)
    assert isinstance(d, DeviceDecision)
    assert (d.mode, d.chunk_bytes, d.device_bytes) == (mode, chunk_out, device_bytes)
    assert d.budget_bytes == max(0, free + slack - reserve)
    assert d.device_bytes <= d.budget_bytes or d.mode is DeviceMode.DIRECT
    if d.mode is DeviceMode.PACKED_SHRUNK:
        assert d.chunk_bytes & (d.chunk_bytes - 1) == 0
        assert hr.MIN_CHUNK_BYTES <= d.chunk_bytes < chunk


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        pytest.param((-1, MiB), {}, "needed_chunk_bytes must be >= 0", id="negative-needed"),
        pytest.param((1, 0), {}, "chunk_bytes must be >= 1", id="zero-chunk"),
        pytest.param((1, MiB), {"reserve_bytes": -5}, "reserve_bytes must be >= 0", id="negative-reserve"),
        pytest.param((1, MiB), {"chunks_in_flight": 0}, "chunks_in_flight must be >= 1", id="zero-in-flight"),
        pytest.param((1, MiB), {"min_chunk_bytes": 3 * MiB}, "power of two", id="min-not-power-of-two"),
    ],
)
def test_decide_device_bad_inputs(args: tuple[int, int], kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decide_device(*args, device_reading(GiB), **kwargs)
