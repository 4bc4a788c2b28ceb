"""One Triton grouped GEMM for MoE experts, with the weight dequantization fused into the K loop.

Problem (rows already sorted by expert; ``offsets`` = int32 cumulative END offsets ``[E]``, as `reference.dispatch`)::

    not trans:  y[m, :] = x[m, :] @ W_e.T      x [S, C] -> y [S, R]     (forward of F.linear-layout W [E, R, C])
    trans:      y[m, :] = x[m, :] @ W_e        x [S, R] -> y [S, C]     (input gradient of the same layer)

for ``offsets[e-1] <= m < offsets[e]``, plus an optional fused LoRA epilogue
``y[m, :] += lora_scale * la[m, :] @ lb_e`` with ``la [S, r]`` and ``lb [E, r, out]``, where ``la`` is either

- given (``lora_in``; the unfused path: a separate narrow launch computed it, reading x a second time), or
- computed in the same K loop (``lora_down`` D ``[E, K, r]``): ``la = x @ D_e`` accumulated in fp32 from the x tiles
  the base product already loaded (the rank padded to RANK_P >= 16 with masks), rounded to x's dtype before the
  epilogue (what the unfused path stores and loads) and stored to ``lora_mid`` by the N-tile-0 programs. Each N tile
  recomputes it: r/BN extra tensor-core work (6 % at BN = 256) instead of a second read of x. Not for nf4 swap-AB
  tiles nor pre-quantized fp8 x (`lora_unfusable_reason`); `grouped_lora_mm` picks the path by that rule and by
  ``MOE_OPS_LORA_FUSED`` (default "0" = unfused; "1" = fused). Measured on the H200 at Qwen3-30B-A3B shapes, 16k
  tokens (reports/bench/raw/lora-breakdown-84f6496.txt): the fused launches cost +713 us over the base GEMMs, the
  unfused ones +590 us (the second accumulator chain in the K loop costs more than the activation read it saves).

Weight formats (`GroupedWeight`):

- ``bf16``: ``W [E, R, C]`` (any strides);
- ``nf4``: bitsandbytes NF4 of the flattened ``[E, R, C]`` tensor: ``packed`` uint8 ``[E·R·C/2]`` (first element in the
  HIGH nibble), fp32 ``absmax [E·R·C/64]`` (blocksize 64; a double-quantized absmax is de-nested ONCE at load time with
  `reference.nf4.absmax_of`), the 16-entry ``code``. Needs ``C % 64 == 0`` (every block lies in one row).
- ``fp8_block``: e4m3 ``q [E, R, C]`` and fp32 ``scale_inv [E, ceil(R/128), ceil(C/128)]`` (dequant multiplier); the
  activation is quantized per row and per 128 reduction columns inside the kernel (1x128, ``scale = max(amax/448,
  1e-12)``), as ``reference.fp8.quantize_fp8_block(x, block=(1, 128))`` does.

The tile schedule is built inside the kernel from ``offsets`` (no host sync): program ``(pid_n, pid_m)`` finds its expert
by a prefix sum over ``ceil(count_e / BM)``; programs past the last tile exit at once. Experts with no rows get no
tiles. Rows past ``offsets[-1]`` are not written.

Under ``TRITON_INTERPRET=1`` (CPU) pass ``dot_fp32=True``: the interpreter's bf16/fp8 ``tl.dot`` is unreliable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

FMT_BF16 = "bf16"
FMT_NF4 = "nf4"
FMT_FP8 = "fp8_block"
_FMT_ID = {FMT_BF16: 0, FMT_NF4: 1, FMT_FP8: 2}
NF4_BLOCK = 64
FP8_BLOCK = 128
E4M3_MAX = 448.0
FP8_EPS = 1e-12


@dataclass
class GroupedWeight:
    """Expert weights of logical shape ``[E, R, C]`` (F.linear layout: R = out features, C = in features).

    fmt: FMT_BF16 (data = W), FMT_NF4 (data = packed uint8 flat, scale = fp32 absmax flat, code = fp32 [16]) or
    FMT_FP8 (data = e4m3 [E, R, C], scale = fp32 scale_inv [E, ceil(R/128), ceil(C/128)]).
    """

    fmt: str
    shape: tuple[int, int, int]
    data: torch.Tensor
    scale: torch.Tensor | None = None
    code: torch.Tensor | None = None

    def __post_init__(self) -> None:
        E, R, C = self.shape
        if self.fmt == FMT_BF16:
            if tuple(self.data.shape) != (E, R, C):
                raise ValueError(f"bf16 weight: data shape {tuple(self.data.shape)} != {self.shape}")
        elif self.fmt == FMT_NF4:
            n = E * R * C
            if C % NF4_BLOCK:
                raise ValueError(f"nf4 weight {self.shape}: C={C} must be a multiple of the blocksize {NF4_BLOCK}")
            if self.data.dtype != torch.uint8 or self.data.numel() != n // 2:
                raise ValueError(f"nf4 packed must be uint8 with {n // 2} bytes, got {self.data.dtype} {self.data.numel()}")
            if self.scale is None or self.scale.dtype != torch.float32 or self.scale.numel() != n // NF4_BLOCK:
                raise ValueError(f"nf4 absmax must be fp32 with {n // NF4_BLOCK} entries (de-nested), got "
                                 f"{None if self.scale is None else (self.scale.dtype, self.scale.numel())}")
            if self.code is None or self.code.numel() != 16 or self.code.dtype != torch.float32:
                raise ValueError("nf4 code must be fp32 [16]")
        elif self.fmt == FMT_FP8:
            if self.data.dtype != torch.float8_e4m3fn or tuple(self.data.shape) != (E, R, C):
                raise ValueError(f"fp8 weight must be float8_e4m3fn {self.shape}, got {self.data.dtype} {tuple(self.data.shape)}")
            grid = (E, -(-R // FP8_BLOCK), -(-C // FP8_BLOCK))
            if self.scale is None or tuple(self.scale.shape) != grid or self.scale.dtype != torch.float32:
                raise ValueError(f"fp8 scale_inv must be fp32 {grid}, got "
                                 f"{None if self.scale is None else (self.scale.dtype, tuple(self.scale.shape))}")
        else:
            raise ValueError(f"unknown weight format {self.fmt!r}; expected one of {sorted(_FMT_ID)}")

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        if self.scale is not None:
            n += self.scale.numel() * self.scale.element_size()
        return n


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
    # register copy of the table (decode kernel, H200: 10-15 % faster than 0 at 16-64 tokens, sweep-decode-lut-84f6496)


# ----------------------------------------------------------------------------------------------------- kernel pieces


@triton.jit
def _nf4_values(codes, code_ptr, SELECT: tl.constexpr):
    """fp32 NF4 values of int32 4-bit codes [A, B]: SELECT 0 = a gather from the 16-entry table in memory, 1 = a
    4-level select tree over the 16 entries, 2 = `tl.gather` from the table held in registers. The same fp32 values."""
    if SELECT == 2:
        table = tl.broadcast_to(tl.load(code_ptr + tl.arange(0, 16))[None, :], (codes.shape[0], 16))
        return tl.gather(table, codes, 1)
    elif SELECT == 1:
        b0 = (codes & 1) != 0
        b1 = (codes & 2) != 0
        b2 = (codes & 4) != 0
        b3 = (codes & 8) != 0
        v0 = tl.where(b0, tl.load(code_ptr + 1), tl.load(code_ptr + 0))
        v1 = tl.where(b0, tl.load(code_ptr + 3), tl.load(code_ptr + 2))
        v2 = tl.where(b0, tl.load(code_ptr + 5), tl.load(code_ptr + 4))
        v3 = tl.where(b0, tl.load(code_ptr + 7), tl.load(code_ptr + 6))
        v4 = tl.where(b0, tl.load(code_ptr + 9), tl.load(code_ptr + 8))
        v5 = tl.where(b0, tl.load(code_ptr + 11), tl.load(code_ptr + 10))
        v6 = tl.where(b0, tl.load(code_ptr + 13), tl.load(code_ptr + 12))
        v7 = tl.where(b0, tl.load(code_ptr + 15), tl.load(code_ptr + 14))
        w0 = tl.where(b1, v1, v0)
        w1 = tl.where(b1, v3, v2)
        w2 = tl.where(b1, v5, v4)
        w3 = tl.where(b1, v7, v6)
        return tl.where(b3, tl.where(b2, w3, w2), tl.where(b2, w1, w0))
    else:
        return tl.load(code_ptr + codes)


@triton.jit
def _nf4_tile(packed_ptr, absmax_ptr, code_ptr, e_base, rows, cols0, R, C, COLS: tl.constexpr,
              SELECT: tl.constexpr = False):
    """fp32 [ROWS, COLS] of W_e[rows, cols0:cols0+COLS]; e_base = e*R*C (even); cols0 % 64 == 0; C % 64 == 0."""
    HALF: tl.constexpr = COLS // 2
    cb = cols0 // 2 + tl.arange(0, HALF)
    rmask = rows < R
    bmask = rmask[:, None] & (cb < C // 2)[None, :]
    byte_off = e_base // 2 + rows.to(tl.int64)[:, None] * (C // 2) + cb[None, :]
    byte = tl.load(packed_ptr + byte_off, mask=bmask, other=0).to(tl.int32)
    hi = (byte >> 4) & 15
    lo = byte & 15
    codes = tl.interleave(hi, lo)  # first element in the high nibble
    vals = _nf4_values(codes, code_ptr, SELECT)
    NB: tl.constexpr = COLS // 64
    sb = cols0 // 64 + tl.arange(0, NB)
    s_off = e_base // 64 + rows.to(tl.int64)[:, None] * (C // 64) + sb[None, :]
    am = tl.load(absmax_ptr + s_off, mask=rmask[:, None] & (sb < C // 64)[None, :], other=0.0)
    if NB == 1:
        vals = vals * tl.reshape(am, (rows.shape[0], 1))
    else:
        vals = tl.reshape(tl.reshape(vals, (rows.shape[0], NB, 64)) * am[:, :, None], (rows.shape[0], COLS))
    return vals


@triton.jit
def _nf4_tile_kmajor(packed_ptr, absmax_ptr, code_ptr, e_base, k0, rn, nmask, C, BK: tl.constexpr,
                     OUT_DTYPE: tl.constexpr, SELECT: tl.constexpr = False):
    """[BK, BN] tile with element (k, n) = W_e[n, k0 + k], built from the bytes [BK/2, BN] (two k per byte): the
    high/low nibbles are joined on a new minor axis and folded into K, so no transpose of the dequantized tile."""
    kb = k0 // 2 + tl.arange(0, BK // 2)
    n64 = rn.to(tl.int64)
    m = (kb < C // 2)[:, None] & nmask[None, :]
    byte = tl.load(packed_ptr + e_base // 2 + n64[None, :] * (C // 2) + kb[:, None], mask=m, other=0).to(tl.int32)
    if BK == 64:  # one absmax per n for the whole tile
        am1 = tl.load(absmax_ptr + e_base // 64 + n64 * (C // 64) + k0 // 64, mask=nmask, other=0.0)
        am = tl.broadcast_to(am1[None, :], (BK // 2, rn.shape[0]))
    else:
        am = tl.load(absmax_ptr + e_base // 64 + n64[None, :] * (C // 64) + (kb // 32)[:, None], mask=m, other=0.0)
    hv = (_nf4_values((byte >> 4) & 15, code_ptr, SELECT) * am).to(OUT_DTYPE)
    lv = (_nf4_values(byte & 15, code_ptr, SELECT) * am).to(OUT_DTYPE)
    return tl.reshape(tl.permute(tl.join(hv, lv), (0, 2, 1)), (BK, rn.shape[0]))


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
                wt = _nf4_tile(w_ptr, s_ptr, code_ptr, e_base, rk, pid_n * BN, R, C, BN, SELECT)
                if DOT_FP32:
                    acc += tl.dot(a.to(tl.float32), wt)
                else:
                    acc = tl.dot(a, wt.to(a.dtype), acc)
            elif NF4_MODE == 2:  # swap-AB: the dequantized [BN, BK] tile is the A operand, no transpose
                wt = _nf4_tile(w_ptr, s_ptr, code_ptr, e_base, rn, k0, R, C, BK, SELECT)
                if DOT_FP32:
                    acc += tl.dot(wt, at.to(tl.float32))
                else:
                    acc = tl.dot(wt.to(at.dtype), at, acc)
            elif NF4_MODE == 1:
                if DOT_FP32:
                    wt = _nf4_tile_kmajor(w_ptr, s_ptr, code_ptr, e_base, k0, rn, nmask, C, BK, tl.float32, SELECT)
                    acc += tl.dot(a.to(tl.float32), wt)
                else:
                    wt = _nf4_tile_kmajor(w_ptr, s_ptr, code_ptr, e_base, k0, rn, nmask, C, BK, a.dtype, SELECT)
                    acc = tl.dot(a, wt, acc)
            else:  # rows = n (R axis), cols = k (C axis, contiguous), transposed in registers
                wt = tl.trans(_nf4_tile(w_ptr, s_ptr, code_ptr, e_base, rn, k0, R, C, BK, SELECT))
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
                    aq = _e4m3_round_emulated(aqf, True)
                else:
                    aq = _e4m3_round_emulated(aqf, False).to(tl.float8e4nv)
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


@triton.jit
def _e4m3_round_emulated(v, INTERP: tl.constexpr = True):
    """Round fp32 ``v`` (|v| <= 448) to the e4m3 grid in fp32, round-to-nearest-even, so the following cast to e4m3 is
    exact. Needed on the GPU too: Triton's fp32 -> e4m3 cast rounds twice (through fp16: 30.999998 -> 31 -> 32, the
    reference gives 30), which changed 0.11 % of the activation codes (H200, 2026-11-29). The interpreter has no
    libdevice rint: round-half-even is built from floor (|t| < 16, so t + 0.5 is exact); its own cast is also wrong
    when the mantissa rounds up (126.2 -> 64)."""
    bits = v.to(tl.int32, bitcast=True)
    ex = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # floor(log2 |v|), subnormal range clamped to 2^-6
    step = ((ex - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(ex-3): 3 mantissa bits
    t = v / step  # exact: a power of two
    if INTERP:
        r = tl.floor(t + 0.5)
        r = tl.where((r - t == 0.5) & (tl.floor(r * 0.5) * 2.0 != r), r - 1.0, r)  # a tie rounded to odd: to even
    else:
        r = libdevice.rint(t)
    return r * step


@triton.jit
def _expert_tile(offs_ptr, pid_m, E, E_P2: tl.constexpr, BM: tl.constexpr):
    """(e, row_start, row_end) of M tile ``pid_m`` from the int32 END ``offsets`` (no host sync): the expert is found by
    a prefix sum over ``ceil(count_e / BM)``; ``e == E`` for programs past the last tile (the caller returns)."""
    eidx = tl.arange(0, E_P2)
    ends = tl.load(offs_ptr + eidx, mask=eidx < E, other=0)
    starts = tl.load(offs_ptr + eidx - 1, mask=(eidx > 0) & (eidx < E), other=0)
    tiles = tl.where(eidx < E, (ends - starts + BM - 1) // BM, 0)
    cum = tl.cumsum(tiles, 0)
    e = tl.sum((cum <= pid_m).to(tl.int32))
    sel = eidx == e
    tile0 = tl.sum(tl.where(sel, cum - tiles, 0))
    row_start = tl.sum(tl.where(sel, starts, 0)) + (pid_m - tile0) * BM
    row_end = tl.sum(tl.where(sel, ends, 0))
    return e, row_start, row_end


@triton.jit
def _add_lora(acc, la, lb, lora_scale, DOT_FP32: tl.constexpr):
    """``acc [BM, BN] + lora_scale * la [BM, RANK_P] @ lb [RANK_P, BN]``."""
    if DOT_FP32:
        return acc + lora_scale * tl.dot(la.to(tl.float32), lb.to(tl.float32))
    # fold the scale into the small B tile and accumulate in place: a separate [BM, BN] fp32 result of the LoRA dot
    # doubled the accumulator registers and spilled at 128x256 tiles
    return tl.dot(la, (lb.to(tl.float32) * lora_scale).to(la.dtype), acc)


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
    e, row_start, row_end = _expert_tile(offs_ptr, pid_m, E, E_P2, BM)
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
        acc = _add_lora(acc, la, lb, lora_scale, DOT_FP32)
    tl.store(y_ptr + rm64[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


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
    q = _e4m3_round_emulated(q, EMULATE)  # exactly representable afterwards, so the cast below is exact
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


# ----------------------------------------------------------------------------------------------------- python API


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_config(fmt: str, trans: bool, rows: int, num_experts: int, nout: int) -> TileConfig:
    """Block sizes by the mean rows per expert (``rows / E``): decode (weight streaming), mid, prefill.

    Picked from `bench/sweep_configs.py` on an H200 at Qwen3-30B-A3B shapes (reports/bench/*sweep*)."""
    per_expert = rows / max(1, num_experts)
    if fmt == FMT_FP8:
        if per_expert <= 16:
            return TileConfig(16, 128, 128, 4, 4) if trans else TileConfig(16, 256, 128, 8, 3)
        if per_expert <= 128:
            return TileConfig(64, 128, 128, 4, 3)
        return TileConfig(128, 128, 128, 8, 3) if trans else TileConfig(64, 128, 128, 4, 4)
    if fmt == FMT_NF4:
        # num_stages=1: Triton's software pipelining of the byte loads + code-table gathers was 1.4-12x SLOWER
        # (sweep of 2026-11-29: 297 vs 562 us decode, 431 vs 940 us at 64 rows/expert, Qwen3 gate_up).
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
        # a LoRA epilogue with a separate fp32 result spilled registers at 128x256 tiles (4.6x slower at 16k tokens);
        # accumulating in place, 256 measured best (Qwen3 16k fwd_bwd: 7355 vs 7770 us at 128, 2026-11-29)
        cfg = TileConfig(cfg.BM, max_bn, cfg.BK, cfg.num_warps, cfg.num_stages, cfg.nf4_mode, cfg.nf4_select)
    return cfg


def uses_act_prequant(weight: GroupedWeight, rows: int, act_prequant: bool | None) -> bool:
    """Whether an fp8_block launch quantizes x in a separate pass (the kernel then reads e4m3 codes, not x)."""
    if weight.fmt != FMT_FP8 or rows == 0:
        return False
    if act_prequant is None:
        return rows / max(1, weight.num_experts) > 16
    return bool(act_prequant)


DECODE_MAX_ROWS_PER_EXPERT = 16
DECODE_REASON = "nf4 decode kernel (impl.ops.nf4_decode) for <= 16 mean rows per expert"


def nf4_decode_route(weight: GroupedWeight, trans: bool, rows: int, config: TileConfig | None) -> bool:
    """True where `grouped_mm` hands an NF4 forward to `impl.ops.nf4_decode.nf4_decode_mm` (default tiles only): at
    most DECODE_MAX_ROWS_PER_EXPERT mean rows per expert. H200, Qwen3-30B-A3B (sweep-decode-lut-84f6496, -5ee6e6e):
    gate_up 254 vs 285 us at 64 tokens, 169 vs 192 at 16, 39 vs 51 at 1 (split K); down 132 vs 149, 88 vs 100."""
    if weight.fmt != FMT_NF4 or trans or config is not None or rows == 0:
        return False
    return rows / weight.num_experts <= DECODE_MAX_ROWS_PER_EXPERT


def lora_unfusable_reason(weight: GroupedWeight, trans: bool, cfg: TileConfig, x_prequant: bool) -> str | None:
    """Why the LoRA down-projection cannot run inside this base launch's K loop (None: it can)."""
    if x_prequant:
        return "fp8_block with pre-quantized activations (act_prequant): the kernel reads e4m3 codes, not x"
    if weight.fmt == FMT_NF4 and cfg.nf4_mode == 2 and not trans:
        return "nf4 swap-AB tiles (nf4_mode 2): the x tile is loaded transposed"
    return None


def grouped_mm(
    x: torch.Tensor,
    weight: GroupedWeight,
    offsets: torch.Tensor,
    *,
    trans: bool = False,
    lora_in: torch.Tensor | None = None,
    lora_out: torch.Tensor | None = None,
    lora_scale: float = 1.0,
    lora_down: torch.Tensor | None = None,
    lora_mid: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: TileConfig | None = None,
    dot_fp32: bool | None = None,
    act_prequant: bool | None = None,
) -> torch.Tensor:
    """Grouped ``x @ W_e.T`` (``trans=False``: x [S, C] -> [S, R]) or ``x @ W_e`` (``trans=True``: x [S, R] -> [S, C]).

    offsets: int32 [E] END offsets on x's device (``offsets[-1] <= S``; rows past it are left unwritten).
    LoRA epilogue ``y[m] += lora_scale * mid[m] @ lora_out[e]`` with lora_out [E, r, out] (any strides), where

    - unfused: ``mid = lora_in`` [S, r], given;
    - fused (``lora_down`` [E, K, r], any strides; ``lora_mid`` [S, r] in x's dtype, written): ``mid = x @ lora_down[e]``
      accumulated in fp32 in the base K loop from the same x tiles, rounded to x's dtype, stored into ``lora_mid``
      and used in the epilogue (so exactly what the unfused path would load). Raises where `lora_unfusable_reason`
      says the launch cannot fuse (use `grouped_lora_mm`, which picks the unfused path by that rule).

    Output dtype: x's dtype (bf16/fp16/fp32). ``dot_fp32`` defaults to True under TRITON_INTERPRET=1.
    fp8_block: ``act_prequant`` quantizes x (1x128) in a separate pass first (default: when the mean rows per expert
    exceed 16, where quantizing in every N tile would cost more than one extra pass over x).
    """
    E, R, C = weight.shape
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [S, K], got shape {tuple(x.shape)}")
    S, kred = x.shape
    nout, want_k = (C, R) if trans else (R, C)
    if kred != want_k:
        raise ValueError(f"x {tuple(x.shape)} does not match weight {weight.shape} (trans={trans}): need K={want_k}")
    if offsets.dtype != torch.int32 or offsets.shape != (E,):
        raise ValueError(f"offsets must be int32 [E={E}], got {offsets.dtype} {tuple(offsets.shape)}")
    if offsets.device != x.device:
        raise ValueError(f"offsets on {offsets.device}, x on {x.device}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x dtype {x.dtype} not supported (bf16/fp16/fp32)")
    if dot_fp32 is None:
        dot_fp32 = interpret_mode()
    fused = lora_down is not None
    has_lora = lora_in is not None or fused
    if nf4_decode_route(weight, trans, S, config):  # it validates its own arguments
        if fused:
            raise ValueError(f"fused LoRA not supported for weight {weight.fmt} {weight.shape}, x {tuple(x.shape)}, "
                             f"trans={trans}: {DECODE_REASON}")
        from impl.ops.nf4_decode import nf4_decode_mm  # it imports this module

        return nf4_decode_mm(x, weight, offsets, lora_in=lora_in, lora_out=lora_out, lora_scale=lora_scale, out=out,
                             dot_fp32=dot_fp32)
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
        rank_p = max(16, _next_pow2(r))
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
        WFMT=_FMT_ID[weight.fmt], TRANS=trans, HAS_LORA=has_lora, LORA_FUSED=fused, RANK_P=rank_p,
        E_P2=max(16, _next_pow2(E)), BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, DOT_FP32=dot_fp32,
        NF4_MODE=cfg.nf4_mode, X_FP8=x_fp8, NF4_SELECT=cfg.nf4_select,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def lora_fused_default() -> bool:
    """``MOE_OPS_LORA_FUSED`` (read at every call, so one process can A/B both): "0" (default, measured faster: see the
    module docstring) unfused, "1" fused."""
    v = os.environ.get("MOE_OPS_LORA_FUSED", "0")
    if v not in ("0", "1"):
        raise ValueError(f"MOE_OPS_LORA_FUSED must be '0' or '1', got {v!r}")
    return v == "1"


def lora_path(x: torch.Tensor, weight: GroupedWeight, *, trans: bool = False, fused: bool | None = None,
              config: TileConfig | None = None, act_prequant: bool | None = None) -> str:
    """"fused" or "unfused: <why>": the path `grouped_lora_mm` takes for these arguments."""
    if not (lora_fused_default() if fused is None else fused):
        return "unfused: requested (fused=False / MOE_OPS_LORA_FUSED=0)"
    E, R, C = weight.shape
    S = x.shape[0]
    cfg = launch_config(weight.fmt, trans, S, E, C if trans else R, True, config)
    why = lora_unfusable_reason(weight, trans, cfg, uses_act_prequant(weight, S, act_prequant))
    if why is None and nf4_decode_route(weight, trans, S, config):
        why = DECODE_REASON
    return "fused" if why is None else f"unfused: {why}"


def grouped_lora_mm(
    x: torch.Tensor,
    weight: GroupedWeight,
    offsets: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    lora_scale: float,
    *,
    trans: bool = False,
    fused: bool | None = None,
    config: TileConfig | None = None,
    dot_fp32: bool | None = None,
    act_prequant: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, mid)`` with ``mid = x @ D_e`` [S, r] (x's dtype) and ``y = base(x) + lora_scale * mid @ U_e``.

    base(x) as `grouped_mm` (``x @ W_e.T``, or ``x @ W_e`` when trans); ``lora_down`` D [E, K, r], ``lora_up``
    U [E, r, out] (any strides). Forward of a LoRA layer: D_e = A_e.T, U_e = B_e.T, mid = xa; its input gradient
    (trans): D_e = B_e, U_e = A_e, mid = dy @ B_e.

    fused (`lora_fused_default`, env ``MOE_OPS_LORA_FUSED``, off by default): ONE launch, mid accumulated in the base
    K loop.
    Where `lora_unfusable_reason` names a reason (pre-quantized fp8 x, nf4 swap-AB), or fused=False, two launches:
    ``mid = grouped_mm(x, D.T)`` (a second read of x), then the base GEMM with the epilogue loading mid.
    """
    path = lora_path(x, weight, trans=trans, fused=fused, config=config, act_prequant=act_prequant)
    if path == "fused":
        mid = torch.empty((x.shape[0], lora_down.shape[-1]), dtype=x.dtype, device=x.device)
        y = grouped_mm(x, weight, offsets, trans=trans, lora_down=lora_down, lora_mid=mid, lora_out=lora_up,
                       lora_scale=lora_scale, config=config, dot_fp32=dot_fp32, act_prequant=act_prequant)
    else:
        d_t = lora_down.transpose(1, 2)
        mid = grouped_mm(x, GroupedWeight(FMT_BF16, tuple(d_t.shape), d_t), offsets, dot_fp32=dot_fp32)
        y = grouped_mm(x, weight, offsets, trans=trans, lora_in=mid, lora_out=lora_up, lora_scale=lora_scale,
                       config=config, dot_fp32=dot_fp32, act_prequant=act_prequant)
    return y, mid
