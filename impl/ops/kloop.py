"""The K-loop grouped GEMM kernel: rows sorted by expert, the weight dequantized inside the reduction loop.

Problem (``offsets`` = int32 cumulative END offsets ``[E]``, as `reference.dispatch`)::

    not trans:  y[m, :] = x[m, :] @ W_e.T      x [S, C] -> y [S, R]     (forward of F.linear-layout W [E, R, C])
    trans:      y[m, :] = x[m, :] @ W_e        x [S, R] -> y [S, C]     (input gradient of the same layer)

for ``offsets[e-1] <= m < offsets[e]``, plus an optional LoRA epilogue ``y[m, :] += lora_scale * la[m, :] @ lb_e``
with ``la [S, r]`` and ``lb [E, r, out]``, where ``la`` is either

- given (``lora_in``; the unfused path: a separate narrow launch computed it, reading x a second time), or
- computed in the same K loop (``lora_down`` D ``[E, K, r]``): ``la = x @ D_e`` accumulated in fp32 from the x tiles
  the base product already loaded (the rank padded to RANK_P >= 16 with masks), rounded to x's dtype before the
  epilogue (what the unfused path stores and loads) and stored to ``lora_mid`` by the N-tile-0 programs. Each N tile
  recomputes it: r/BN extra tensor-core work (6 % at BN = 256) instead of a second read of x. Not for nf4 swap-AB
  tiles nor pre-quantized fp8 x (`lora_unfusable_reason`). Which path runs is decided in `impl.ops.dispatch`.

Weight formats: `impl.ops.formats` (bf16, nf4 with K-loop dequantization, fp8_block with in-kernel 1x128 activation
quantization or a separate pre-quantization pass, `uses_act_prequant`).

The tile schedule is built inside the kernel from ``offsets`` (no host sync): program ``(pid_n, pid_m)`` finds its expert
by a prefix sum over ``ceil(count_e / BM)``; programs past the last tile exit at once. Experts with no rows get no
tiles. Rows past ``offsets[-1]`` are not written. Tile sizes: `default_config`.

Under ``TRITON_INTERPRET=1`` (CPU) pass ``dot_fp32=True``: the interpreter's bf16/fp8 ``tl.dot`` is unreliable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from impl.ops.formats import FMT_FP8, FMT_ID, FMT_NF4, FP8_BLOCK, NF4_BLOCK, GroupedWeight, interpret_mode, next_pow2
from impl.ops.jit_helpers import add_lora, e4m3_round_emulated, expert_tile, nf4_tile, nf4_tile_kmajor
from impl.ops.launches import tracked


@dataclass(frozen=True)
class TileConfig:
    """Block sizes of one launch. BK is the reduction tile; nf4 needs its contiguous-axis tile >= 64 and a multiple
    of 64 (BK when not trans, BN when trans); fp8 needs BK == 128.

    nf4_mode (forward only; the input-gradient path has one form): 0 = dequantize [BN, BK] and transpose in registers;
    1 = build the [BK, BN] tile from [BK/2, BN] bytes (join + permute, no transpose); 2 = swap-AB (the dequantized
    [BN, BK] tile is the left operand, the output tile is computed transposed: weight streaming for decode).
    """

    BM: int
    BN: int
    BK: int
    num_warps: int = 4
    num_stages: int = 3
    nf4_mode: int = 1
    nf4_select: int = 2  # NF4 values: 0 = gather from the code table in memory, 1 = select tree, 2 = tl.gather from a
    # register copy of the table (measured fastest: reports/bench/NOTES.md, "Tile choices")



@triton.jit
def _k_loop(acc, xa, x_ptr, stride_xm, stride_xk, xs_ptr, stride_xsm, stride_xsk,
            w_ptr, stride_we, stride_wr, stride_wc,
            s_ptr, stride_se, stride_sr, stride_sc, code_ptr, e64, rm64, mmask, rn, nmask, pid_n,
            ld_ptr, stride_lde, stride_ldk, stride_ldr, rr, rmask,
            R, C, KRED, K_END,
            WFMT: tl.constexpr, TRANS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_FP32: tl.constexpr,
            NF4_MODE: tl.constexpr, X_FP8: tl.constexpr, SELECT: tl.constexpr, LORA_FUSED: tl.constexpr):
    """The reduction loop over [0, K_END) (K_END == KRED; a Python int under the interpreter). Returns (acc, xa).

    acc is [BM, BN], except for NF4_MODE == 2 (swap-AB, not trans): acc is [BN, BM] = W_tile @ x_tile.T.
    LORA_FUSED: also ``xa [BM, RANK_P] += x_tile @ D_e[k-tile, :]`` from the same x tile (D = ld, element (k, j) of
    expert e at ``e*stride_lde + k*stride_ldk + j*stride_ldr``); not for swap-AB or pre-quantized fp8 x."""
    for k0 in range(0, K_END, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rk < KRED
        if WFMT == 1 and NF4_MODE == 2 and not TRANS:
            at = tl.load(x_ptr + rm64[None, :] * stride_xm + rk[:, None] * stride_xk,
                         mask=mmask[None, :] & kmask[:, None], other=0.0)  # [BK, BM]
        else:
            a = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=mmask[:, None] & kmask[None, :], other=0.0)
            if LORA_FUSED:
                d = tl.load(ld_ptr + e64 * stride_lde + rk[:, None] * stride_ldk + rr[None, :] * stride_ldr,
                            mask=kmask[:, None] & rmask[None, :], other=0.0)  # [BK, RANK_P]
                if DOT_FP32:
                    xa += tl.dot(a.to(tl.float32), d.to(tl.float32))
                else:
                    xa = tl.dot(a, d.to(a.dtype), xa)
        if WFMT == 0:
            if TRANS:  # element (k, n) = W[e, k, n]
                b = tl.load(w_ptr + e64 * stride_we + rk[:, None] * stride_wr + rn[None, :] * stride_wc,
                            mask=kmask[:, None] & nmask[None, :], other=0.0)
            else:  # element (k, n) = W[e, n, k]
                b = tl.load(w_ptr + e64 * stride_we + rn[None, :] * stride_wr + rk[:, None] * stride_wc,
                            mask=kmask[:, None] & nmask[None, :], other=0.0)
            if DOT_FP32:
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32))
            else:
                acc = tl.dot(a, b.to(a.dtype), acc)
        elif WFMT == 1:
            e_base = e64 * R * C
            if TRANS:  # rows = k (R axis), cols = n (C axis, contiguous)
                wt = nf4_tile(w_ptr, s_ptr, code_ptr, e_base, rk, pid_n * BN, R, C, BN, SELECT)
                if DOT_FP32:
                    acc += tl.dot(a.to(tl.float32), wt)
                else:
                    acc = tl.dot(a, wt.to(a.dtype), acc)
            elif NF4_MODE == 2:  # swap-AB: the dequantized [BN, BK] tile is the A operand, no transpose
                wt = nf4_tile(w_ptr, s_ptr, code_ptr, e_base, rn, k0, R, C, BK, SELECT)
                if DOT_FP32:
                    acc += tl.dot(wt, at.to(tl.float32))
                else:
                    acc = tl.dot(wt.to(at.dtype), at, acc)
            elif NF4_MODE == 1:
                if DOT_FP32:
                    wt = nf4_tile_kmajor(w_ptr, s_ptr, code_ptr, e_base, k0, rn, nmask, C, BK, tl.float32, SELECT)
                    acc += tl.dot(a.to(tl.float32), wt)
                else:
                    wt = nf4_tile_kmajor(w_ptr, s_ptr, code_ptr, e_base, k0, rn, nmask, C, BK, a.dtype, SELECT)
                    acc = tl.dot(a, wt, acc)
            else:  # rows = n (R axis), cols = k (C axis, contiguous), transposed in registers
                wt = tl.trans(nf4_tile(w_ptr, s_ptr, code_ptr, e_base, rn, k0, R, C, BK, SELECT))
                if DOT_FP32:
                    acc += tl.dot(a.to(tl.float32), wt)
                else:
                    acc = tl.dot(a, wt.to(a.dtype), acc)
        else:
            if X_FP8:  # activations pre-quantized 1x128 (e4m3 codes + fp32 scale per row and 128 columns)
                xs = tl.load(xs_ptr + rm64 * stride_xsm + (k0 // 128) * stride_xsk, mask=mmask, other=0.0)
                if DOT_FP32:
                    aq = a.to(tl.float32)
                else:
                    aq = a
            else:  # 1x128 activation quantization in registers
                af = a.to(tl.float32)
                amax = tl.max(tl.abs(af), axis=1)
                xs = tl.maximum(tl.math.div_rn(amax, 448.0), 1e-12)  # IEEE division, as the reference
                aqf = tl.clamp(tl.math.div_rn(af, xs[:, None]), -448.0, 448.0)
                if DOT_FP32:
                    aq = e4m3_round_emulated(aqf, True)
                else:
                    aq = e4m3_round_emulated(aqf, False).to(tl.float8e4nv)
            if TRANS:
                b = tl.load(w_ptr + e64 * stride_we + rk[:, None] * stride_wr + rn[None, :] * stride_wc,
                            mask=kmask[:, None] & nmask[None, :], other=0.0)
                ws = tl.load(s_ptr + e64 * stride_se + (k0 // 128) * stride_sr + (rn // 128) * stride_sc,
                             mask=nmask, other=0.0)
            else:
                b = tl.load(w_ptr + e64 * stride_we + rn[None, :] * stride_wr + rk[:, None] * stride_wc,
                            mask=kmask[:, None] & nmask[None, :], other=0.0)
                ws = tl.load(s_ptr + e64 * stride_se + (rn // 128) * stride_sr + (k0 // 128) * stride_sc,
                             mask=nmask, other=0.0)
            if DOT_FP32:
                part = tl.dot(aq, b.to(tl.float32))
            else:
                part = tl.dot(aq, b)
            acc += part * xs[:, None] * ws[None, :]
    return acc, xa



@tracked
@triton.jit
def _grouped_gemm_kernel(
    x_ptr, stride_xm, stride_xk,
    xs_ptr, stride_xsm, stride_xsk,
    w_ptr, stride_we, stride_wr, stride_wc,
    s_ptr, stride_se, stride_sr, stride_sc,
    code_ptr,
    y_ptr, stride_ym, stride_yn,
    offs_ptr,
    la_ptr, stride_lam, stride_lar,
    lb_ptr, stride_lbe, stride_lbr, stride_lbn,
    ld_ptr, stride_lde, stride_ldk, stride_ldr,
    lora_scale, RANK,
    E, R, C, NOUT, KRED, K_LOOP: tl.constexpr,
    WFMT: tl.constexpr, TRANS: tl.constexpr, HAS_LORA: tl.constexpr, LORA_FUSED: tl.constexpr, RANK_P: tl.constexpr,
    E_P2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_FP32: tl.constexpr,
    NF4_MODE: tl.constexpr, X_FP8: tl.constexpr, NF4_SELECT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e, row_start, row_end = expert_tile(offs_ptr, pid_m, E, E_P2, BM)
    if e >= E:
        return

    rm = row_start + tl.arange(0, BM)
    mmask = rm < row_end
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < NOUT
    rm64 = rm.to(tl.int64)
    e64 = e.to(tl.int64)
    SWAP: tl.constexpr = (WFMT == 1) and (NF4_MODE == 2) and (not TRANS)
    if SWAP:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    rr = tl.arange(0, RANK_P)
    rmask = rr < RANK
    xa = tl.zeros((BM, RANK_P), dtype=tl.float32)  # the fused LoRA's x @ D_e (unused unless LORA_FUSED)
    if K_LOOP > 0:  # interpreter: a Python-int loop bound (it cannot loop over a runtime scalar)
        acc, xa = _k_loop(acc, xa, x_ptr, stride_xm, stride_xk, xs_ptr, stride_xsm, stride_xsk,
                          w_ptr, stride_we, stride_wr, stride_wc,
                          s_ptr, stride_se, stride_sr, stride_sc, code_ptr, e64, rm64, mmask, rn, nmask, pid_n,
                          ld_ptr, stride_lde, stride_ldk, stride_ldr, rr, rmask,
                          R, C, KRED, K_LOOP, WFMT, TRANS, BN, BK, DOT_FP32, NF4_MODE, X_FP8, NF4_SELECT, LORA_FUSED)
    else:
        acc, xa = _k_loop(acc, xa, x_ptr, stride_xm, stride_xk, xs_ptr, stride_xsm, stride_xsk,
                          w_ptr, stride_we, stride_wr, stride_wc,
                          s_ptr, stride_se, stride_sr, stride_sc, code_ptr, e64, rm64, mmask, rn, nmask, pid_n,
                          ld_ptr, stride_lde, stride_ldk, stride_ldr, rr, rmask,
                          R, C, KRED, KRED, WFMT, TRANS, BN, BK, DOT_FP32, NF4_MODE, X_FP8, NF4_SELECT, LORA_FUSED)
    if SWAP:
        acc = tl.trans(acc)
    if HAS_LORA:
        if LORA_FUSED:
            # rounded to the stored dtype BEFORE the epilogue: the same xa the unfused path loads, and the one the
            # backward's dB uses. Every N tile computed the same xa; the pid_n == 0 programs store it.
            la = xa.to(la_ptr.dtype.element_ty)
            tl.store(la_ptr + rm64[:, None] * stride_lam + rr[None, :] * stride_lar, la,
                     mask=mmask[:, None] & rmask[None, :] & (pid_n == 0))
        else:
            la = tl.load(la_ptr + rm64[:, None] * stride_lam + rr[None, :] * stride_lar,
                         mask=mmask[:, None] & rmask[None, :], other=0.0)
        lb = tl.load(lb_ptr + e64 * stride_lbe + rr[:, None] * stride_lbr + rn[None, :] * stride_lbn,
                     mask=rmask[:, None] & nmask[None, :], other=0.0)
        acc = add_lora(acc, la, lb, lora_scale, DOT_FP32)
    tl.store(y_ptr + rm64[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


@tracked
@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm,
                      BMQ: tl.constexpr, EMULATE: tl.constexpr):
    pid_m = tl.program_id(0)
    kb = tl.program_id(1)
    rm = pid_m * BMQ + tl.arange(0, BMQ)
    rk = kb * 128 + tl.arange(0, 128)
    m = (rm < M)[:, None] & (rk < K)[None, :]
    rm64 = rm.to(tl.int64)
    x = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :], mask=m, other=0.0).to(tl.float32)
    sc = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=1), 448.0), 1e-12)  # IEEE division, as the reference
    q = tl.clamp(tl.math.div_rn(x, sc[:, None]), -448.0, 448.0)
    q = e4m3_round_emulated(q, EMULATE)  # exactly representable afterwards, so the cast below is exact
    tl.store(q_ptr + rm64[:, None] * stride_qm + rk[None, :], q.to(tl.float8e4nv), mask=m)
    tl.store(s_ptr + rm64 * stride_sm + kb, sc, mask=rm < M)


def quantize_act_1x128(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q e4m3fn [M, K], scale fp32 [M, ceil(K/128)]): `reference.fp8.quantize_act_groups(x, 128)` in one pass."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be a row-major [M, K] tensor, got {tuple(x.shape)} strides {x.stride()}")
    M, K = x.shape
    nkb = triton.cdiv(K, FP8_BLOCK)
    q = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    sc = torch.empty((M, nkb), dtype=torch.float32, device=x.device)
    if M:
        BMQ = 32
        _act_quant_kernel[(triton.cdiv(M, BMQ), nkb)](x, q, sc, M, K, x.stride(0), q.stride(0), sc.stride(0),
                                                      BMQ=BMQ, EMULATE=interpret_mode(), num_warps=4)
    return q, sc



def default_config(fmt: str, trans: bool, rows: int, num_experts: int, nout: int) -> TileConfig:
    """Block sizes by the mean rows per expert (``rows / E``): decode (weight streaming), mid, prefill.

    Picked from `bench/sweep_configs.py` on an H200 at Qwen3-30B-A3B shapes (reports/bench/NOTES.md, "Tile choices")."""
    per_expert = rows / max(1, num_experts)
    if fmt == FMT_FP8:
        if per_expert <= 16:
            return TileConfig(16, 128, 128, 4, 4) if trans else TileConfig(16, 256, 128, 8, 3)
        if per_expert <= 128:
            return TileConfig(64, 128, 128, 4, 3)
        return TileConfig(128, 128, 128, 8, 3) if trans else TileConfig(64, 128, 128, 4, 4)
    if fmt == FMT_NF4:
        # num_stages=1: Triton's software pipelining of the byte loads + code-table gathers measured 1.4-12x SLOWER
        if per_expert <= 16:
            return TileConfig(16, 64, 128, 2, 1) if trans else TileConfig(16, 64, 64, 4, 1, nf4_mode=1)
        if per_expert <= 128:
            return TileConfig(64, 64, 128, 4, 1) if trans else TileConfig(64, 64, 64, 4, 1, nf4_mode=1)
        return TileConfig(128, 64, 64, 8, 1) if trans else TileConfig(64, 64, 64, 4, 1, nf4_mode=1)
    if nout <= 64:  # LoRA factor GEMMs (x @ A_e.T, dy @ B_e): a narrow N tile, memory-bound
        bn = max(16, 1 << max(0, (nout - 1).bit_length()))
        return TileConfig(16 if per_expert <= 16 else 64, bn, 64 if per_expert > 16 else 128, 4, 3)
    if per_expert <= 16:
        return TileConfig(16, 128, 64, 4, 5) if trans else TileConfig(16, 64, 256, 4, 3)
    if per_expert <= 128:
        return TileConfig(64, 128, 64, 4, 3)
    return TileConfig(128, 256, 64, 8, 3)


def launch_config(fmt: str, trans: bool, rows: int, num_experts: int, nout: int, has_lora: bool,
                  config: TileConfig | None = None) -> TileConfig:
    """The tile config a launch uses: ``config`` if given, else `default_config` with BN capped for a LoRA epilogue."""
    if config is not None:
        return config
    cfg = default_config(fmt, trans, rows, num_experts, nout)
    max_bn = int(os.environ.get("MOE_OPS_LORA_MAX_BN", "256"))
    if has_lora and cfg.BN > max_bn:
        # a LoRA epilogue with a separate fp32 result spilled registers at 128x256 tiles; accumulating in place, 256
        # measured best (reports/bench/NOTES.md, "Tile choices")
        cfg = TileConfig(cfg.BM, max_bn, cfg.BK, cfg.num_warps, cfg.num_stages, cfg.nf4_mode, cfg.nf4_select)
    return cfg


def uses_act_prequant(weight: GroupedWeight, rows: int, act_prequant: bool | None) -> bool:
    """Whether an fp8_block launch quantizes x in a separate pass (the kernel then reads e4m3 codes, not x)."""
    if weight.fmt != FMT_FP8 or rows == 0:
        return False
    if act_prequant is None:
        return rows / max(1, weight.num_experts) > 16
    return bool(act_prequant)



def lora_unfusable_reason(weight: GroupedWeight, trans: bool, cfg: TileConfig, x_prequant: bool) -> str | None:
    """Why the LoRA down-projection cannot run inside this base launch's K loop (None: it can)."""
    if x_prequant:
        return "fp8_block with pre-quantized activations (act_prequant): the kernel reads e4m3 codes, not x"
    if weight.fmt == FMT_NF4 and cfg.nf4_mode == 2 and not trans:
        return "nf4 swap-AB tiles (nf4_mode 2): the x tile is loaded transposed"
    return None



