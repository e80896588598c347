"""torch_checkpointing: a ``CheckpointStager`` over a ``GraphStager``.

:class:`GraphCheckpointStager` is a torch_checkpointing (0.1.1) ``CheckpointStager`` that its
``AsyncCheckpointSaver(checkpoint_stager=...)`` takes; :func:`make_async_checkpoint_saver` builds
the saver with it, as torch_checkpointing's builder of that name does with its ``DefaultStager``.
The contract, the lease of the previous payload and an example: README.md, "Integrations /
torch_checkpointing".
"""

from __future__ import annotations

import copy
import threading
from concurrent import futures
from concurrent.futures import Future
from typing import Any, Collection, Mapping, Sequence

try:
    from torch_checkpointing.staging import CheckpointStager
except ImportError as exc:  # pragma: no cover - exercised only without torch_checkpointing
    raise ImportError(
        f"stager.integrations.torch_checkpointing needs torch_checkpointing ({exc}); it is tested "
        "with torch_checkpointing 0.1.1: pip install --no-deps torch_checkpointing==0.1.1"
    ) from exc

from stager.config import StagerConfig
from stager.stager import GraphStager

__all__ = ["GraphCheckpointStager", "make_async_checkpoint_saver"]


class GraphCheckpointStager(CheckpointStager):
    """torch_checkpointing's ``CheckpointStager`` protocol over a :class:`~stager.GraphStager`.

    Args:
        stager: the ``GraphStager`` to stage with; by default one is built from ``config`` and
            ``overrides`` with asynchronous staging and a shared-memory arena (the writer is a
            spawned process, which then receives the staged tensors by reference). A stager
            passed in is owned by this object from then on (:meth:`close` closes it).
        reuse_previous: end the previous payload's lease at each ``stage()`` (README.md,
            "torch_checkpointing"). Default ``True``, as ``DefaultStager`` reuses its buffers.
        config, **overrides: for the ``GraphStager`` built here (``StagerConfig`` fields).
    """

    def __init__(
        self,
        stager: GraphStager | None = None,
        *,
        reuse_previous: bool = True,
        config: StagerConfig | None = None,
        **overrides: Any,
    ) -> None:
        if stager is None:
            overrides.setdefault("async_staging", True)
            overrides.setdefault("shared_memory", True)
            stager = GraphStager(config, **overrides)
        elif config is not None or overrides:
            raise TypeError("pass either a GraphStager or config/overrides for one, not both")
        self.stager = stager
        """The :class:`~stager.GraphStager` this stages with."""
        self.reuse_previous = reuse_previous
        self._lock = threading.Lock()
        self._staged: Any = None  # the last payload (its Future while staging runs)
        self._inner: Any = None  # what the GraphStager returned for it (released at the next stage)

    def stage(self, state_dict: Any, keys_not_requiring_copy: Sequence[str] | Collection[str] = ()) -> Any:
        """Stage ``state_dict``; the values under ``keys_not_requiring_copy`` are passed through.

        Returns a ``Future`` of the staged payload when the stager stages asynchronously (the
        default here), else the payload. The payload is a new mapping of the input's type with
        every key of the input: the copied keys staged (tensors in host memory, the rest
        deep-copied), the others the very same objects.

        Raises:
            TypeError: ``keys_not_requiring_copy`` is given for a payload that is not a mapping.
            StagingInputError: a leaf cannot be staged (its key path is named); nothing was copied.
        """
        keep = tuple(keys_not_requiring_copy or ())
        if keep and not isinstance(state_dict, Mapping):
            raise TypeError(
                f"keys_not_requiring_copy={list(keep)!r} needs a mapping payload, got "
                f"{type(state_dict).__name__}; pass a dict or no keys"
            )
        with self._lock:
            previous, self._inner, self._staged = self._inner, None, None
            if previous is not None and self.reuse_previous:
                if isinstance(previous, Future):
                    futures.wait([previous])  # still staging (a caller that did not wait for it)
                self.stager.release(previous)
            del previous
            if keep:
                to_copy = copy.copy(state_dict)  # shallow, of the input's type, as DefaultStager does
                for key in keep:
                    to_copy.pop(key, None)
            else:
                to_copy = state_dict
            inner = self.stager.stage(to_copy)
            staged = inner
            if keep:
                passed = {k: state_dict[k] for k in keep if k in state_dict}
                staged = _then(inner, lambda sd: _merge(sd, passed, state_dict))
            self._inner, self._staged = inner, staged
            return staged

    def get_staged_state_dict(self) -> object | None:
        """The most recently staged payload (``None`` before the first stage or if it failed).

        Waits for an asynchronous stage still running.
        """
        staged = self._staged
        if isinstance(staged, Future):
            try:
                return staged.result()
            except Exception:
                return None
        return staged

    def pinned_num_bytes(self) -> int:
        """Pinned host bytes held by the stager's arenas (0 without CUDA: nothing is pinned)."""
        return int(self.stager.host_bytes().pinned)

    def close(self) -> None:
        """Close the stager (waits for staging in flight); staged payloads stay valid."""
        with self._lock:
            self._staged = self._inner = None
        self.stager.close()


