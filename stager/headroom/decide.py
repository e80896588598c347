"""The two pure decisions, testable with injected readings: where the next staged copy lives in
host memory (:func:`decide_host`) and how small tensors are staged given the device's free memory
(:func:`decide_device`)."""

from __future__ import annotations

from stager.envs import CachePolicy, LeasePolicy, format_size
from stager.errors import StagingMemoryError
from stager.headroom.readings import DeviceDecision, DeviceMode, DeviceReading, HostDecision, HostReading

MIN_CHUNK_BYTES = 1 << 20
"""The smallest device staging chunk :func:`decide_device` shrinks to before it gives up packing."""


def decide_host(
    needed_bytes: int,
    *,
    cached_arenas: int,
    max_cached_arenas: int,
    host: HostReading,
    cache_policy: CachePolicy | str = CachePolicy.AUTO,
    lease_policy: LeasePolicy | str = LeasePolicy.ALLOCATE,
    fresh_leased: int = 0,
) -> HostDecision:
    """Decide where the next staged copy of ``needed_bytes`` lives in host memory.

    The caller has already looked for a free cached arena (and reused it, recording
    :attr:`HostDecision.REUSE`): this decides only when none is free. Inputs: how many cached
    arenas exist (``cached_arenas``, all held) and the most allowed (``STAGER_MAX_ARENAS``), the
    host reading, the policies and how many fresh arenas are still leased (their memory returns
    when released, so waiting for them can make room). ``cache_policy`` and ``lease_policy`` are
    :class:`~stager.envs.CachePolicy` and :class:`~stager.envs.LeasePolicy` (or their strings).

    Terms: *room* is ``host.available_bytes >= needed_bytes``; *margin* is room for two arenas
    (``>= 2 * needed_bytes``); *held* is "cached arenas exist"; *leased* is held, or
    ``fresh_leased > 0``; *below max* is ``cached_arenas < max_cached_arenas``.
    Rows are tried top to bottom; the first that matches decides:

    ==============  ==========================================  ==========
    cache policy    condition                                   decision
    ==============  ==========================================  ==========
    auto, cached    held, lease policy ``wait``                 WAIT
    cached          below max, room                             NEW_CACHED
    auto            below max, margin                           NEW_CACHED
    auto, fresh     room                                        FRESH
    any             leased, lease policy ``wait``               WAIT
    any             otherwise                                   raise
    ==============  ==========================================  ==========

    (README.md, "Memory headroom", reads the rows as policies.) A WAIT needs no new memory: existing
    arenas are already counted in the reading; its timeout is the caller's.

    Raises :class:`~stager.errors.StagingMemoryError` naming the bytes needed and available, the
    source of the figure (file and values), and the knobs that would change the outcome.
    """
    cache_policy = CachePolicy(cache_policy)
    lease_policy = LeasePolicy(lease_policy)
    if needed_bytes < 0:
        raise ValueError(f"needed_bytes must be >= 0, got {needed_bytes}")
    if cached_arenas < 0 or max_cached_arenas < 0 or fresh_leased < 0:
        raise ValueError(
            f"arena counts must be >= 0, got cached_arenas={cached_arenas}, "
            f"max_cached_arenas={max_cached_arenas}, fresh_leased={fresh_leased}"
        )

    available = host.available_bytes
    room = available >= needed_bytes
    margin = available >= 2 * needed_bytes
    below_max = cached_arenas < max_cached_arenas
    wait = lease_policy is LeasePolicy.WAIT
    uses_cache = cache_policy is not CachePolicy.FRESH
    held = uses_cache and cached_arenas > 0
    leased = held or fresh_leased > 0

    if uses_cache:
        if held and wait:
            return HostDecision.WAIT
        if below_max and (room if cache_policy is CachePolicy.CACHED else margin):
            return HostDecision.NEW_CACHED
    if cache_policy is not CachePolicy.CACHED and room:
        return HostDecision.FRESH
    if leased and wait:
        return HostDecision.WAIT

    knobs = []
    if host.reserve_bytes > 0 and not room:  # with room, the reserve is not what stands in the way
        knobs.append(f"lower STAGER_HOST_RESERVE (now {format_size(host.reserve_bytes)} per rank)")
    if leased:
        knobs.append(
            "set STAGER_LEASE_POLICY=wait to wait for a leased arena to be released (for up to "
            "STAGER_LEASE_TIMEOUT seconds)"
        )
    if cache_policy is CachePolicy.CACHED:
        if room and not below_max:
            knobs.append(
                f"raise STAGER_MAX_ARENAS (now {max_cached_arenas}) or set "
                "STAGER_CACHE_POLICY=auto to stage into a fresh arena when no cached one is free"
            )
        elif room:
            knobs.append("set STAGER_CACHE_POLICY=auto to stage into a fresh arena")
    if not room and uses_cache and cached_arenas > 0:
        knobs.append(
            f"set STAGER_CACHE_POLICY=fresh so no arena stays pinned between checkpoints (now "
            f"{cached_arenas} cached)"
        )
    if not room:
        knobs.append("give the process more memory (container limit, fewer ranks per host)")
    arenas = (
        f"{cached_arenas} cached arena(s) of at most {max_cached_arenas}, none free, "
        f"{fresh_leased} fresh arena(s) leased; cache policy {cache_policy.value!r}, "
        f"lease policy {lease_policy.value!r}"
    )
    figure = (
        f"{format_size(available)} is available to this rank (source: {host.source}; host-wide "
        f"{format_size(host.limit_bytes)} / {host.ranks_per_host} rank(s) per host "
        f"({host.ranks_source}) - reserve {format_size(host.reserve_bytes)})"
    )
    if room:  # only the policies stand in the way
        what = f"and {figure}, but the policies allow no arena for it (every allowed arena is held)"
    else:
        what = f"but only {figure}"
    raise StagingMemoryError(
        f"staging needs {format_size(needed_bytes)} of host memory {what}; {arenas}. "
        "To proceed: " + "; or ".join(knobs) + "."
    )


