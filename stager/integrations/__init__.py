"""Integrations with the frameworks users train and checkpoint with.

* :mod:`stager.integrations.torchtitan`: ``StagerCheckpointManager``, a torchtitan
  ``CheckpointManager`` whose asynchronous saves stage through a :class:`~stager.GraphStager`.
* :mod:`stager.integrations.torch_checkpointing`: ``GraphCheckpointStager``, a
  torch_checkpointing ``CheckpointStager`` over a :class:`~stager.GraphStager`.

Importing this package imports neither framework; each submodule imports its own (and raises
``ImportError`` naming the package to install when it is absent).
"""

from __future__ import annotations

__all__: list[str] = []
