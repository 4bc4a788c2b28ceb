"""Grouped expert linear with a frozen (bf16 / NF4 / FP8) base and a per-expert LoRA, as one autograd function.

For expert e, rows ``x_e`` (sorted by expert, ``offsets`` int32 END offsets)::

    y_e = base_e(x_e) + s · (x_e @ D_e) @ U_e        D [E, K, r] (LoRA down), U [E, r, N] (LoRA up)

with ``base_e(x) = x @ W_e.T`` for W ``[E, N, K]`` (F.linear layout, ``trans=False``) or ``x @ W_e`` for W
``[E, K, N]`` (``trans=True``, GPT-OSS). `grouped_lora_linear` takes D and U; `grouped_linear` takes PEFT's factors
of the fused_linear layout (swapped orientation, stride-E: ``lora_A [r·E, C]``, ``lora_B [R, r·E]``,
``D_e = A_e.T = lora_A[e·r:(e+1)·r].T``, ``U_e = B_e.T = lora_B[:, e::E].T``, see `reference.lora`).

Launches (no per-expert Python loop; experts with no rows cost nothing; any rank r, padded in-kernel to >= 16), via
`impl.ops.dispatch.grouped_lora_mm`:

- forward: the base GEMM with the LoRA epilogue ``+ s · xa @ U_e``; ``xa = x_e @ D_e`` ``[S, r]`` (rounded to x's
  dtype, kept for dU) by a separate narrow grouped GEMM (unfused, the default) or inside the base K loop (fused,
  ``MOE_OPS_LORA_FUSED=1``); the unfused path is also taken by rule where the base launch cannot fuse (pre-quantized
  fp8 activations, nf4 swap-AB tiles, the NF4 decode kernel; `impl.ops.dispatch.lora_path`);
- backward (frozen base): ONE dX GEMM ``dx = base_eᵀ(dy) + s · dyb @ D_eᵀ`` with ``dyb = dy_e @ U_eᵀ`` ``[S, r]`` (the
  base dequantized in the K loop again), then ``dD_e = s · x_eᵀ dyb_e``, ``dU_e = s · xa_eᵀ dy_e`` (grouped
  reductions, `impl.ops.grouped_wgrad`). Nothing dense of the base weight is saved for backward.
"""

from __future__ import annotations

import torch

from impl.ops.dispatch import grouped_lora_mm, grouped_mm, lora_fused_default
from impl.ops.formats import FMT_BF16, FMT_NF4, GroupedWeight
from impl.ops.grouped_wgrad import grouped_wgrad
from impl.ops.nf4_dequant import nf4_dequantize

# NF4 policy "auto": above this many rows per expert (on average) the K-loop dequantization is re-done by too many
# M tiles, so the experts are dequantized ONCE into a bf16 scratch buffer (our Triton dequant, ~HBM speed) and the
# bf16 kernel runs with the same fused LoRA epilogue. Measured on an H200 (reports/bench/NOTES.md).
NF4_DEQUANT_MIN_ROWS_PER_EXPERT = 128
NF4_POLICIES = ("auto", "fused", "dequant")


def _resolve(weight: GroupedWeight, x: torch.Tensor, policy: str) -> GroupedWeight:
    """The weight the kernel runs on: NF4 itself (K-loop dequant) or a fresh dequantization of it in x's dtype."""
    rows = x.shape[0]
    if policy not in NF4_POLICIES:
        raise ValueError(f"nf4_policy must be one of {NF4_POLICIES}, got {policy!r}")
    if weight.fmt != FMT_NF4 or policy == "fused":
        return weight
    if policy == "auto" and rows / weight.num_experts <= NF4_DEQUANT_MIN_ROWS_PER_EXPERT:
        return weight
    w = nf4_dequantize(weight.data, weight.scale, weight.code, weight.shape, x.dtype)
    return GroupedWeight(FMT_BF16, weight.shape, w)


def _bf16(t: torch.Tensor) -> GroupedWeight:
    return GroupedWeight(FMT_BF16, tuple(t.shape), t)


