"""impl.ops.quant (device-side quantizers for the kernels) is bit-identical to reference/ on random weights."""

from __future__ import annotations

import torch

from impl.ops.quant import quantize_fp8_block_experts, quantize_nf4_experts
from reference import fp8 as rfp8
from reference import nf4 as rnf4


def test_nf4_experts_bitwise():
    torch.manual_seed(0)
    w = torch.randn(5, 24, 128, dtype=torch.bfloat16)
    gw = quantize_nf4_experts(w, chunk=2)
    packed, st = rnf4.quantize_nf4(w, 64)
    assert torch.equal(gw.data, packed.reshape(-1))
    assert torch.equal(gw.scale, st.absmax)


def test_fp8_block_experts_bitwise():
    torch.manual_seed(1)
    w = torch.randn(3, 200, 136)
    gw = quantize_fp8_block_experts(w, chunk=2)
    q, s = rfp8.quantize_fp8_block(w, (128, 128))
    assert torch.equal(gw.data.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(gw.scale, s)
