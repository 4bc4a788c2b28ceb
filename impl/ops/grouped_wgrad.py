"""Grouped reduction over each expert's rows: ``out[e] = scale · P[rows_e].T @ Q[rows_e]`` (weight gradients).

``P [S, a]``, ``Q [S, b]``, ``offsets`` int32 END offsets ``[E]`` -> ``out [E, a, b]``. Experts with no rows get
zeros (every ``out[e]`` is written). Used for the LoRA factor gradients (``a`` or ``b`` = the rank, any value).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from impl.ops.formats import interpret_mode
from impl.ops.launches import tracked


@triton.jit
def _wgrad_step(acc, p_ptr, stride_pm, stride_pa, q_ptr, stride_qm, stride_qb, m0, start, end,
                ra, rb, amask, bmask, BS: tl.constexpr, DOT_FP32: tl.constexpr):
    rm = m0 + tl.arange(0, BS)
    mmask = (rm >= start) & (rm < end)
    rm64 = rm.to(tl.int64)
    pt = tl.load(p_ptr + rm64[None, :] * stride_pm + ra[:, None] * stride_pa,
                 mask=amask[:, None] & mmask[None, :], other=0.0)
    q = tl.load(q_ptr + rm64[:, None] * stride_qm + rb[None, :] * stride_qb,
                mask=mmask[:, None] & bmask[None, :], other=0.0)
    if DOT_FP32:
        acc += tl.dot(pt.to(tl.float32), q.to(tl.float32))
    else:
        acc = tl.dot(pt, q.to(pt.dtype), acc)
    return acc


@tracked
@triton.jit
def _grouped_wgrad_kernel(
    p_ptr, stride_pm, stride_pa,
    q_ptr, stride_qm, stride_qb,
    o_ptr, stride_oe, stride_oa, stride_ob,
    offs_ptr, scale,
    A, B,
    BA: tl.constexpr, BB: tl.constexpr, BS: tl.constexpr, DOT_FP32: tl.constexpr, STATIC_ROWS: tl.constexpr,
):
    pid_a = tl.program_id(0)
    pid_b = tl.program_id(1)
    e = tl.program_id(2)
    end = tl.load(offs_ptr + e)
    start = tl.load(offs_ptr + tl.maximum(e - 1, 0))
    start = tl.where(e > 0, start, 0)
    ra = pid_a * BA + tl.arange(0, BA)
    rb = pid_b * BB + tl.arange(0, BB)
    amask = ra < A
    bmask = rb < B
    acc = tl.zeros((BA, BB), dtype=tl.float32)
    # STATIC_ROWS > 0 (interpreter only: it cannot loop over loaded bounds): scan all rows, masked to [start, end).
    if STATIC_ROWS > 0:
        for m0 in range(0, STATIC_ROWS, BS):
            acc = _wgrad_step(acc, p_ptr, stride_pm, stride_pa, q_ptr, stride_qm, stride_qb, m0, start, end,
                              ra, rb, amask, bmask, BS, DOT_FP32)
    else:
        for m0 in range(start, end, BS):
            acc = _wgrad_step(acc, p_ptr, stride_pm, stride_pa, q_ptr, stride_qm, stride_qb, m0, start, end,
                              ra, rb, amask, bmask, BS, DOT_FP32)
    acc = acc * scale
    tl.store(o_ptr + e.to(tl.int64) * stride_oe + ra[:, None] * stride_oa + rb[None, :] * stride_ob,
             acc.to(o_ptr.dtype.element_ty), mask=amask[:, None] & bmask[None, :])


def grouped_wgrad(
    p: torch.Tensor,
    q: torch.Tensor,
    offsets: torch.Tensor,
    *,
    scale: float = 1.0,
    out_dtype: torch.dtype | None = None,
    dot_fp32: bool | None = None,
) -> torch.Tensor:
    """``out [E, a, b]`` with ``out[e] = scale * P[s_e:t_e].T @ Q[s_e:t_e]``; P [S, a], Q [S, b] (same dtype)."""
    if p.dim() != 2 or q.dim() != 2 or p.shape[0] != q.shape[0]:
        raise ValueError(f"P {tuple(p.shape)} and Q {tuple(q.shape)} must be 2-D with the same number of rows")
    if offsets.dtype != torch.int32 or offsets.dim() != 1:
        raise ValueError(f"offsets must be int32 [E], got {offsets.dtype} {tuple(offsets.shape)}")
    if dot_fp32 is None:
        dot_fp32 = interpret_mode()
    E = offsets.shape[0]
    A, B = p.shape[1], q.shape[1]
    out = torch.empty((E, A, B), dtype=out_dtype or p.dtype, device=p.device)
    if E == 0:
        return out

    def tile(n: int, cap: int) -> int:
        return max(16, min(cap, triton.next_power_of_2(n)))

    BA, BB = tile(A, 128), tile(B, 128)
    BS = 64 if dot_fp32 else 64
    grid = (triton.cdiv(A, BA), triton.cdiv(B, BB), E)
    _grouped_wgrad_kernel[grid](
        p, p.stride(0), p.stride(1),
        q, q.stride(0), q.stride(1),
        out, out.stride(0), out.stride(1), out.stride(2),
        offsets, float(scale),
        A, B, BA=BA, BB=BB, BS=BS, DOT_FP32=dot_fp32, STATIC_ROWS=p.shape[0] if interpret_mode() else 0,
        num_warps=4, num_stages=3,
    )
    return out
