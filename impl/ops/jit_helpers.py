"""Device-side pieces shared by the Triton expert kernels (`impl.ops.kloop`, `impl.ops.nf4_decode`,
`impl.ops.fp8_rowwise`): NF4 code lookup and tile dequantization, the e4m3 rounding, the expert tile schedule, the LoRA
epilogue. Each is ``@triton.jit`` and inlined into the kernels that call it."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def nf4_values(codes, code_ptr, SELECT: tl.constexpr):
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
def nf4_tile(packed_ptr, absmax_ptr, code_ptr, e_base, rows, cols0, R, C, COLS: tl.constexpr,
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
    vals = nf4_values(codes, code_ptr, SELECT)
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
def nf4_tile_kmajor(packed_ptr, absmax_ptr, code_ptr, e_base, k0, rn, nmask, C, BK: tl.constexpr,
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
    hv = (nf4_values((byte >> 4) & 15, code_ptr, SELECT) * am).to(OUT_DTYPE)
    lv = (nf4_values(byte & 15, code_ptr, SELECT) * am).to(OUT_DTYPE)
    return tl.reshape(tl.permute(tl.join(hv, lv), (0, 2, 1)), (BK, rn.shape[0]))



@triton.jit
def e4m3_round_emulated(v, INTERP: tl.constexpr = True):
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
def expert_tile(offs_ptr, pid_m, E, E_P2: tl.constexpr, BM: tl.constexpr):
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
def add_lora(acc, la, lb, lora_scale, DOT_FP32: tl.constexpr):
    """``acc [BM, BN] + lora_scale * la [BM, RANK_P] @ lb [RANK_P, BN]``."""
    if DOT_FP32:
        return acc + lora_scale * tl.dot(la.to(tl.float32), lb.to(tl.float32))
    # fold the scale into the small B tile and accumulate in place: a separate [BM, BN] fp32 result of the LoRA dot
    # doubled the accumulator registers and spilled at 128x256 tiles
    return tl.dot(la, (lb.to(tl.float32) * lora_scale).to(la.dtype), acc)

