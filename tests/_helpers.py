"""Helpers shared by the tests: random tensors of every bit pattern, and bit-exact comparison."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from stager.kernels import kernel_backend

ALL_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
    torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
    torch.float8_e4m3fn, torch.float8_e5m2,
]


def random_tensor(
    shape: tuple[int, ...], dtype: torch.dtype, seed: int | torch.Generator = 0
) -> torch.Tensor:
    """Random bytes reinterpreted as ``dtype`` (every bit pattern, NaNs included)."""
    g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=g)
    if dtype is torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as bytes (bit-exact comparison for every dtype, NaNs included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(want: Any, got: Any, path: str = "") -> None:
    """Same structure; tensors on the CPU with the same dtype, shape, stride and bytes.

    DTensors must keep their mesh, placements, global shape and stride around a staged local.
    """
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if dtensor is not None and isinstance(want, dtensor):
        assert type(got) is dtensor, path
        assert got.device_mesh == want.device_mesh and got.placements == want.placements, path
        assert got.shape == want.shape and got.stride() == want.stride(), path
        assert_same(want._local_tensor, got._local_tensor, path)
        return
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), path
        assert got.device.type == "cpu", path
        assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride(), path
        assert torch.equal(as_bytes(got), as_bytes(want)), path
        assert not got.requires_grad, path
        return
    assert type(got) is type(want), f"{path}: {type(got)} vs {type(want)}"
    if isinstance(want, dict):
        assert list(got) == list(want), path
        for k in want:
            assert_same(want[k], got[k], f"{path}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(want, got)):
            assert_same(a, b, f"{path}[{i}]")
    else:
        assert got == want, path


# The kernels run on CPU tensors only under Triton's interpreter, which conftest turns on only
# where there is no GPU: on a GPU machine the "cpu" cases are skipped, the "cuda" ones run.
KERNEL_ON_CPU = kernel_backend("cpu") == "triton-interpreter"

KERNEL_DEVICES = [
    pytest.param(
        "cpu",
        id="cpu",
        marks=pytest.mark.skipif(not KERNEL_ON_CPU, reason="TRITON_INTERPRET is off (a GPU is present)"),
    ),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]
"""The devices a kernel test runs on: the CPU under the interpreter, a GPU where present."""

POISON = 0xA5
"""The byte outputs are filled with before a kernel runs (checked outside every region after)."""
