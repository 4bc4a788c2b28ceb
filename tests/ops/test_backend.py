"""The "triton" experts backend (`impl.ops.backend`) against the "loop" backend of `impl.forward` (CPU interpreter)."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU-interpreter tests (TRITON_INTERPRET=1); on a GPU, tests/ops/test_gpu.py runs instead",
                allow_module_level=True)
pytest.importorskip("triton")

from impl.forward import BACKENDS  # noqa: E402
from impl.ops import backend  # noqa: E402, F401  (registers "triton")
from impl.quant_experts import DenseWeight, FP8Weight, NF4Weight  # noqa: E402

pytestmark = [pytest.mark.triton]


def _weights():
    torch.manual_seed(0)
    w = torch.randn(3, 64, 128) * 0.05
    out = [DenseWeight(w), FP8Weight.quantize(w)]
    try:
        out += [NF4Weight(w, 64, False), NF4Weight(w, 64, True)]
    except ImportError:  # bitsandbytes absent: only dense / fp8 here
        pass
    return out


@pytest.mark.parametrize("in_out", [False, True])
def test_triton_backend_matches_loop(in_out):
    counts = [5, 0, 9]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    for wt in _weights():
        d_in = wt.shape[1] if in_out else wt.shape[2]
        x = torch.randn(sum(counts), d_in)
        assert BACKENDS["triton"].supports(x, wt, in_out)
        y = BACKENDS["triton"].linear(x, wt, offs, counts, in_out, torch.float32)
        if wt.kind == "fp8":  # the kernel quantizes activations 1x128: compare against that
            from reference import fp8 as rfp8

            xq, xs = rfp8.quantize_act_groups(x, 128)
            x = rfp8.dequantize_fp8(xq, xs, (1, 128), torch.float32)
        ref = BACKENDS["loop"].linear(x, wt, offs, counts, in_out, torch.float32)
        err = float((y - ref).norm() / ref.norm())
        assert err < 1e-4, (wt.kind, getattr(wt, "double_quant", None), err)
