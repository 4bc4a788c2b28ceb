"""NF4 grouped GEMM with the reduction split over programs, for very few rows (decode at a handful of tokens).

Same problem and formats as `impl.ops.kloop` (forward only, ``y[m] = x[m] @ W_e.T``, x ``[S, C]`` sorted by
expert, int32 END ``offsets [E]``, NF4 ``packed [E·R·C/2]`` high nibble first, fp32 ``absmax [E·R·C/64]``, ``code [16]``,
optional LoRA epilogue ``+ s · la[m] @ lb_e``). With one token only top-k experts are active: 8 experts x 24 N tiles
= 192 programs of a K loop for 132 SMs, so K is split over ``SPLIT`` programs; each writes an fp32 partial
``[SPLIT, S, R]`` and a second kernel sums them in a fixed order (deterministic, no atomics) and casts. The dequantized
``[BN, BK]`` tile is the left operand of the dot (swap-AB: ``acc[BN, BM] = W_tile @ x_tile.T``); values are
``code[q] * absmax`` in fp32 rounded once to x's dtype, the arithmetic of `reference.nf4.dequantize_nf4`.

Split-K pays at one token only; the code table is held in registers (``tl.gather``, LUT=1). What was measured
faster or slower, and what limits the kernel: reports/bench/NOTES.md ("NF4 decode kernel"). `grouped_mm` routes NF4
forwards with <= 16 mean rows per expert here (`impl.ops.dispatch.nf4_decode_route`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from impl.ops.formats import FMT_NF4, NF4_BLOCK, GroupedWeight, interpret_mode, next_pow2
from impl.ops.jit_helpers import add_lora, expert_tile
from impl.ops.launches import tracked


@dataclass(frozen=True)
class DecodeConfig:
    """BM rows per tile (>= 16, the smallest tl.dot), BN output features (>= 16), BK reduction columns (multiple of
    64), SPLIT programs over K (0: `default_decode_config` picks)."""

    BM: int = 16
    BN: int = 64
    BK: int = 128
    SPLIT: int = 0
    num_warps: int = 4
    num_stages: int = 1
    LUT: int = 1  # code lookup: 0 = gather from the 16-entry table in memory, 1 = tl.gather from registers


@tracked
@triton.jit
def _nf4_decode_kernel(
    x_ptr, stride_xm, stride_xk,
    packed_ptr, absmax_ptr, code_ptr,
    y_ptr, stride_ym, stride_yn,
    part_ptr, stride_ps, stride_pm, stride_pn,
    offs_ptr,
    la_ptr, stride_lam, stride_lar,
    lb_ptr, stride_lbe, stride_lbr, stride_lbn,
    lora_scale, RANK,
    E, R, C, K_ITERS: tl.constexpr,
    HAS_LORA: tl.constexpr, RANK_P: tl.constexpr, E_P2: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
    LUT: tl.constexpr = 1,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    e, row_start, row_end = expert_tile(offs_ptr, pid_m, E, E_P2, BM)
    if e >= E:
        return

    rm = row_start + tl.arange(0, BM)
    mmask = rm < row_end
    rm64 = rm.to(tl.int64)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < R
    e64 = e.to(tl.int64)
    n64 = rn.to(tl.int64)
    row_byte = e64 * R * (C // 2) + n64 * (C // 2)  # [BN] int64: first byte of each weight row (E*R*C may be >= 2^31)
    row_am = e64 * R * (C // 64) + n64 * (C // 64)
    kb = tl.arange(0, BK // 2)
    ka = tl.arange(0, BK // 64)
    kx = tl.arange(0, BK)
    k_lo = pid_k * (K_ITERS * BK)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for i in range(K_ITERS):
        k0 = k_lo + i * BK
        byte = tl.load(packed_ptr + row_byte[:, None] + (k0 // 2 + kb)[None, :],
                       mask=nmask[:, None] & ((k0 // 2 + kb) < C // 2)[None, :], other=0).to(tl.int32)
        am = tl.load(absmax_ptr + row_am[:, None] + (k0 // 64 + ka)[None, :],
                     mask=nmask[:, None] & ((k0 // 64 + ka) < C // 64)[None, :], other=0.0)
        # not `impl.ops.jit_helpers.nf4_tile`: it interleaves the codes before one lookup on [BN, BK]; here the two
        # half tiles are looked up first, which measured faster (reports/bench/NOTES.md, "NF4 decode kernel")
        if LUT:
            table = tl.broadcast_to(tl.load(code_ptr + tl.arange(0, 16))[None, :], (BN, 16))
            vals = tl.interleave(tl.gather(table, (byte >> 4) & 15, 1), tl.gather(table, byte & 15, 1))
        else:
            vals = tl.interleave(tl.load(code_ptr + ((byte >> 4) & 15)), tl.load(code_ptr + (byte & 15)))  # high first
        NB: tl.constexpr = BK // 64
        if NB == 1:
            w = vals * am
        else:
            w = tl.reshape(tl.reshape(vals, (BN, NB, 64)) * am[:, :, None], (BN, BK))
        xt = tl.load(x_ptr + rm64[None, :] * stride_xm + (k0 + kx)[:, None] * stride_xk,
                     mask=mmask[None, :] & ((k0 + kx) < C)[:, None], other=0.0)  # [BK, BM]
        if DOT_FP32:
            acc += tl.dot(w, xt.to(tl.float32))
        else:
            acc = tl.dot(w.to(xt.dtype), xt, acc)
    out = tl.trans(acc)  # [BM, BN]
    if HAS_LORA:
        if pid_k == 0:
            rr = tl.arange(0, RANK_P)
            rmask = rr < RANK
            la = tl.load(la_ptr + rm64[:, None] * stride_lam + rr[None, :] * stride_lar,
                         mask=mmask[:, None] & rmask[None, :], other=0.0)
            lb = tl.load(lb_ptr + e64 * stride_lbe + rr[:, None] * stride_lbr + rn[None, :] * stride_lbn,
                         mask=rmask[:, None] & nmask[None, :], other=0.0)
            out = add_lora(out, la, lb, lora_scale, DOT_FP32)
    omask = mmask[:, None] & nmask[None, :]
    if SPLIT == 1:
        tl.store(y_ptr + rm64[:, None] * stride_ym + rn[None, :] * stride_yn, out.to(y_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(part_ptr + pid_k * stride_ps + rm64[:, None] * stride_pm + rn[None, :] * stride_pn, out, mask=omask)


@tracked
@triton.jit
def _split_sum_kernel(part_ptr, stride_ps, stride_pm, stride_pn, y_ptr, stride_ym, stride_yn, offs_ptr, E, R,
                      SPLIT: tl.constexpr, BMR: tl.constexpr, BNR: tl.constexpr):
    rm = tl.program_id(0) * BMR + tl.arange(0, BMR)
    rn = tl.program_id(1) * BNR + tl.arange(0, BNR)
    total = tl.load(offs_ptr + E - 1)
    m = (rm < total)[:, None] & (rn < R)[None, :]
    rm64 = rm.to(tl.int64)
    acc = tl.zeros((BMR, BNR), dtype=tl.float32)
    for s in range(SPLIT):  # fixed order: deterministic
        acc += tl.load(part_ptr + s * stride_ps + rm64[:, None] * stride_pm + rn[None, :] * stride_pn, mask=m, other=0.0)
    tl.store(y_ptr + rm64[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=m)


SM_COUNT = 132  # H200; only sets how many programs count as "enough" (4 per SM)


def default_decode_config(rows: int, num_experts: int, R: int, C: int) -> DecodeConfig:
    """SPLIT so that about 4 programs per SM exist when the active (expert, N-tile) pairs alone are too few (SPLIT 1
    otherwise: measured no faster at 16-64 tokens). Without a host sync the M tiles are estimated as
    max(min(E, rows), rows / BM): each active expert has at least one, and there are at least rows / BM."""
    cfg = DecodeConfig()
    programs = max(min(num_experts, rows), triton.cdiv(rows, cfg.BM)) * triton.cdiv(R, cfg.BN)
    k_tiles = triton.cdiv(C, cfg.BK)
    split = 1
    while programs * split < 4 * SM_COUNT and split * 2 <= k_tiles and split < 16:
        split *= 2
    return DecodeConfig(cfg.BM, cfg.BN, cfg.BK, split, cfg.num_warps, cfg.num_stages, cfg.LUT)


def nf4_decode_mm(
    x: torch.Tensor,
    weight: GroupedWeight,
    offsets: torch.Tensor,
    *,
    lora_in: torch.Tensor | None = None,
    lora_out: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
    dot_fp32: bool | None = None,
) -> torch.Tensor:
    """``y [S, R] = x [S, C] @ W_e.T`` per expert (+ LoRA epilogue) for NF4 weights; see the module docstring.

    Same contract as ``impl.ops.dispatch.grouped_mm(..., trans=False)``: offsets int32 [E] END offsets, rows past ``offsets[-1]`` are not
    written; lora_in [S, r], lora_out [E, r, R]."""
    if weight.fmt != FMT_NF4:
        raise ValueError(f"nf4_decode_mm needs an nf4 weight, got {weight.fmt} {weight.shape}")
    E, R, C = weight.shape
    if x.dim() != 2 or x.shape[1] != C:
        raise ValueError(f"x {tuple(x.shape)} does not match weight {weight.shape}: need [S, {C}]")
    if offsets.dtype != torch.int32 or offsets.shape != (E,) or offsets.device != x.device:
        raise ValueError(f"offsets must be int32 [E={E}] on {x.device}, got {offsets.dtype} {tuple(offsets.shape)} "
                         f"on {offsets.device}")
    S = x.shape[0]
    cfg = config or default_decode_config(S, E, R, C)
    if cfg.BK % NF4_BLOCK or cfg.BM < 16 or cfg.BN < 16:
        raise ValueError(f"decode config {cfg}: need BK % 64 == 0, BM >= 16 and BN >= 16")
    if dot_fp32 is None:
        dot_fp32 = interpret_mode()
    if out is None:
        out = torch.empty((S, R), dtype=x.dtype, device=x.device)
    elif out.shape != (S, R):
        raise ValueError(f"out shape {tuple(out.shape)} != {(S, R)}")
    if lora_in is not None:
        if lora_out is None:
            raise ValueError("lora_in given without lora_out")
        r = lora_in.shape[1]
        if lora_in.shape != (S, r) or lora_out.shape != (E, r, R):
            raise ValueError(f"lora_in {tuple(lora_in.shape)} / lora_out {tuple(lora_out.shape)} do not match "
                             f"S={S}, E={E}, R={R}")
        la, lb, rank_p = lora_in, lora_out, max(16, next_pow2(r))
    else:
        r, rank_p = 0, 16
        la, lb = x, x.new_empty((1, 1, 1))
    if S == 0:
        return out
    k_tiles = triton.cdiv(C, cfg.BK)
    split = max(1, min(cfg.SPLIT or 1, k_tiles))
    k_iters = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, k_iters)  # no empty split
    if split > 1:
        part = torch.empty((split, S, R), dtype=torch.float32, device=x.device)
        ps = part.stride()
    else:
        part, ps = out, (0, 0, 0)
    grid = (triton.cdiv(R, cfg.BN), triton.cdiv(S, cfg.BM) + E, split)
    _nf4_decode_kernel[grid](
        x, x.stride(0), x.stride(1),
        weight.data, weight.scale, weight.code,
        out, out.stride(0), out.stride(1),
        part, ps[0], ps[1], ps[2],
        offsets,
        la, la.stride(0), la.stride(1),
        lb, lb.stride(0), lb.stride(1), lb.stride(2),
        float(lora_scale), r,
        E, R, C, K_ITERS=k_iters,
        HAS_LORA=lora_in is not None, RANK_P=rank_p, E_P2=max(16, next_pow2(E)),
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, SPLIT=split, DOT_FP32=dot_fp32, LUT=cfg.LUT,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        BMR, BNR = 16, 128
        _split_sum_kernel[(triton.cdiv(S, BMR), triton.cdiv(R, BNR))](
            part, ps[0], ps[1], ps[2], out, out.stride(0), out.stride(1), offsets, E, R,
            SPLIT=split, BMR=BMR, BNR=BNR, num_warps=4)
    return out