def kloop_mm(x: torch.Tensor, weight: GroupedWeight, offsets: torch.Tensor, *, trans: bool, lora_in, lora_out,
             lora_scale: float, lora_down, lora_mid, out, config: TileConfig | None, dot_fp32: bool,
             act_prequant: bool | None) -> torch.Tensor:  # fmt: skip
    """The K-loop launch of `impl.ops.dispatch.grouped_mm` (same arguments, already checked there)."""
    E, R, C = weight.shape
    S, kred = x.shape
    nout = C if trans else R
    fused = lora_down is not None
    has_lora = lora_in is not None or fused
    cfg = launch_config(weight.fmt, trans, S, E, nout, has_lora, config)
    if weight.fmt == FMT_FP8 and cfg.BK != FP8_BLOCK:
        raise ValueError(f"fp8_block needs BK == 128, got {cfg}")
    if weight.fmt == FMT_NF4:
        contig = cfg.BN if trans else cfg.BK
        if contig % NF4_BLOCK:
            raise ValueError(f"nf4 needs {'BN' if trans else 'BK'} % 64 == 0, got {cfg}")
    if out is None:
        out = torch.empty((S, nout), dtype=x.dtype, device=x.device)
    elif out.shape != (S, nout):
        raise ValueError(f"out shape {tuple(out.shape)} != {(S, nout)}")
    x_fp8 = uses_act_prequant(weight, S, act_prequant)
    ld = x.new_empty((1, 1, 1))
    if has_lora:
        if lora_out is None:
            raise ValueError("LoRA epilogue without lora_out")
        if fused:
            if lora_in is not None:
                raise ValueError("pass lora_in (unfused) or lora_down + lora_mid (fused), not both")
            if lora_mid is None:
                raise ValueError("lora_down needs lora_mid, the [S, r] output buffer of x @ lora_down[e]")
            r = lora_down.shape[-1]
            if lora_down.shape != (E, kred, r) or lora_mid.shape != (S, r) or lora_mid.dtype != x.dtype:
                raise ValueError(f"lora_down {tuple(lora_down.shape)} / lora_mid {tuple(lora_mid.shape)} "
                                 f"{lora_mid.dtype} do not match E={E}, K={kred}, S={S}, x dtype {x.dtype}")
            why = lora_unfusable_reason(weight, trans, cfg, x_fp8)
            if why is not None:
                raise ValueError(f"fused LoRA not supported for weight {weight.fmt} {weight.shape}, x "
                                 f"{tuple(x.shape)}, trans={trans}, {cfg}: {why}")
            la, ld = lora_mid, lora_down
        else:
            la = lora_in
            r = la.shape[1]
        if la.shape != (S, r) or lora_out.shape != (E, r, nout):
            raise ValueError(f"LoRA mid {tuple(la.shape)} / lora_out {tuple(lora_out.shape)} do not match "
                             f"S={S}, E={E}, out={nout}")
        rank_p = max(16, next_pow2(r))
        lb = lora_out
    else:
        r, rank_p = 0, 16
        la, lb = x, x.new_empty((1, 1, 1))
    w = weight.data
    if weight.fmt == FMT_NF4:
        ws = (0, 0, 0)
        ss = (0, 0, 0)
        s_t, code = weight.scale, weight.code
    elif weight.fmt == FMT_FP8:
        ws = w.stride()
        ss = weight.scale.stride()
        s_t, code = weight.scale, x.new_empty(1, dtype=torch.float32)
    else:
        ws = w.stride()
        ss = (0, 0, 0)
        s_t, code = x.new_empty(1, dtype=torch.float32), x.new_empty(1, dtype=torch.float32)
    xs_t, xss = x.new_empty(1, dtype=torch.float32), (0, 0)
    x_in = x
    if x_fp8:
        x_in, xs_t = quantize_act_1x128(x)
        xss = xs_t.stride()
    if S == 0:
        return out
    grid = (triton.cdiv(nout, cfg.BN), triton.cdiv(S, cfg.BM) + E)
    _grouped_gemm_kernel[grid](
        x_in, x_in.stride(0), x_in.stride(1),
        xs_t, xss[0], xss[1],
        w, ws[0], ws[1], ws[2],
        s_t, ss[0], ss[1], ss[2],
        code,
        out, out.stride(0), out.stride(1),
        offsets,
        la, la.stride(0), la.stride(1),
        lb, lb.stride(0), lb.stride(1), lb.stride(2),
        ld, ld.stride(0), ld.stride(1), ld.stride(2),
        float(lora_scale), r,
        E, R, C, nout, kred, kred if interpret_mode() else 0,
        WFMT=FMT_ID[weight.fmt], TRANS=trans, HAS_LORA=has_lora, LORA_FUSED=fused, RANK_P=rank_p,
        E_P2=max(16, next_pow2(E)), BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, DOT_FP32=dot_fp32,
        NF4_MODE=cfg.nf4_mode, X_FP8=x_fp8, NF4_SELECT=cfg.nf4_select,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out