class _GroupedLinear(torch.autograd.Function):
    """a_e = D_eᵀ ``[E, r, K]``, b_e = U_eᵀ ``[E, N, r]`` (None: no LoRA); trans as `grouped_lora_linear`."""

    @staticmethod
    def forward(ctx, x, a_e, b_e, weight: GroupedWeight, offsets, scaling: float, nf4_policy: str, fused: bool,
                trans: bool):  # fmt: skip
        ctx.nf4_policy = nf4_policy
        ctx.fused = fused
        ctx.trans = trans
        base = _resolve(weight, x, nf4_policy)
        has_lora = a_e is not None
        if has_lora:
            a_c = a_e.to(x.dtype).contiguous()  # [E, r, K]
            b_c = b_e.to(x.dtype).contiguous()  # [E, N, r]
            y, xa = grouped_lora_mm(x, base, offsets, a_c.transpose(1, 2), b_c.transpose(1, 2), scaling,
                                    trans=trans, fused=fused)  # xa [S, r]
            ctx.save_for_backward(x, xa, a_c, b_c, offsets)
            ctx.param_dtypes = (a_e.dtype, b_e.dtype)
        else:
            y = grouped_mm(x, base, offsets, trans=trans)
            ctx.save_for_backward(offsets)
        ctx.weight = weight
        ctx.scaling = scaling
        ctx.has_lora = has_lora
        return y

    @staticmethod
    def backward(ctx, dy):
        dy = dy.contiguous()
        weight = ctx.weight
        if not ctx.has_lora:
            (offsets,) = ctx.saved_tensors
            dx = None
            if ctx.needs_input_grad[0]:
                dx = grouped_mm(dy, _resolve(weight, dy, ctx.nf4_policy), offsets, trans=not ctx.trans)
            return dx, None, None, None, None, None, None, None, None
        x, xa, a_c, b_c, offsets = ctx.saved_tensors
        s = ctx.scaling
        dx = None
        if ctx.needs_input_grad[0]:
            dx, dyb = grouped_lora_mm(dy, _resolve(weight, dy, ctx.nf4_policy), offsets, b_c, a_c, s,
                                      trans=not ctx.trans, fused=ctx.fused)  # dyb [S, r] = dy @ U_eᵀ
        else:
            dyb = grouped_mm(dy, _bf16(b_c), offsets, trans=True)
        da = grouped_wgrad(dyb, x, offsets, scale=s, out_dtype=ctx.param_dtypes[0])  # [E, r, K]
        db = grouped_wgrad(dy, xa, offsets, scale=s, out_dtype=ctx.param_dtypes[1])  # [E, N, r]
        return dx, da, db, None, None, None, None, None, None


def grouped_lora_linear(
    x: torch.Tensor,
    weight: GroupedWeight,
    offsets: torch.Tensor,
    down: torch.Tensor | None = None,
    up: torch.Tensor | None = None,
    scaling: float = 1.0,
    *,
    trans: bool = False,
    nf4_policy: str = "auto",
    lora_fused: bool | None = None,
) -> torch.Tensor:
    """``y [S, N]`` from ``x [S, K]`` (rows sorted by expert): ``base(x) + s · (x @ D_e) @ U_e`` (module docstring).

    weight ``[E, N, K]`` (``trans=False``) or ``[E, K, N]`` (``trans=True``); down D ``[E, K, r]``, up U ``[E, r, N]``
    (any strides, e.g. views of PEFT's factors), or neither. The base is frozen: gradients flow to x, D and U only.

    nf4_policy (NF4 weights only): "fused" = dequantize inside the GEMM's K loop; "dequant" = dequantize all experts
    to a bf16 scratch buffer first (forward and again in backward; nothing is kept); "auto" = fused up to
    NF4_DEQUANT_MIN_ROWS_PER_EXPERT mean rows per expert, dequant above.

    lora_fused: xa / dyb inside the base GEMMs' K loops (True) or by separate launches (False); None = env
    ``MOE_OPS_LORA_FUSED`` ("0" default, "1"), read at this call and kept for its backward.
    """
    E = weight.shape[0]
    K, N = (weight.shape[1], weight.shape[2]) if trans else (weight.shape[2], weight.shape[1])
    if (down is None) != (up is None):
        raise ValueError("pass both LoRA factors (down and up), or neither")
    if down is None:
        return _GroupedLinear.apply(x, None, None, weight, offsets, scaling, nf4_policy, False, trans)
    r = down.shape[-1]
    if down.shape != (E, K, r) or up.shape != (E, r, N):
        raise ValueError(f"LoRA down {tuple(down.shape)} / up {tuple(up.shape)} do not match weight {weight.shape} "
                         f"(trans={trans}): need [E={E}, K={K}, r] and [E, r, N={N}]")
    fused = lora_fused_default() if lora_fused is None else bool(lora_fused)
    return _GroupedLinear.apply(x, down.transpose(1, 2), up.transpose(1, 2), weight, offsets, scaling, nf4_policy,
                                fused, trans)


def grouped_linear(
    x: torch.Tensor,
    weight: GroupedWeight,
    offsets: torch.Tensor,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    scaling: float = 1.0,
    nf4_policy: str = "auto",
    lora_fused: bool | None = None,
) -> torch.Tensor:
    """`grouped_lora_linear` of F.linear-layout W ``[E, R, C]`` with PEFT's fused_linear factors (stride-E,
    swapped orientation): lora_A ``[r·E, C]``, lora_B ``[R, r·E]``. ``y [S, R]`` from ``x [S, C]``."""
    E, R, C = weight.shape
    if (lora_A is None) != (lora_B is None):
        raise ValueError("pass both lora_A and lora_B, or neither")
    if lora_A is None:
        return grouped_lora_linear(x, weight, offsets, nf4_policy=nf4_policy)
    if lora_A.dim() != 2 or lora_A.shape[0] % E or lora_A.shape[1] != C:
        raise ValueError(f"lora_A must be [r·E, C={C}] with E={E}, got {tuple(lora_A.shape)}")
    r = lora_A.shape[0] // E
    if lora_B.shape != (R, r * E):
        raise ValueError(f"lora_B must be [R={R}, r·E={r * E}], got {tuple(lora_B.shape)}")
    a_e = lora_A.view(E, r, C)
    b_e = lora_B.view(R, r, E).permute(2, 0, 1)  # [E, R, r]: B_e[n, j] = lora_B[n, j·E + e]
    return grouped_lora_linear(x, weight, offsets, a_e.transpose(1, 2), b_e.transpose(1, 2), scaling,
                               nf4_policy=nf4_policy, lora_fused=lora_fused)