def _merge(staged: Any, passed: dict[str, Any], original: Any) -> Any:
    """A new mapping of the staged payload's type with the passed-through values put back, in
    the input's key order (the stager's own payload is left as it is, to be released)."""
    out = copy.copy(staged)
    out.clear()
    for key in original:
        if key in passed:
            out[key] = passed[key]
        elif key in staged:
            out[key] = staged[key]
    return out


def _then(result: Any, fn: Any) -> Any:
    """``fn(result)``, or a ``Future`` of it when ``result`` is a ``Future``."""
    if not isinstance(result, Future):
        return fn(result)
    out: Future = Future()

    def done(f: Future) -> None:
        try:
            out.set_result(fn(f.result()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's Future
            out.set_exception(exc)

    result.add_done_callback(done)
    return out


def make_async_checkpoint_saver(
    stager: GraphCheckpointStager | None = None,
    *,
    config: Any = None,
    rank_info: Any = None,
    storage_config: Any = None,
    checkpoint_metadata_manager: Any = None,
    pre_finalize_callback: Any = None,
    finalize_callback: Any = None,
    subprocess_init_fn: Any = None,
    subprocess_init_args: tuple[Any, ...] = (),
) -> Any:
    """torch_checkpointing's ``make_async_checkpoint_saver`` with a :class:`GraphCheckpointStager`.

    Same arguments as ``torch_checkpointing.make_async_checkpoint_saver`` (``config`` is an
    ``AsyncCheckpointSaverConfig``; its ``staging_config`` is not used), plus ``stager``
    (default: ``GraphCheckpointStager()``). Returns an ``AsyncCheckpointSaver`` that writes from a
    spawned process; ``saver.close()`` closes the stager and the process.
    """
    from torch_checkpointing.builder import _default_subprocess_init, _get_default_rank_info
    from torch_checkpointing.checkpoint_process import CheckpointProcess
    from torch_checkpointing.checkpoint_saver import AsyncCheckpointSaver
    from torch_checkpointing.checkpoint_writer import CheckpointWriterArgs
    from torch_checkpointing.config import DEFAULT_WAIT_TIMEOUT_SECS, AsyncCheckpointSaverConfig
    from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

    config = config or AsyncCheckpointSaverConfig()
    rank_info = rank_info or _get_default_rank_info()
    writer_args = CheckpointWriterArgs(
        config=config.writer_config,
        rank_info=rank_info,
        storage_config=storage_config or LocalFileSystemStorageConfig(),
        pre_finalize_callback=pre_finalize_callback,
        finalize_callback=finalize_callback,
    )
    stager = stager if stager is not None else GraphCheckpointStager()
    try:
        process = CheckpointProcess(
            rank_info=rank_info,
            config=config.process_config,
            subprocess_init_fn=subprocess_init_fn or _default_subprocess_init,
            subprocess_init_args=subprocess_init_args,
            checkpoint_writer_args=writer_args,
        )
    except BaseException:
        stager.close()
        raise
    timeout = config.wait_timeout_secs if config.wait_timeout_secs is not None else DEFAULT_WAIT_TIMEOUT_SECS
    return AsyncCheckpointSaver(
        checkpoint_stager=stager,
        checkpoint_process=process,
        metadata_manager=checkpoint_metadata_manager,
        lock_acquire_timeout=timeout,
    )
