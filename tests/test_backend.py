"""Backend selection: ``use_triton=True`` where the kernel cannot run, and the reference fallback
when Triton cannot be imported (``import stager`` itself imports no Triton)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from stager.kernels import pack_gather, table_from_triples

ADDR = 0x7000_0000  # synthetic: the table is rejected before any byte is read


def test_use_triton_true_fails_where_the_kernel_cannot_run() -> None:
    table = table_from_triples([(ADDR, 0, 4)])
    with pytest.raises(RuntimeError, match="use_triton=True but the Triton kernel cannot run"):
        pack_gather(table, torch.zeros(8, dtype=torch.uint8, device="meta"), use_triton=True)

def test_lean_import_and_reference_fallback_without_triton() -> None:
    script = textwrap.dedent(
        """
        import json, sys
        import stager, stager.kernels
        lean = "triton" not in sys.modules
        sys.modules["triton"] = None  # from here on, importing triton fails
        import torch
        from stager.kernels import kernel_backend, pack_gather, table_from_tensors, triton_available
        x = torch.arange(40, dtype=torch.uint8)
        out = torch.zeros(51, dtype=torch.uint8)
        pack_gather(table_from_tensors([x[1:], x[:3]]), out)
        sys.stdout.write(json.dumps({
            "lean": lean,
            "available": triton_available(),
            "backend": kernel_backend("cpu"),
            "out": out.tolist(),
        }))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["lean"] is True
    assert result["available"] is False
    assert result["backend"] == "reference"
    assert result["out"] == list(range(1, 40)) + [0] * 9 + [0, 1, 2]
