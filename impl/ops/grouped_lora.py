"""Grouped expert linear with a frozen (bf16 / NF4 / FP8) base and a per-expert LoRA fused into the base GEMM.

For expert e, rows ``x_e`` (sorted by expert, ``offsets`` int32 END offsets)::

    y_e = x_e @ W_e.T + s · (x_e @ A_e.T) @ B_e.T        W [E, R, C], A_e [r, C], B_e [R, r]

which is PEFT's fused_linear (swapped-orientation, stride-E) adapter: ``lora_A [r·E, C]``, ``lora_B [R, r·E]``,
``A_e = lora_A[e·r:(e+1)·r]``, ``B_e = lora_B[:, e::E]`` (see `reference.lora`).

Launches (no per-expert Python loop; experts with no rows cost nothing; any rank r, padded in-kernel to >= 16), via
`impl.ops.grouped_gemm.grouped_lora_mm`:

- forward, fused (default): ONE base GEMM; its K loop also accumulates ``xa = x_e @ A_e.T`` ``[S, r]`` from the same x
  tiles (every N tile recomputes it: r/BN extra tensor-core work, no second read of x), rounds it to x's dtype, stores
  it (N tile 0) for dB, and adds the epilogue ``+ s · xa @ B_e.T``;
- backward (frozen base), fused: ONE dX kernel, ``dx = dy @ W_e + s · dyb @ A_e`` with ``dyb = dy_e @ B_e`` ``[S, r]``
  accumulated in its K loop (the base dequantized in the K loop again) and stored for dA; then
  ``dA_e = s · dyb_e.T x_e``, ``dB_e = s · dy_e.T xa_e`` (grouped reductions, `grouped_wgrad`);
- unfused (``lora_fused=False``, env ``MOE_OPS_LORA_FUSED=0``, or by rule where the base launch cannot fuse:
  pre-quantized fp8 activations, nf4 swap-AB tiles; see `grouped_gemm.lora_unfusable_reason`): ``xa`` / ``dyb`` by a
  separate narrow grouped GEMM (a second read of x / dy), then the base GEMM loads it in the epilogue. Same rounding:
  both paths feed the epilogue and the wgrads with xa / dyb rounded to the activation dtype.
"""

from __future__ import annotations

import torch

from impl.ops.grouped_gemm import FMT_BF16, FMT_NF4, GroupedWeight, grouped_lora_mm, grouped_mm, lora_fused_default
from impl.ops.grouped_wgrad import grouped_wgrad
from impl.ops.nf4_dequant import nf4_dequantize

# NF4 policy "auto": above this many rows per expert (on average) the K-loop dequantization is re-done by too many
# M tiles, so the experts are dequantized ONCE into a bf16 scratch buffer (our Triton dequant, ~HBM speed) and the
# bf16 kernel runs with the same fused LoRA epilogue. Measured on an H200 (reports/bench): see docs in bench_moe.py.
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
    @staticmethod
    def forward(ctx, x, a_e, b_e, weight: GroupedWeight, offsets, scaling: float, nf4_policy: str, fused: bool):
        ctx.nf4_policy = nf4_policy
        ctx.fused = fused
        base = _resolve(weight, x, nf4_policy)
        has_lora = a_e is not None
        if has_lora:
            a_c = a_e.to(x.dtype).contiguous()  # [E, r, C]
            b_c = b_e.to(x.dtype).contiguous()  # [E, R, r]
            y, xa = grouped_lora_mm(x, base, offsets, a_c.transpose(1, 2), b_c.transpose(1, 2), scaling,
                                    fused=fused)  # xa [S, r]
            ctx.save_for_backward(x, xa, a_c, b_c, offsets)
            ctx.param_dtypes = (a_e.dtype, b_e.dtype)
        else:
            y = grouped_mm(x, base, offsets)
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
                dx = grouped_mm(dy, _resolve(weight, dy, ctx.nf4_policy), offsets, trans=True)
            return dx, None, None, None, None, None, None, None
        x, xa, a_c, b_c, offsets = ctx.saved_tensors
        s = ctx.scaling
        dx = None
        if ctx.needs_input_grad[0]:
            dx, dyb = grouped_lora_mm(dy, _resolve(weight, dy, ctx.nf4_policy), offsets, b_c, a_c, s, trans=True,
                                      fused=ctx.fused)  # dyb [S, r] = dy @ B_e
        else:
            dyb = grouped_mm(dy, _bf16(b_c), offsets, trans=True)
        da = grouped_wgrad(dyb, x, offsets, scale=s, out_dtype=ctx.param_dtypes[0])  # [E, r, C]
        db = grouped_wgrad(dy, xa, offsets, scale=s, out_dtype=ctx.param_dtypes[1])  # [E, R, r]
        return dx, da, db, None, None, None, None, None


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
    """``y [S, R]`` from ``x [S, C]`` (rows sorted by expert) with an optional PEFT stride-E adapter.

    nf4_policy (NF4 weights only): "fused" = dequantize inside the GEMM's K loop; "dequant" = dequantize all experts
    to a bf16 scratch buffer first (forward and again in backward; nothing is kept); "auto" = fused up to
    NF4_DEQUANT_MIN_ROWS_PER_EXPERT mean rows per expert, dequant above.

    lora_A ``[r·E, C]``, lora_B ``[R, r·E]`` (swapped orientation, the fused_linear layout's semantic one). The base
    weight is frozen: gradients flow to x, lora_A and lora_B only.

    lora_fused: xa / dyb inside the base GEMMs' K loops (True) or by separate launches (False); None = env
    ``MOE_OPS_LORA_FUSED`` ("0" default, "1"), read at this call and kept for its backward.
    """
    E, R, C = weight.shape
    if (lora_A is None) != (lora_B is None):
        raise ValueError("pass both lora_A and lora_B, or neither")
    if lora_A is None:
        return _GroupedLinear.apply(x, None, None, weight, offsets, scaling, nf4_policy, False)
    if lora_A.dim() != 2 or lora_A.shape[0] % E or lora_A.shape[1] != C:
        raise ValueError(f"lora_A must be [r·E, C={C}] with E={E}, got {tuple(lora_A.shape)}")
    r = lora_A.shape[0] // E
    if lora_B.shape != (R, r * E):
        raise ValueError(f"lora_B must be [R={R}, r·E={r * E}], got {tuple(lora_B.shape)}")
    a_e = lora_A.view(E, r, C)
    b_e = lora_B.view(R, r, E).permute(2, 0, 1)  # [E, R, r]: B_e[n, j] = lora_B[n, j·E + e]
    fused = lora_fused_default() if lora_fused is None else bool(lora_fused)
    return _GroupedLinear.apply(x, a_e, b_e, weight, offsets, scaling, nf4_policy, fused)
