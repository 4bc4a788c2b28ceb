"""Baselines built from stock parts, measured beside the Triton kernels (same signature as `grouped_linear`).

- bf16: ``torch._grouped_mm`` (CUTLASS on SM90), frozen base (backward returns only dX), LoRA as two extra
  ``torch._grouped_mm`` calls per projection under autograd (what unsloth / transformers do);
- nf4: dequantize ALL experts to bf16 (our Triton `nf4_dequantize`, standing in for bitsandbytes'
  ``dequantize_4bit``, which is not on the device image) before every ``torch._grouped_mm``, again in backward.
"""

from __future__ import annotations

import torch

from impl.ops.formats import FMT_BF16, FMT_NF4, GroupedWeight
from impl.ops.nf4_dequant import nf4_dequantize


def materialize(weight: GroupedWeight) -> torch.Tensor:
    """bf16 ``[E, R, C]`` of a bf16 or NF4 weight (NF4: a fresh dequantization every call)."""
    if weight.fmt == FMT_BF16:
        return weight.data
    if weight.fmt == FMT_NF4:
        return nf4_dequantize(weight.data, weight.scale, weight.code, weight.shape, torch.bfloat16)
    raise ValueError(f"no stock baseline for {weight.fmt!r}")


class _FrozenGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight: GroupedWeight, offsets):
        ctx.weight = weight
        ctx.save_for_backward(offsets)
        return torch._grouped_mm(x, materialize(weight).transpose(-2, -1), offsets)

    @staticmethod
    def backward(ctx, dy):
        (offsets,) = ctx.saved_tensors
        return torch._grouped_mm(dy.contiguous(), materialize(ctx.weight), offsets), None, None


def torch_grouped_linear(x, weight: GroupedWeight, offsets, lora_A=None, lora_B=None, scaling=1.0):
    """Stock ``torch._grouped_mm`` grouped linear; LoRA (stride-E, swapped) as two more grouped GEMMs."""
    y = _FrozenGroupedMM.apply(x, weight, offsets)
    if lora_A is None:
        return y
    E, R, C = weight.shape
    r = lora_A.shape[0] // E
    a_e = lora_A.view(E, r, C).to(x.dtype)
    b_e = lora_B.view(R, r, E).permute(2, 0, 1).to(x.dtype).contiguous()  # [E, R, r]
    xa = torch._grouped_mm(x, a_e.transpose(1, 2), offsets)
    return y + scaling * torch._grouped_mm(xa, b_e.transpose(1, 2), offsets)
