"""Row-wise FP8 expert GEMM through ``torch._scaled_grouped_mm`` (CUDA SM90/SM100 only), forward only.

Weights ``[E, R, C]`` quantized per output row (``scale_w [E, R]`` = dequant multiplier, one per row of W_e, i.e. per
output column of ``x @ W_e.T``); activations per row (``scale_x [S]``) by a one-pass Triton kernel. The op computes
``out[m, n] = sum_k xq[m, k] wq[e, n, k] * scale_x[m] * scale_w[e, n]``: both scales MULTIPLY (checked against
`reference.fp8.dequantize_fp8` by ``test_fp8_rowwise_scale_direction`` in tests/ops/test_gpu.py). Not differentiable:
the row scales of W lie along the reduction axis of the input gradient, so the frozen-base backward would need a
second, column-wise copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from impl.ops.formats import interpret_mode
from impl.ops.jit_helpers import e4m3_round_emulated
from impl.ops.launches import tracked


@dataclass
class RowwiseFP8Weight:
    """``q`` e4m3fn ``[E, R, C]`` and ``scale`` fp32 ``[E, R]`` (dequant multiplier per row)."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.q.shape)

    def nbytes(self) -> int:
        return self.q.numel() + 4 * self.scale.numel()


def quantize_weight_rowwise(w: torch.Tensor, eps: float = 1e-12) -> RowwiseFP8Weight:
    """Per-row e4m3 quant of ``w [E, R, C]``: ``scale = max(amax_row / 448, eps)``, ``q = e4m3(w / scale)``."""
    if w.dim() != 3:
        raise ValueError(f"w must be [E, R, C], got {tuple(w.shape)}")
    wf = w.float()
    scale = torch.clamp(wf.abs().amax(dim=-1) / 448.0, min=eps)
    q = torch.clamp(wf / scale[..., None], -448.0, 448.0).to(torch.float8_e4m3fn)
    return RowwiseFP8Weight(q, scale)


@tracked
@triton.jit
def _rowwise_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=0), 448.0), 1e-12)  # IEEE division, as the reference
    q = tl.clamp(tl.math.div_rn(x, s), -448.0, 448.0)
    q = e4m3_round_emulated(q, False)  # RNE in fp32 first: Triton's cast rounds twice (via fp16)
    tl.store(q_ptr + row * stride_q + cols, q.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + row, s)


def quantize_act_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q e4m3fn [M, K], scale fp32 [M]) = `reference.fp8.quantize_rowwise` in one pass (CUDA only)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be a row-major [M, K] tensor, got {tuple(x.shape)} strides {x.stride()}")
    if interpret_mode():
        raise RuntimeError("quantize_act_rowwise runs on CUDA only (the interpreter's e4m3 cast is wrong)")
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M:
        _rowwise_quant_kernel[(M,)](x, q, s, K, x.stride(0), q.stride(0), BLOCK=triton.next_power_of_2(K),
                                    num_warps=8)
    return q, s


def fp8_rowwise_grouped_mm(x: torch.Tensor, weight: RowwiseFP8Weight, offsets: torch.Tensor) -> torch.Tensor:
    """``[S, R]`` bf16 = grouped ``x @ W_e.T`` with row-wise FP8 (``torch._scaled_grouped_mm``)."""
    E, R, C = weight.shape
    if x.shape[-1] != C or x.dim() != 2:
        raise ValueError(f"x {tuple(x.shape)} does not match weight [E={E}, R={R}, C={C}]")
    if C % 16 or R % 16:
        raise ValueError(f"_scaled_grouped_mm needs R and C multiples of 16, got R={R}, C={C}")
    xq, xs = quantize_act_rowwise(x)
    return torch._scaled_grouped_mm(xq, weight.q.transpose(-2, -1), xs, weight.scale, offs=offsets,
                                    out_dtype=torch.bfloat16)


def fp8_rowwise_linear(x, weight: RowwiseFP8Weight, offsets, lora_A=None, lora_B=None, scaling=1.0):
    """`impl.ops.moe_layer` linear (forward only, no LoRA): refuses autograd and adapters explicitly."""
    if lora_A is not None or lora_B is not None:
        raise NotImplementedError("fp8_rowwise_linear has no LoRA path")
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("fp8_rowwise_linear is forward-only (torch._scaled_grouped_mm is not differentiable)")
    return fp8_rowwise_grouped_mm(x, weight, offsets)
