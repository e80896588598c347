"""Test set-up: Triton's interpreter on the CPU, and the ``cuda`` marker.

``TRITON_INTERPRET=1`` must be set before anything imports triton, so it is set
here at import time, when no GPU is present. On a GPU machine the kernels run
compiled, and the tests marked ``cuda`` run too.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clean_stager_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start with no ``STAGER_*`` variable from the caller's shell."""
    for name in list(os.environ):
        if name.startswith("STAGER_"):
            monkeypatch.delenv(name, raising=False)
