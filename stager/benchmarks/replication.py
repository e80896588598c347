"""Replication benchmark: the packed arena against PyTorch's per-tensor transport, two gloo ranks.

``python -m stager.benchmarks.replication [--case small] [--iters 5] [--json FILE]`` spawns two
ranks on this machine (gloo over loopback); each stages the same workload
(``staging.make_workload("cpu", case)``) once and exchanges its staged copy with its partner, both
directions at once: ``floor (one message each way)`` (one ``isend``/``irecv`` pair of the same
bytes), ``stager Replicator (packed arena)`` (the arena as it is, in chunks of at most 256 MiB),
``stager Replicator (foreign dict, packed)`` (the unstaged dict, packed into a host buffer first),
``PGTransport (per tensor)`` (DCP's ``_pg_transport.PGTransport``, the lower rank sending first as
``_ReplicationStager`` does, without its torch.save persistence). Times are wall-clock on rank 0
between two barriers, warm-ups not counted: CPU figures over loopback, comparing per-message
overhead, not a network.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch

from stager.benchmarks import common

__all__ = ["ReplicationRow", "main"]


@dataclass(kw_only=True)
class ReplicationRow(common.Row):
    """One provider on one workload; the JSON rows have exactly these fields."""

    ms_p50: float
    ms_p20: float
    ms_p80: float
    gbps: float
    """Bytes one rank sends per exchange / p50 time."""
    x_floor: float
    messages: int
    """Messages one rank posts per exchange (both directions)."""
    note: str = ""


COLUMNS = common.LEAD + [
    common.spread_column("ms p50 (p20-p80)", "ms", 1),
    common.Column("GB/s", lambda r: f"{r.gbps:.2f}"),
    common.Column("x floor", lambda r: f"{r.x_floor:.2f}"),
    common.Column("msgs", lambda r: str(r.messages)),
    common.Column("note", lambda r: r.note, left=True),
]


def _time(fn: Callable[[], Any], iters: int, warmup: int) -> list[float]:
    import torch.distributed as dist

    times = []
    for i in range(warmup + iters):
        dist.barrier()
        t0 = time.perf_counter()
        out = fn()
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        del out
        gc.collect()
    return times


def _rank_main(rank: int, world: int, port: int, case: str, iters: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist
    from torch.distributed.checkpoint._pg_transport import PGTransport

    from stager import GraphStager
    from stager.benchmarks.staging import make_workload
    from stager.distributed import Replicator
    from stager.tree import tensors_in

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=10))
    sd = make_workload("cpu", case)
    n_tensors = len(tensors_in(sd))
    stager = GraphStager(cache_policy="cached")
    staged = stager.stage(sd)
    nbytes = stager.plan.nbytes
    partner = (rank + world // 2) % world
    group = dist.new_group(backend="gloo", timeout=timedelta(minutes=10))

    # floor: the same bytes as one message each way
    src = torch.ones(stager.plan.arena_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)

    def floor() -> None:
        works = [dist.irecv(dst, src=partner, group=group), dist.isend(src, dst=partner, group=group)]
        for w in works:
            w.wait()

    results: list[tuple[str, list[float], int, str]] = []
    results.append(("floor (one message each way)", _time(floor, iters, 1), 2, ""))

    rep = Replicator(stager, group=group, timeout=600)
    t = _time(lambda: rep.replicate(staged), iters, 1)
    assert rep.last_stats is not None and rep.last_stats.zero_copy and not rep.last_stats.plan_sent
    results.append(("stager Replicator (packed arena)", t, rep.last_stats.messages, ""))

    foreign = Replicator(GraphStager(), group=group, timeout=600)
    t = _time(lambda: foreign.replicate(sd), iters, 1)
    assert foreign.last_stats is not None
    note = f"pack {foreign.last_stats.pack_s * 1e3:.1f} ms"
    results.append(("stager Replicator (foreign dict, packed)", t, foreign.last_stats.messages, note))

    transport = PGTransport(group, timedelta(minutes=10), torch.device("cpu"))
    peer = dist.get_global_rank(group, partner)

    def per_tensor() -> Any:
        if rank < partner:
            transport.send_checkpoint([peer], staged)
            return transport.recv_checkpoint(peer)
        received = transport.recv_checkpoint(peer)
        transport.send_checkpoint([peer], staged)
        return received

    pg_iters = max(1, min(iters, 3))
    results.append(("PGTransport (per tensor)", _time(per_tensor, pg_iters, 1), 2 * (2 + n_tensors), ""))

    if rank == 0:
        floor_p50 = common.spread_ms(results[0][1])[0]
        rows = []
        for name, times, messages, note in results:
            p50, p20, p80 = common.spread_ms(times)
            rows.append(ReplicationRow(
                case=case, tensors=n_tensors, mib=round(nbytes / common.MiB, 1), provider=name,
                ms_p50=p50, ms_p20=p20, ms_p80=p80, gbps=nbytes / (p50 / 1e3) / 1e9, x_floor=p50 / floor_p50,
                messages=messages, note=note,
            ))
        head = common.header("cpu")
        head["ranks"] = f"{world} gloo ranks, loopback"
        common.write_json(out_path, head, rows)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Command line: spawn the two ranks, print the header and the table; ``--json FILE`` also
    writes them."""
    parser = argparse.ArgumentParser(
        prog="python -m stager.benchmarks.replication", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--case", default="small", help="a CPU workload of `python -m stager bench`: small, mixed or large"
    )
    parser.add_argument("--iters", type=int, default=5, help="timed exchanges per provider (after 1 warm-up)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        ranks = (2, port, args.case, args.iters, out)
        mp.start_processes(_rank_main, args=ranks, nprocs=2, start_method="spawn")
        with open(out) as f:
            data = json.load(f)
    rows = [ReplicationRow(**r) for r in data["rows"]]
    print(common.table(data["header"], COLUMNS, rows))
    if args.json:
        common.write_json(args.json, data["header"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
