"""Integrations with the frameworks users train and checkpoint with (torchtitan, torch_checkpointing).

Importing this package imports neither framework; each submodule imports its own (and raises
``ImportError`` naming the package to install when it is absent).
"""

from __future__ import annotations

__all__: list[str] = []
