"""Binding a staging program to memory: buffers too small or on the wrong device are refused."""

from __future__ import annotations

import pytest
from _staging import (
    CPU,
    chunks_for,
    plan_of,
    raw,
)

from stager.arena import HostArena
from stager.graphs import (
    bind_program,
    build_program,
)


def test_bind_rejects_small_chunks_and_wrong_sources() -> None:
    plan, _, _ = plan_of({"a": raw(100, 0), "b": raw(100, 1)})
    program = build_program(plan.regions, CPU, pack_threshold=1000, chunk_size=1 << 20)
    arena = HostArena(plan.arena_bytes).tensor
    with pytest.raises(ValueError, match="chunk 0"):
        bind_program(program, plan.src_views, arena, chunks_for(program, program.chunk_bytes - 1))
    with pytest.raises(ValueError, match="needs 1 chunk"):
        bind_program(program, plan.src_views, arena, [])
    with pytest.raises(ValueError, match="source of region 1"):
        bind_program(program, [plan.src_views[0], plan.src_views[1][:5]], arena, chunks_for(program))
    with pytest.raises(ValueError, match="too small"):
        bind_program(program, plan.src_views, arena[:10], chunks_for(program))
