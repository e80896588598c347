"""Test set-up: Triton's interpreter on the CPU, the ``cuda`` marker, and the ``staging_path``
fixture that runs a test once per staging path.

``TRITON_INTERPRET=1`` must be set before anything imports triton, so it is set
here at import time, when no GPU is present. On a GPU machine the kernels run
compiled, and the tests marked ``cuda`` run too.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pytest
import torch

if TYPE_CHECKING:
    from _staging import StagingPath

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


def _path_params() -> list[Any]:
    """Every staging path that exists: CPU cached/fresh; on the fake device packed/direct x
    (cached and captured then replayed, cached and eager, fresh: always eager)."""
    params = [pytest.param(("cpu", True), id="cpu-cached"), pytest.param(("cpu", False), id="cpu-fresh")]
    for packed in (True, False):
        p = "packed" if packed else "direct"
        params += [
            pytest.param(("fake-cuda", True, packed, True), id=f"fake-cuda-{p}-cached-graph"),
            pytest.param(("fake-cuda", True, packed, False), id=f"fake-cuda-{p}-cached-eager"),
            pytest.param(("fake-cuda", False, packed, False), id=f"fake-cuda-{p}-fresh-eager"),
        ]
    return params


@pytest.fixture(params=_path_params())
def staging_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> StagingPath:
    """A :class:`_staging.StagingPath` (the fake device installed where it needs one): its
    ``stager()`` makes a ``GraphStager`` that takes that path, ``assert_taken(stats, reused=...)``
    checks that it did."""
    from _staging import StagingPath

    path = StagingPath(*request.param)
    path.install(monkeypatch)
    return path
