"""GPU checks of the NF4 decode kernel (`impl.ops.nf4_decode`) at Qwen3-30B-A3B and GPT-OSS-120B-like expert shapes,
against an fp32 torch loop on the SAME dequantized NF4 values. Run on the lent H200 only (marker ``gpu``).

Bound: relative Frobenius norm 1e-2 (bf16 operands and bf16 output; typical 2-4e-3), as tests/ops/test_gpu.py.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.triton]

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs a CUDA device (and not the interpreter)", allow_module_level=True)

from impl.ops.moe_layer import sort_pairs  # noqa: E402
from impl.ops.nf4_decode import DecodeConfig, nf4_decode_mm  # noqa: E402
from impl.ops.nf4_dequant import nf4_dequantize  # noqa: E402
from impl.ops.quant import quantize_nf4_experts  # noqa: E402

DEV = "cuda"
TOL = 1e-2
SHAPES = {"qwen3_gate_up": (128, 1536, 2048, 8), "qwen3_down": (128, 2048, 768, 8),
          "gpt_oss_gate_up": (128, 5760, 2880, 4)}  # E, R, C, top-k; 2880 = 45 NF4 blocks (not a power of two)


def rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=list(SHAPES))
def case(request):
    E, R, C, k = SHAPES[request.param]
    torch.manual_seed(0)
    gw = quantize_nf4_experts(torch.randn(E, R, C, device=DEV, dtype=torch.bfloat16) * 0.02)
    return gw, nf4_dequantize(gw.data, gw.scale, gw.code, gw.shape, torch.float32), k


@pytest.mark.parametrize("T", [1, 16, 64])
@pytest.mark.parametrize("cfg", [None, DecodeConfig(16, 64, 256, 4), DecodeConfig(32, 128, 128, 1, 8)])
def test_decode_matches_fp32_loop(case, T, cfg):
    gw, wd, k = case
    E, R, C = gw.shape
    g = torch.Generator(device=DEV).manual_seed(T)
    idx = torch.randn(T, E, device=DEV, generator=g).topk(k, -1).indices
    idx[idx == E - 1] = 0  # the last expert gets no rows
    _, _, offs = sort_pairs(idx, E)
    x = torch.randn(T * k, C, device=DEV, dtype=torch.bfloat16)
    r, s = 5, 0.5
    la = torch.randn(T * k, r, device=DEV, dtype=torch.bfloat16)
    lb = torch.randn(E, r, R, device=DEV, dtype=torch.bfloat16) * 0.02
    y = nf4_decode_mm(x, gw, offs, lora_in=la, lora_out=lb, lora_scale=s, config=cfg)
    ref, start = [], 0
    for e, end in enumerate(offs.tolist()):
        ref.append(x[start:end].float() @ wd[e].T + s * la[start:end].float() @ lb[e].float())
        start = end
    assert rel(y, torch.cat(ref)) < TOL
