"""tests/ops: without a GPU, run the Triton kernels under the CPU interpreter (must be set before impl.ops imports).

On a GPU machine the interpreter stays off: the CPU-interpreter modules skip themselves and test_gpu.py runs.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