def decide_device(
    needed_chunk_bytes: int,
    chunk_bytes: int,
    device: DeviceReading,
    reserve_bytes: int = 0,
    *,
    chunks_in_flight: int = 1,
    min_chunk_bytes: int = MIN_CHUNK_BYTES,
) -> DeviceDecision:
    """Decide how small tensors are staged given the device's free memory.

    ``needed_chunk_bytes`` is the total of the packed (small-tensor) regions; packing allocates
    ``chunks_in_flight`` chunks of ``chunk_bytes`` (fewer bytes when everything fits in less):
    ``min(needed_chunk_bytes, chunks_in_flight * chunk_bytes)``. The budget is
    ``device.free_bytes - reserve_bytes``.

    * nothing to pack -> ``DIRECT`` (chunk 0);
    * the configured chunks fit the budget -> ``PACKED`` with ``chunk_bytes``;
    * else the largest power of two ``c >= min_chunk_bytes`` with ``chunks_in_flight * c`` within
      the budget -> ``PACKED_SHRUNK`` with ``c``;
    * else -> ``DIRECT``: each region is copied straight to its arena slot (no device memory).
    """
    if needed_chunk_bytes < 0:
        raise ValueError(f"needed_chunk_bytes must be >= 0, got {needed_chunk_bytes}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if reserve_bytes < 0:
        raise ValueError(f"reserve_bytes must be >= 0, got {reserve_bytes}")
    if chunks_in_flight < 1:
        raise ValueError(f"chunks_in_flight must be >= 1, got {chunks_in_flight}")
    if min_chunk_bytes < 1 or min_chunk_bytes & (min_chunk_bytes - 1):
        raise ValueError(f"min_chunk_bytes must be a power of two >= 1, got {min_chunk_bytes}")

    budget = max(0, device.free_bytes - reserve_bytes)
    if needed_chunk_bytes == 0:
        return DeviceDecision(DeviceMode.DIRECT, 0, 0, budget, "nothing to pack")
    want = min(needed_chunk_bytes, chunks_in_flight * chunk_bytes)
    if want <= budget:
        return DeviceDecision(
            DeviceMode.PACKED, chunk_bytes, want, budget,
            f"{format_size(want)} of chunks fit the {format_size(budget)} budget",
        )
    per_chunk = budget // chunks_in_flight
    if per_chunk >= min_chunk_bytes:
        # largest power of two <= per_chunk; below chunk_bytes, else PACKED would have fit
        shrunk = 1 << (per_chunk.bit_length() - 1)
        used = min(needed_chunk_bytes, chunks_in_flight * shrunk)
        return DeviceDecision(
            DeviceMode.PACKED_SHRUNK,
            shrunk,
            used,
            budget,
            f"{format_size(want)} of chunks exceed the {format_size(budget)} budget "
            f"({device.source}, reserve {format_size(reserve_bytes)}); chunk shrunk to "
            f"{format_size(shrunk)}",
        )
    return DeviceDecision(
        DeviceMode.DIRECT,
        0,
        0,
        budget,
        f"budget {format_size(budget)} ({device.source}, reserve {format_size(reserve_bytes)}) "
        f"is below {chunks_in_flight} x the {format_size(min_chunk_bytes)} minimum chunk; "
        "copying each region directly",
    )

