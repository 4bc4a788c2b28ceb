"""Device-side weight quantizers used to build the Triton kernels' inputs (chunked over experts, no host loops over
elements). Bit-identical to `reference.nf4.quantize_nf4` / `reference.fp8.quantize_fp8_block` (tests/ops/test_quant.py);
the reference keeps its code tables on the CPU, so it cannot quantize CUDA tensors itself.
"""

from __future__ import annotations

import torch

from impl.ops.formats import FMT_FP8, FMT_NF4, GroupedWeight
from reference import fp8 as rfp8
from reference import nf4 as rnf4


def _nf4_chunk(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = w.reshape(-1, 64).to(torch.float32)
    absmax = flat.abs().amax(dim=1)
    scaled = torch.clamp(flat * (1.0 / absmax.clamp(min=rnf4.ABSMAX_FLOOR))[:, None], -1, 1)
    code = rnf4.NF4_CODE.to(w.device)
    q = torch.bucketize(scaled.reshape(-1), (code[:-1] + code[1:]) / 2, right=False).to(torch.uint8)
    return (q[0::2] << 4) | q[1::2], absmax


def quantize_nf4_experts(w: torch.Tensor, chunk: int = 8) -> GroupedWeight:
    """NF4 (blocksize 64, fp32 absmax, bnb nibble order) of ``w [E, R, C]`` (``C % 64 == 0``), ``chunk`` experts at a
    time. Quantizing expert slices is the same as quantizing the flattened tensor: every block lies in one expert."""
    E, R, C = w.shape
    if C % 64:
        raise ValueError(f"quantize_nf4_experts: C={C} of {tuple(w.shape)} must be a multiple of 64")
    packed, absmax = [], []
    for e0 in range(0, E, chunk):
        p, a = _nf4_chunk(w[e0:e0 + chunk])
        packed.append(p)
        absmax.append(a)
    return GroupedWeight(FMT_NF4, (E, R, C), torch.cat(packed), torch.cat(absmax), rnf4.NF4_CODE.to(w.device))


def quantize_fp8_block_experts(w: torch.Tensor, chunk: int = 8) -> GroupedWeight:
    """128x128 block e4m3 of ``w [E, R, C]`` via `reference.fp8.quantize_fp8_block`, ``chunk`` experts at a time."""
    E, R, C = w.shape
    qs, ss = [], []
    for e0 in range(0, E, chunk):
        q, s = rfp8.quantize_fp8_block(w[e0:e0 + chunk], (128, 128))
        qs.append(q)
        ss.append(s)
    return GroupedWeight(FMT_FP8, (E, R, C), torch.cat(qs), torch.cat(ss))
