"""Running a bound staging program eagerly on the CPU, packing with the plain-torch reference and
with the Triton kernel under the interpreter (``TRITON_INTERPRET=1``, set by conftest). Bytes are
compared bit for bit; the arena is poisoned first."""

from __future__ import annotations

from typing import Any

import pytest
from _helpers import POISON, assert_same
from _staging import (
    CPU,
    KiB,
    chunks_for,
    mixed_state_dict,
    plan_of,
    raw,
)

from stager.arena import HostArena
from stager.graphs import (
    bind_program,
    build_program,
    run_eager,
)
from stager.staged_set import StagedSet
from stager.tree import rebuild


def _stage_eager(
    sd: Any, use_triton_: bool | None, *, threshold: int = 8 * KiB, chunk: int = 1 << 20
) -> tuple[Any, Any]:
    plan, tensors, others = plan_of(sd)
    program = build_program(plan.regions, CPU, pack_threshold=threshold, chunk_size=chunk)
    staged_set = StagedSet(plan, HostArena(plan.arena_bytes), cached=True)
    staged_set.arena.tensor.fill_(POISON)
    arena = staged_set.arena.tensor
    bindings = bind_program(program, plan.src_views, arena, chunks_for(program), use_triton=use_triton_)
    run_eager(bindings)
    return rebuild(plan.tokens, staged_set.tensors, tensors, others), program


def _interpreter_on() -> bool:
    from stager.kernels import kernel_backend

    return kernel_backend("cpu") == "triton-interpreter"


@pytest.mark.parametrize(
    "use_triton_",
    [pytest.param(False, id="reference"), pytest.param(True, id="triton-interpreter")],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_eager_program_stages_bit_exactly(use_triton_: bool, seed: int) -> None:
    if use_triton_ and not _interpreter_on():
        # conftest sets TRITON_INTERPRET=1 only where there is no GPU
        pytest.skip("TRITON_INTERPRET is off (a GPU is present); the cuda tests run the kernel")
    sd = mixed_state_dict(seed)
    out, program = _stage_eager(sd, use_triton_)
    assert program.packed and program.directs  # both paths exercised
    assert_same(sd, out)
    assert out["tied_a"].untyped_storage().data_ptr() == out["small0"].untyped_storage().data_ptr()


def test_eager_program_stages_bit_exactly_in_many_smallchunks_for() -> None:
    sd = {f"t{i}": raw(97 + i, i) for i in range(40)}
    out, program = _stage_eager(sd, False, threshold=1 << 20, chunk=1024)
    assert len(program.packs) > 4 and program.slots == 2
    assert_same(sd, out)


def test_eager_program_sees_in_place_updates_through_the_same_bindings() -> None:
    sd = {f"t{i}": raw(50, i) for i in range(6)}
    plan, tensors, others = plan_of(sd)
    program = build_program(plan.regions, CPU, pack_threshold=1000, chunk_size=1 << 20)
    staged_set = StagedSet(plan, HostArena(plan.arena_bytes), cached=True)
    arena = staged_set.arena.tensor
    bindings = bind_program(program, plan.src_views, arena, chunks_for(program), use_triton=False)
    run_eager(bindings)
    for t in sd.values():
        t.add_(1)
    run_eager(bindings)
    assert_same(sd, rebuild(plan.tokens, staged_set.tensors, tensors, others))


def test_the_done_event_is_recorded_once_after_the_program() -> None:
    class Event:
        recorded = 0

        def record(self) -> None:
            self.recorded += 1

    plan, _, _ = plan_of({"a": raw(10, 0), "b": raw(10, 1)})
    program = build_program(plan.regions, CPU, pack_threshold=1000, chunk_size=1 << 20)
    staged_set = StagedSet(plan, HostArena(plan.arena_bytes), cached=True)
    arena = staged_set.arena.tensor
    bindings = bind_program(program, plan.src_views, arena, chunks_for(program), use_triton=False)
    ev = Event()
    run_eager(bindings, done=ev)
    run_eager(bindings)  # no event given: none recorded
    assert ev.recorded == 1
