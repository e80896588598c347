"""``python -m stager.benchmarks.torchtitan``: how long torchtitan's ``save()`` keeps training waiting.

torchtitan's llama3 ``debugmodel`` (6.2M parameters) and its AdamW state on a one-rank gloo group,
checkpointed every step through torchtitan's ``CheckpointManager`` flow: ``stock async``
(``async_mode="async"``: DCP's ``DefaultStager`` with every option off, a synchronous deep copy
inside ``save()``), ``stager async`` (:class:`~stager.integrations.torchtitan.StagerCheckpointManager`)
and ``stager async_with_pinned_mem`` (a writer process, a shared-memory arena; torchtitan's own
pinned mode needs an accelerator). Each save is timed alone, the previous one's write and staging
waited for first (as ``save()`` and the trainer do), so the figure is what ``save()`` itself costs;
the first save of each provider (plan, allocation, the writer's start) is reported apart.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from typing import Any

import torch

from stager.benchmarks.common import percentile

__all__ = ["main"]

PROVIDERS = ("stock async", "stager async", "stager async_with_pinned_mem")


def _parts() -> tuple[Any, Any, Any]:
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
    from torchtitan.models.llama3 import model_registry

    torch.manual_seed(0)
    model = model_registry("debugmodel").model.build()
    model.init_weights(buffer_device=None)
    optimizers = default_adamw(lr=8e-4).build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2)
    lr_schedulers = schedulers.build(optimizers=optimizers, training_steps=1000)
    return model, optimizers, lr_schedulers


def _run(provider: str, saves: int, root: str) -> dict[str, Any]:
    from torchtitan.components.checkpointer import CheckpointManager

    from stager.integrations.torchtitan import StagerCheckpointManager

    model, optimizers, lr_schedulers = _parts()
    mode = "async_with_pinned_mem" if provider.endswith("pinned_mem") else "async"
    cls = CheckpointManager if provider.startswith("stock") else StagerCheckpointManager
    checkpointer = cls.Config(enable=True, interval=1, keep_latest_k=2, async_mode=mode).build(
        dataloader=None, model_parts=[model], optimizers=optimizers, lr_schedulers=lr_schedulers,
        states={}, sd_adapter=None, base_folder=f"{root}/{provider.replace(' ', '-')}",
    )
    times: list[float] = []
    blocked: list[float] = []
    try:
        for step in range(1, saves + 1):
            for p in model.parameters():  # stands in for forward and backward
                p.grad = torch.randn_like(p)
            checkpointer.maybe_wait_for_staging()
            optimizers.step()
            lr_schedulers.step()
            checkpointer.maybe_wait_for_saving()
            t0 = time.perf_counter()
            checkpointer.save(step)
            times.append(time.perf_counter() - t0)
            stager = getattr(checkpointer, "stager", None)
            if stager is not None and step > 1:
                blocked.append(stager.last_stats.blocked_s)
        checkpointer.maybe_wait_for_staging()
        checkpointer.maybe_wait_for_saving()
        stats = getattr(getattr(checkpointer, "stager", None), "last_stats", None)
        complete = stats.complete_s if stats is not None and hasattr(stats, "complete_s") else None
    finally:
        checkpointer.close()
    nbytes = sum(t.nbytes for t in model.state_dict().values()) + sum(
        v.nbytes for v in optimizers.state_dict().values() if isinstance(v, torch.Tensor)
    )
    return {
        "provider": provider, "first_s": times[0], "rest_s": times[1:], "blocked_s": blocked,
        "complete_s": complete, "nbytes": nbytes,
    }


def main(argv: list[str] | None = None) -> int:
    """Run every provider and print a Markdown table; returns 0."""
    p = argparse.ArgumentParser(
        prog="python -m stager.benchmarks.torchtitan", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--saves", type=int, default=6, help="saves per provider, the first reported apart (default 6)"
    )
    every = ", ".join(PROVIDERS)
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated, from: {every}")
    args = p.parse_args(argv)
    providers = [x.strip() for x in args.providers.split(",") if x.strip()]
    bad = [x for x in providers if x not in PROVIDERS]
    if bad or args.saves < 2:
        print(f"error: unknown providers {bad} or --saves < 2; providers: {every}", file=sys.stderr)
        return 2

    from importlib.metadata import version

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    import torchtitan  # noqa: F401

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    unit = "GPU" if torch.cuda.is_available() else "CPU"
    rows = []
    with tempfile.TemporaryDirectory(prefix="stager-bench-tt-") as root:
        # Process-wide one-time costs (DCP's lazy imports and machinery) are paid here, by no provider.
        dcp.async_save({"warm-up": torch.zeros(1)}, checkpoint_id=f"{root}/warm-up").result()
        for provider in providers:
            rows.append(_run(provider, args.saves, root))
    dist.destroy_process_group()
    print(f"torchtitan save() return time, llama3 debugmodel + AdamW ({rows[0]['nbytes'] / 2**20:.1f} MiB), "
          f"{unit} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"torchtitan {version('torchtitan')}; {args.saves} saves each, {unit} numbers")
    print("")
    print("| provider | first save ms | save() ms p50 (p20-p80) | of which stage() ms p50 "
          "| staging complete ms (last) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        rest = [1e3 * t for t in r["rest_s"]]
        complete = f"{1e3 * r['complete_s']:.1f}" if r["complete_s"] is not None else "in save()"
        stage = f"{1e3 * percentile(r['blocked_s'], 0.5):.2f}" if r["blocked_s"] else "(all of the copy)"
        print(f"| {r['provider']} | {1e3 * r['first_s']:.1f} | {percentile(rest, 0.5):.1f} "
              f"({percentile(rest, 0.2):.1f}-{percentile(rest, 0.8):.1f}) | {stage} | {complete} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
