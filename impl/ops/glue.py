"""Layer glue around the expert GEMMs, without atomics and without fp32 intermediates in memory.

- `gather_rows(x [T, H], token_idx [S], inv [T·k], k)` -> ``x[token_idx]`` ``[S, H]``; its backward sums the k
  sorted rows of each token with the same gather kernel as `impl.ops.combine` (weights 1), instead of
  ``index_put_(accumulate=True)``.
- `silu_mul(h [S, 2I])` -> ``silu(h[:, :I]) * h[:, I:]`` ``[S, I]`` in one pass (fp32 math, output in h's dtype), and
  its backward in one pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from impl.ops.combine import _combine
from impl.ops.launches import tracked


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token_idx, inv, k):
        ctx.save_for_backward(inv)
        ctx.k = k
        return x[token_idx]

    @staticmethod
    def backward(ctx, dxs):
        (inv,) = ctx.saved_tensors
        T = inv.numel() // ctx.k
        ones = torch.ones((T, ctx.k), dtype=torch.float32, device=dxs.device)
        return _combine(dxs.contiguous(), inv, ones), None, None, None


def gather_rows(x: torch.Tensor, token_idx: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
    """``x[token_idx]`` with an atomic-free backward; inv = inverse permutation of the stable sort (pair -> row)."""
    if token_idx.shape != inv.shape or inv.numel() != x.shape[0] * k:
        raise ValueError(f"token_idx {tuple(token_idx.shape)} / inv {tuple(inv.shape)} do not match x "
                         f"{tuple(x.shape)} with k={k}")
    return _GatherRows.apply(x, token_idx, inv, k)


@tracked
@triton.jit
def _silu_mul_fwd(h_ptr, o_ptr, S, I, stride_h, stride_o, BS: tl.constexpr, BI: tl.constexpr):
    rs = tl.program_id(0) * BS + tl.arange(0, BS)
    ri = tl.program_id(1) * BI + tl.arange(0, BI)
    m = (rs < S)[:, None] & (ri < I)[None, :]
    rs64 = rs.to(tl.int64)
    g = tl.load(h_ptr + rs64[:, None] * stride_h + ri[None, :], mask=m, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + rs64[:, None] * stride_h + I + ri[None, :], mask=m, other=0.0).to(tl.float32)
    a = g * tl.sigmoid(g) * u
    tl.store(o_ptr + rs64[:, None] * stride_o + ri[None, :], a.to(o_ptr.dtype.element_ty), mask=m)


@tracked
@triton.jit
def _silu_mul_bwd(h_ptr, d_ptr, dh_ptr, S, I, stride_h, stride_d, stride_dh, BS: tl.constexpr, BI: tl.constexpr):
    rs = tl.program_id(0) * BS + tl.arange(0, BS)
    ri = tl.program_id(1) * BI + tl.arange(0, BI)
    m = (rs < S)[:, None] & (ri < I)[None, :]
    rs64 = rs.to(tl.int64)
    g = tl.load(h_ptr + rs64[:, None] * stride_h + ri[None, :], mask=m, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + rs64[:, None] * stride_h + I + ri[None, :], mask=m, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + rs64[:, None] * stride_d + ri[None, :], mask=m, other=0.0).to(tl.float32)
    sg = tl.sigmoid(g)
    dg = d * u * sg * (1.0 + g * (1.0 - sg))
    du = d * g * sg
    tl.store(dh_ptr + rs64[:, None] * stride_dh + ri[None, :], dg.to(dh_ptr.dtype.element_ty), mask=m)
    tl.store(dh_ptr + rs64[:, None] * stride_dh + I + ri[None, :], du.to(dh_ptr.dtype.element_ty), mask=m)


def _grid(S: int, I: int) -> tuple[int, int]:
    return triton.cdiv(S, 32), triton.cdiv(I, 128)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        h = h.contiguous()
        S, two_i = h.shape
        I = two_i // 2
        out = torch.empty((S, I), dtype=h.dtype, device=h.device)
        if S:
            _silu_mul_fwd[_grid(S, I)](h, out, S, I, h.stride(0), out.stride(0), BS=32, BI=128, num_warps=4)
        ctx.save_for_backward(h)
        return out

    @staticmethod
    def backward(ctx, d):
        (h,) = ctx.saved_tensors
        d = d.contiguous()
        S, two_i = h.shape
        I = two_i // 2
        dh = torch.empty_like(h)
        if S:
            _silu_mul_bwd[_grid(S, I)](h, d, dh, S, I, h.stride(0), d.stride(0), dh.stride(0), BS=32, BI=128,
                                       num_warps=4)
        return dh


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """``silu(h[:, :I]) * h[:, I:]`` for ``h [S, 2I]`` (gate columns first, the fused_linear layout)."""
    if h.dim() != 2 or h.shape[1] % 2:
        raise ValueError(f"silu_mul needs h [S, 2I], got {tuple(h.shape)}")
    return _SiluMul.apply(h)
