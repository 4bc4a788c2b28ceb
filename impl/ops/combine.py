"""Weighted combine of expert outputs back to tokens, as a gather (no atomics), with its autograd.

``y [S, H]`` (rows sorted by expert), ``inv [T·k]`` (sorted row of pair ``p = t·k + j``, the inverse of the stable
sort's ``order``), routing weights ``w [T, k]``::

    out[t] = sum_j w[t, j] · y[inv[t·k + j]]        (fp32 accumulation in slot order j = 0..k-1, then cast)

This is `reference.dispatch.combine` computed without the ``[S, H]`` fp32 intermediate and without ``index_add_``'s
fp32 atomics (which dominate a stock layer at 16k tokens). Backward: ``dy[i] = w_i · dout[token_idx[i]]`` and, when w
needs a gradient, ``dw[t, j] = <dout[t], y[inv[t·k + j]]>``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from impl.ops.launches import tracked


@tracked
@triton.jit
def _combine_kernel(y_ptr, inv_ptr, w_ptr, out_ptr, H, stride_y, stride_o, K: tl.constexpr, BH: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    cols = hb * BH + tl.arange(0, BH)
    m = cols < H
    acc = tl.zeros((BH,), dtype=tl.float32)
    for j in range(K):
        row = tl.load(inv_ptr + t * K + j).to(tl.int64)
        wj = tl.load(w_ptr + t * K + j).to(tl.float32)
        acc += wj * tl.load(y_ptr + row * stride_y + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=m)


def _combine(y: torch.Tensor, inv: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    T, k = w.shape
    H = y.shape[1]
    out = torch.empty((T, H), dtype=y.dtype, device=y.device)
    if T:
        BH = min(1024, triton.next_power_of_2(H))
        _combine_kernel[(T, triton.cdiv(H, BH))](y, inv, w.contiguous(), out, H, y.stride(0), out.stride(0),
                                                 K=k, BH=BH, num_warps=4)
    return out


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, w, inv, token_idx, order):
        ctx.save_for_backward(y, w, inv, token_idx, order)
        return _combine(y.contiguous(), inv, w)

    @staticmethod
    def backward(ctx, dout):
        y, w, inv, token_idx, order = ctx.saved_tensors
        dout = dout.contiguous()
        dy = dw = None
        if ctx.needs_input_grad[0]:
            w_sorted = w.reshape(-1)[order].to(dout.dtype)
            dy = dout[token_idx] * w_sorted[:, None]
        if ctx.needs_input_grad[1]:
            T, k = w.shape
            dw = (dout.float()[:, None, :] * y[inv].float().view(T, k, -1)).sum(-1).to(w.dtype)
        return dy, dw, None, None, None


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """``inv [S]`` with ``inv[order[i]] = i`` (the sorted row of each pair)."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return inv


def combine(
    y: torch.Tensor, w: torch.Tensor, order: torch.Tensor, token_idx: torch.Tensor, inv: torch.Tensor | None = None
) -> torch.Tensor:
    """``[T, H]`` (y's dtype): ``sum_j w[t, j] · y[row of pair (t, j)]``; order = stable sort of the flat pairs."""
    T, k = w.shape
    if y.dim() != 2 or y.shape[0] != T * k or order.shape != (T * k,):
        raise ValueError(f"y {tuple(y.shape)} / w {tuple(w.shape)} / order {tuple(order.shape)}: need S = T·k rows")
    if inv is None:
        inv = inverse_order(order)
    return _Combine.apply(y, w, inv, token_idx, order)
