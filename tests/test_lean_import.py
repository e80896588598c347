"""``import stager`` initialises no CUDA context, loads no NVML library and imports no Triton.

(``import torch`` itself imports the ``pynvml`` module when it is installed, but does not load the
NVML library; what must not happen is the library being loaded, i.e. ``nvmlInit``.)
"""

from __future__ import annotations

import json
import subprocess
import sys


def test_import_is_lean() -> None:
    code = (
        "import json, sys, torch, stager\n"
        "print(json.dumps({'triton': 'triton' in sys.modules,"
        " 'nvml_loaded': getattr(sys.modules.get('pynvml'), 'nvmlLib', None) is not None,"
        " 'cuda_initialized': torch.cuda.is_initialized(),"
        " 'kernels': 'stager.kernels.pack' in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == {"triton": False, "nvml_loaded": False, "cuda_initialized": False, "kernels": False}
