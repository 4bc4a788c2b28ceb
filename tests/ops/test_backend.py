"""The "triton" experts backend (`impl.ops.backend`) against the "loop" backend (`impl.torch_backend`), CPU interpreter."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("CPU-interpreter tests (TRITON_INTERPRET=1); on a GPU, tests/ops/test_gpu.py runs instead",
                allow_module_level=True)
pytest.importorskip("triton")

from impl.backends import Routing, get_backend  # noqa: E402
from impl.storage import DenseWeight, FP8Weight, NF4Weight  # noqa: E402

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


def _routing(counts: list[int]) -> Routing:
    """Rows already sorted by expert, one slot per token (only the offsets matter to `project`)."""
    S = sum(counts)
    rows = torch.arange(S)
    experts = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return Routing(rows, rows, experts, torch.tensor(counts).cumsum(0).to(torch.int32), rows, 1)


@pytest.mark.parametrize("in_out", [False, True])
def test_triton_backend_matches_loop(in_out):
    counts = [5, 0, 9]
    routing = _routing(counts)
    triton_b, loop_b = get_backend("triton"), get_backend("loop")
    for wt in _weights():
        d_in = wt.shape[1] if in_out else wt.shape[2]
        x = torch.randn(sum(counts), d_in)
        assert triton_b.cannot_run(x, wt, in_out) is None
        y = triton_b.project(x, wt, routing, in_out, torch.float32, None)
        if wt.kind == "fp8":  # the kernel quantizes activations 1x128: compare against that
            from reference import fp8 as rfp8

            xq, xs = rfp8.quantize_act_groups(x, 128)
            x = rfp8.dequantize_fp8(xq, xs, (1, 128), torch.float32)
        ref = loop_b.project(x, wt, routing, in_out, torch.float32, None)
        err = float((y - ref).norm() / ref.norm())
        assert err < 1e-4, (wt.kind, getattr(wt, "double_quant", None), err)
