"""torchtitan: a ``CheckpointManager`` whose asynchronous saves stage through a ``GraphStager``.

:class:`StagerCheckpointManager` is torchtitan's (0.3.0) DCP ``CheckpointManager`` with its own
nested :class:`StagerCheckpointManager.Config`, so it goes wherever torchtitan takes
``CheckpointManager.Config``. What changes per ``async_mode``, the checksums it writes and an
example: README.md, "Integrations / torchtitan". The stager is closed with the manager.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.distributed.checkpoint.stateful import Stateful

try:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType, AsyncSaveResponse
    from torchtitan.components.checkpointer.dcp import AsyncMode, CheckpointManager
    from torchtitan.tools.utils import GarbageCollection
except ImportError as exc:  # pragma: no cover - exercised only without torchtitan
    raise ImportError(
        f"stager.integrations.torchtitan needs torchtitan ({exc}); it is tested with torchtitan 0.3.0, "
        "installed without its heavy extras: pip install --no-deps torchtitan==0.3.0 spmd_types==0.2.3 "
        "&& pip install tyro"
    ) from exc

from stager.config import StagerConfig, available_profiles
from stager.envs import KNOBS_BY_FIELD, Mode
from stager.errors import StagerConfigError
from stager.integrity.writer import ChecksumWriter
from stager.stager import GraphStager

__all__ = ["StagerCheckpointManager"]


class StagerCheckpointManager(CheckpointManager):
    """torchtitan's DCP ``CheckpointManager``, staging its asynchronous saves with a ``GraphStager``.

    Built by torchtitan from :class:`StagerCheckpointManager.Config` with the same keyword
    arguments as ``CheckpointManager`` (``dataloader``, ``model_parts``, ``optimizers``,
    ``lr_schedulers``, ``states``, ``sd_adapter``, ``base_folder``). What each ``async_mode`` does:
    README.md, "Integrations / torchtitan".

    Attributes:
        stager: the :class:`~stager.GraphStager` (``None`` when checkpointing is disabled or
            ``async_mode="disabled"``); ``stager.plans_built`` counts the plans it built and
            ``stager.last_stats`` describes the last staging.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        """torchtitan's checkpoint options plus the stager's.

        Each ``stager_*`` field left at ``None`` takes its value from the stager's own
        configuration (the ``STAGER_*`` variables, then the profile's defaults).
        """

        stager_profile: str | None = None
        """Stager tuning preset (``default``, ``low_memory``, ``throughput``); ``STAGER_PROFILE``
        when unset."""

        stager_max_arenas: int | None = None
        """Most persistent host arenas the stager keeps (``STAGER_MAX_ARENAS`` when unset)."""

        stager_lease_policy: Literal["wait", "allocate"] | None = None
        """When the cached arena is still held by a write: wait for it, or allocate another."""

        stager_nvtx: bool | None = None
        """Profiler ranges (``stager/*``) for torch.profiler and nsys (``STAGER_NVTX`` when unset)."""

        stager_profile_checkpoints: str | None = None
        """Checkpoints bracketed for ``nsys --capture-range=cudaProfilerApi``, e.g. ``"2"`` or ``"2-3"``."""

        stager_checksum: Literal["auto", "on", "off"] | None = None
        """Checksums of the staged copy and of every saved tensor (``STAGER_CHECKSUM`` when unset)."""

        def __post_init__(self) -> None:
            CheckpointManager.Config.__post_init__(self)
            self.stager_config()  # a bad stager_* value fails here, when the config is built

        def stager_config(self, *, process_writer: bool | None = None) -> StagerConfig:
            """The :class:`~stager.StagerConfig` this manager's stager is built with.

            Asynchronous staging is always on; the arena is in shared memory when the writer is
            a process (``async_mode="async_with_pinned_mem"``, or ``process_writer=True``).

            Raises:
                StagerConfigError: a ``stager_*`` value (or a ``STAGER_*`` variable) is invalid;
                    the message names the field.
            """
            if process_writer is None:
                process_writer = self.async_mode == AsyncMode.ASYNC_WITH_PINNED_MEM.value
            fields = {
                "profile": self.stager_profile,
                "max_arenas": self.stager_max_arenas,
                "lease_policy": self.stager_lease_policy,
                "nvtx": self.stager_nvtx,
                "profile_checkpoints": self.stager_profile_checkpoints,
                "checksum": self.stager_checksum,
            }
            overrides: dict[str, Any] = {}
            for name, value in fields.items():
                if value is None:
                    continue
                # Checked here first so that a bad value names this config's field.
                KNOBS_BY_FIELD[name].convert(value, f"checkpoint.stager_{name}")
                overrides[name] = value
            if "profile" in overrides and overrides["profile"] not in available_profiles():
                raise StagerConfigError(
                    f"checkpoint.stager_profile={overrides['profile']!r} is not a stager profile; "
                    f"valid profiles: {', '.join(available_profiles())}"
                )
            overrides["async_staging"] = True
            if process_writer:
                overrides["shared_memory"] = True
            return StagerConfig.resolve(**overrides)

    def __init__(self, config: Config, **kwargs: Any) -> None:
        self.stager = None
        super().__init__(config, **kwargs)
        stager_config = config.stager_config()
        # A writer in another process, or a synchronous save, has no staged checksums to reuse.
        self._hash_on_write = stager_config.checksum is Mode.ON
        if not self.enable or self.async_mode == AsyncMode.DISABLED:
            return
        # Preset, so the pinned mode's lazy ``DefaultStager`` is never built.
        self.stager = GraphStager(stager_config)

    def dcp_save(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: str,
        async_mode: AsyncMode,
        enable_garbage_collection: bool = False,
        to_hf: bool = False,
    ) -> Any:
        """torchtitan's ``dcp_save``, writing through a :class:`~stager.integrity.ChecksumWriter`.

        ``"async_with_pinned_mem"`` hands ``self.stager`` to ``dcp.async_save`` with a process
        writer, as torchtitan does. In ``"async"`` mode this calls ``dcp.async_save(...,
        async_stager=self.stager)`` (thread writer), keeps the staging future for
        :meth:`maybe_wait_for_staging` and returns the upload future, as torchtitan expects of
        that mode. ``"disabled"`` is torchtitan's ``dcp.save``. Hugging Face exports
        (``to_hf``) are torchtitan's own, without checksums.
        """
        if to_hf or (async_mode != AsyncMode.DISABLED and self.stager is None):
            return super().dcp_save(
                state_dict, checkpoint_id, async_mode,
                enable_garbage_collection=enable_garbage_collection, to_hf=to_hf,
            )
        writer = ChecksumWriter(checkpoint_id, checksum=True if self._hash_on_write else None)
        if async_mode == AsyncMode.ASYNC:
            result = dcp.async_save(
                state_dict, storage_writer=writer, checkpoint_id=checkpoint_id, process_group=self.pg,
                async_stager=self.stager,
            )
            if isinstance(result, AsyncSaveResponse):
                self.staging_future = result.staging_completion
                result = result.upload_completion
        elif async_mode == AsyncMode.ASYNC_WITH_PINNED_MEM:
            result = dcp.async_save(
                state_dict, storage_writer=writer, checkpoint_id=checkpoint_id, process_group=self.pg,
                async_checkpointer_type=AsyncCheckpointerType.PROCESS, async_stager=self.stager,
            )
        else:
            result = dcp.save(state_dict, storage_writer=writer, checkpoint_id=checkpoint_id)
        if enable_garbage_collection:
            GarbageCollection.collect("GC collection invoked by checkpointer.")
        return result

    def _maybe_wait_for_staging(self) -> None:
        # torchtitan's own refuses a staging future outside the pinned mode; here both modes stage
        # asynchronously, and the trainer calls this before the optimizer step.
        if self.staging_future is None:
            return
        self.staging_future.result()
        self.staging_future = None

    @torch.no_grad()
    def prewarm(self) -> None:
        """Plan and allocate the stager's host arena for the current state, copying nothing.

        Call it once the optimizer state exists (after the first optimizer step), so that the
        first checkpoint does not pay for planning and allocating (and pinning). A no-op when
        the manager has no stager.
        """
        if self.stager is None:
            return
        states = self._flattened_model_states_sd()
        # As dcp.async_save does before staging: each Stateful is replaced by its state_dict().
        self.stager.prewarm({k: v.state_dict() if isinstance(v, Stateful) else v for k, v in states.items()})
