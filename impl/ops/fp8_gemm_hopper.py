"""Block-FP8 grouped GEMM for Hopper: TMA tile loads, one fp32 accumulator, large tiles (forward of the FP8 experts).

Same function as the ``fp8_block`` path of `impl.ops.dispatch.grouped_mm` (rows sorted by expert, int32 END
``offsets [E]``)::

    not trans:  y[m, n] = sum_kb sx[m, kb] * sw[e, n // 128, kb] * sum_{k in kb} xq[m, k] * q[e, n, k]   x [S, C] -> y [S, R]
    trans:      y[m, n] = sum_kb sx[m, kb] * sw[e, kb, n // 128] * sum_{k in kb} xq[m, k] * q[e, k, n]   x [S, R] -> y [S, C]

with ``xq, sx = quantize_act_1x128(x)`` (1x128 groups over the reduction axis, `reference.fp8.quantize_act_groups`),
weight codes ``q [E, R, C]`` e4m3 and ``sw = scale_inv [E, ceil(R/128), ceil(C/128)]`` (the dequant multiplier).
Partial edge blocks: tile rows/columns past R, C or the expert's last row are computed and not stored; the K tail is
zero-filled by the TMA descriptor of x (so a weight tile that reads past the expert's K extent is multiplied by 0).

Why a second kernel: the K-loop kernel (`impl.ops.kloop`) runs the FP8 forward at 36 % of the FP8 roofline on an H200
(reports/bench/NOTES.md). Its sm_90a SASS (compiled on a CPU by bench/fp8_hopper_sass.py) has 282 instructions per
K step per warp for a 64x128x128 tile (12 cp.async with 64-bit address arithmetic and masks, FMUL + FFMA per element
for the two scales, a shared-memory round trip + barrier to re-layout the row scales) at 250 registers. This kernel
loads the A and B tiles with TMA (host ``TensorDescriptor``s; one thread issues the bulk copies), folds the two
scales into one per-row factor (the weight scale is a scalar per 128x128 block; the BN tile is computed as 64- or
128-wide chunks with one scalar each), builds the tile -> expert map in one small launch, and offers two promotion
forms:

- ``rescale=False`` ("promote", the current kernel's numerics): ``acc += dot(a, b) * s[:, None]`` with s = sx * sw
  per row; each 128-K partial leaves the tensor cores in fp32 and is scaled and added by one FFMA per element. Costs
  a second register tile (64 fp32 per thread per 64x128 warpgroup tile): 168 instructions per K step at 128x128
  (155 registers; 127 with CH = 64 chunks, i.e. two 8-warp CTAs per SM), 128x256 spills (255 registers + 96 B).
- ``rescale=True`` (FAST ACCUMULATION): acc is kept in units of the current block's scale,
  ``acc = dot(a, b, acc * (s_prev / s)[:, None])``, ``y = acc * s_last``: no second register tile (110 registers at
  128x128, so two 8-warp CTAs per SM; 188 at 128x256, no spill). Exact in real arithmetic, but the running sum now
  goes through the tensor cores' fp8 accumulation on every wgmma, which keeps only ~14 bits (DeepSeek-V3 report),
  so its error grows with K: see the sweep's rel_err before making it a default.

Triton waits for every wgmma of a K step right after issuing it (``WARPGROUP.DEPBAR.LE gsb0, 0x0``; unrolling two K
steps by hand does not change that; only independent chunks of one tile get their wgmma issued during the previous
chunk's promotion), so while one warpgroup promotes, mostly the OTHER warpgroups/CTAs of the SM feed the tensor
cores: tile shape and CTAs per SM are what the variants vary. ``tl.range(warp_specialize=True)`` is not usable
on Hopper in Triton 3.6 (ignored at 8 warps: identical SASS; the NVGPUWarpSpecialization pass fails at 4 warps).

Schedule: no host sync. Program ``(pid_n, pid_m)`` (or, persistent, work item t = pid_m * n_tiles + pid_n walked by
NUM_SMS * ctas_per_sm programs) finds its expert by a prefix sum over ``ceil(count_e / BM)``
(`jit_helpers.expert_tile`), either in the tile's own prologue or, ``tile_map``, in one small launch before
(`expert_tile_map`); experts with no rows get no tiles; rows past ``offsets[-1]`` are not written.

Under ``TRITON_INTERPRET=1`` (CPU) the dots run in fp32 (``dot_fp32``): the interpreter's fp8 ``tl.dot`` is unreliable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from impl.ops.formats import FMT_FP8, FP8_BLOCK, GroupedWeight, check_operands, interpret_mode, next_pow2
from impl.ops.jit_helpers import expert_tile
from impl.ops.kloop import quantize_act_1x128

TMA_ALIGN = 16  # bytes: base pointer and every leading stride of a TMA tensor


@dataclass(frozen=True)
class HopperFp8Config:
    """One launch configuration: [BM, BN] output tiles, BN = 128 or 256 (128-wide weight-scale blocks).

    CH: width of each accumulator chunk (one dot per chunk and K block; ptxas overlaps a chunk's wgmma with the
    previous chunk's promotion when registers allow, and CH = 64 halves the register cost of that). ctas_per_sm:
    persistent only (grid = NUM_SMS * ctas_per_sm). maxnreg: register cap per thread (None = the compiler's choice;
    128 lets two 8-warp CTAs share an SM's 65536 registers). tile_map: each tile reads its (expert, rows) from a map
    built by one small launch (`expert_tile_map`) instead of searching the offsets itself (`expert_tile`: a vector
    load, a scan and three reductions with barriers before the first wgmma of every tile)."""

    BM: int = 128
    BN: int = 128
    num_warps: int = 8
    num_stages: int = 3
    rescale: bool = False
    persistent: bool = False
    ctas_per_sm: int = 1
    maxnreg: int | None = None
    tile_map: bool = True
    CH: int = 128

    def __post_init__(self) -> None:
        if self.BN not in (128, 256):
            raise ValueError(f"BN must be 128 or 256 (128-wide weight-scale blocks), got {self.BN}")
        if self.BM not in (64, 128):
            raise ValueError(f"BM must be 64 or 128, got {self.BM}")
        if self.CH not in (64, 128) or self.BN // self.CH > 4:
            raise ValueError(f"CH (the accumulator chunk width) must be 64 or 128 with BN / CH <= 4, got {self}")


# Variants the sweep (bench/sweep_fp8.py) times; the predictions for each (Qwen3-30B-A3B gate_up at 16384 tokens) are in
# reports/bench/fp8-hopper-sweep-plan.md. "promote" variants keep the current kernel's numerics (every 128-K partial
# promoted in fp32); "rescale" ones are FAST-ACCUMULATION: the running sum goes through the tensor cores' limited-
# precision adder on every wgmma (DeepSeek-V3 report: ~14 bits retained on H800), more error as K grows. The sweep
# marks a variant whose fp32-output error exceeds 2x the current kernel's as LOSSY (not eligible as the default).
VARIANTS: dict[str, HopperFp8Config] = {
    "t128x128_promote": HopperFp8Config(128, 128, 8, 3),
    "t128x128_promote_scan": HopperFp8Config(128, 128, 8, 3, tile_map=False),
    "t128x128_promote_c64": HopperFp8Config(128, 128, 8, 3, CH=64),
    "t64x128_promote": HopperFp8Config(64, 128, 4, 3),
    "t128x256_promote": HopperFp8Config(128, 256, 8, 3),
    "t128x128_rescale": HopperFp8Config(128, 128, 8, 3, rescale=True),
    "t128x256_rescale": HopperFp8Config(128, 256, 8, 3, rescale=True),
    "t128x256_rescale_persist": HopperFp8Config(128, 256, 8, 3, rescale=True, persistent=True),
}
DEFAULT_VARIANT = "t128x128_promote"


def unsupported_reason(x: torch.Tensor, weight: GroupedWeight, trans: bool) -> str | None:
    """Why `fp8_grouped_mm` cannot run these operands (None: it can). TMA needs 16-byte aligned bases and leading
    strides: the e4m3 activation codes ``[S, K]`` and the weight codes viewed ``[E*R, C]`` need K % 16 == 0 and
    C % 16 == 0 (1 byte per element); every model shape in bench/bench_moe.py satisfies this."""
    if weight.fmt != FMT_FP8:
        return f"weight format {weight.fmt!r} is not {FMT_FP8!r}"
    E, R, C = weight.shape
    kred = R if trans else C
    if kred % TMA_ALIGN:
        return f"reduction dim {kred} (x {tuple(x.shape)}, trans={trans}) is not a multiple of {TMA_ALIGN} (TMA stride)"
    if C % TMA_ALIGN:
        return f"weight row length C={C} of {weight.shape} is not a multiple of {TMA_ALIGN} (TMA stride)"
    if not weight.data.is_contiguous():
        return f"weight codes {weight.shape} must be contiguous (strides {weight.data.stride()})"
    if weight.data.data_ptr() % TMA_ALIGN:
        return "weight codes are not 16-byte aligned"
    return None


@triton.jit
def _chunk(acc, s_prev, a, w_desc, sw_c, stride_skb, kb, k0, wrow, n_c, xs, has, TRANS: tl.constexpr,
           RESCALE: tl.constexpr, DOT_FP32: tl.constexpr):
    """One K block of one [BM, CH] accumulator chunk starting at output column n_c: its weight codes are rows
    ``wrow + n_c ...`` (columns, trans) of the [E*R, C] view, its weight scale ``sw_c[kb]``; s = sx * sw per row.
    promote: ``acc += (a @ b) * s``. rescale: acc holds the running sum in units of the current block's s,
    ``acc = acc * (s_prev / s) + a @ b`` (the tile multiplies by the last s at the end); the multiply sits BEFORE
    the wgmma on purpose: placed after it, ptxas copied the accumulator back into the wgmma registers every step (64
    MOVs) and the 128x256 tile spilled. Returns (acc, s)."""
    ws = tl.load(sw_c + kb * stride_skb, mask=has, other=1.0)
    if TRANS:  # element (k, n) = q[e, k, n]: row wrow + k of the [E*R, C] view
        b = w_desc.load([wrow + k0, n_c])
    else:  # element (k, n) = q[e, n, k]
        b = w_desc.load([wrow + n_c, k0]).T
    s = xs * ws
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if RESCALE:
        acc = tl.dot(a, b, acc * (s_prev / s)[:, None])
    else:
        acc += tl.dot(a, b) * s[:, None]
    return acc, s


@triton.jit
def _store_chunk(acc, s_last, y_ptr, stride_ym, stride_yn, rm, rmask, n_c, NOUT, CH: tl.constexpr,
                 RESCALE: tl.constexpr):
    if RESCALE:
        acc = acc * s_last[:, None]
    rn = n_c + tl.arange(0, CH)
    yp = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :] * stride_yn
    tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & (rn < NOUT)[None, :])


@triton.jit
def _tile_map_kernel(offs_ptr, map_ptr, E, E_P2: tl.constexpr, BM: tl.constexpr):
    tm = tl.program_id(0)
    e, row_start, row_end = expert_tile(offs_ptr, tm, E, E_P2, BM)
    tl.store(map_ptr + tm * 4, e)
    tl.store(map_ptr + tm * 4 + 1, row_start)
    tl.store(map_ptr + tm * 4 + 2, row_end)


def expert_tile_map(offsets: torch.Tensor, rows: int, BM: int) -> torch.Tensor:
    """int32 [cdiv(rows, BM) + E, 4]: for M tile tm, (expert e, first row, expert's end row, -) as `expert_tile`
    computes it from the END ``offsets`` (e >= E: no tile). One launch, no host sync; depends only on (offsets, BM)."""
    E = offsets.shape[0]
    n = triton.cdiv(rows, BM) + E
    tiles = torch.empty((n, 4), dtype=torch.int32, device=offsets.device)
    _tile_map_kernel[(n,)](offsets, tiles, E, E_P2=max(16, next_pow2(E)), BM=BM, num_warps=1)
    return tiles


@triton.jit
def _tile(t, a_desc, xs_ptr, stride_xsm, stride_xsk, w_desc, sw_ptr, stride_se, stride_skb, stride_snb,
          y_ptr, stride_ym, stride_yn, offs_ptr, map_ptr, n_tiles_m, S, E, R, NOUT, K_END, n_tiles_n,
          TRANS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CH: tl.constexpr, E_P2: tl.constexpr,
          RESCALE: tl.constexpr, DOT_FP32: tl.constexpr, TILE_MAP: tl.constexpr):
    """Output tile ``t`` = (m tile t // n_tiles_n, n tile t % n_tiles_n) as BN / CH (1, 2 or 4) accumulator chunks of
    [BM, CH], one dot each per K block (ptxas issues a chunk's wgmma while the previous chunk is promoted, at the
    price of a second result tile in registers). K_END is the reduction length (a Python int under the interpreter).
    The weight scale of (K block kb, output block nb) is at ``sw_ptr + e*stride_se + kb*stride_skb + nb*stride_snb``."""
    BK: tl.constexpr = 128
    NCH: tl.constexpr = BN // CH
    tm = t // n_tiles_n
    tn = t % n_tiles_n
    if TILE_MAP:  # tm past the map (a persistent program's last strides) reads e = E: no tile
        inside = tm < n_tiles_m
        e = tl.load(map_ptr + tm * 4, mask=inside, other=E)
        row_start = tl.load(map_ptr + tm * 4 + 1, mask=inside, other=0)
        row_end = tl.load(map_ptr + tm * 4 + 2, mask=inside, other=0)
    else:
        e, row_start, row_end = expert_tile(offs_ptr, tm, E, E_P2, BM)
    if e < E:
        n0 = tn * BN
        rm = row_start + tl.arange(0, BM)
        xs_off = rm * stride_xsm  # int32: fp8_grouped_mm refuses scale tensors of >= 2^31 elements
        rows_in = rm < S
        sw_e = sw_ptr + e.to(tl.int64) * stride_se
        wrow = e * R
        # chunk j covers output columns n0 + j*CH ...: its weight-scale block, and whether it has a column at all
        sw0 = sw_e + (n0 // 128) * stride_snb
        sw1 = sw_e + ((n0 + CH) // 128) * stride_snb
        sw2 = sw_e + ((n0 + 2 * CH) // 128) * stride_snb
        sw3 = sw_e + ((n0 + 3 * CH) // 128) * stride_snb
        has1 = (NCH > 1) & (n0 + CH < NOUT)
        has2 = (NCH > 2) & (n0 + 2 * CH < NOUT)
        has3 = (NCH > 3) & (n0 + 3 * CH < NOUT)
        acc0 = tl.zeros((BM, CH), tl.float32)
        acc1 = tl.zeros((BM, CH), tl.float32)
        acc2 = tl.zeros((BM, CH), tl.float32)
        acc3 = tl.zeros((BM, CH), tl.float32)
        p0 = tl.full((BM,), 1.0, tl.float32)  # the previous block's scale per row and chunk (rescale form)
        p1 = tl.full((BM,), 1.0, tl.float32)
        p2 = tl.full((BM,), 1.0, tl.float32)
        p3 = tl.full((BM,), 1.0, tl.float32)
        for k0 in range(0, K_END, BK):
            kb = k0 // BK
            xs = tl.load(xs_ptr + kb * stride_xsk + xs_off, mask=rows_in, other=1.0)
            a = a_desc.load([row_start, k0])
            acc0, p0 = _chunk(acc0, p0, a, w_desc, sw0, stride_skb, kb, k0, wrow, n0, xs, True,
                              TRANS, RESCALE, DOT_FP32)
            if NCH > 1:
                acc1, p1 = _chunk(acc1, p1, a, w_desc, sw1, stride_skb, kb, k0, wrow, n0 + CH, xs, has1,
                                  TRANS, RESCALE, DOT_FP32)
            if NCH > 2:
                acc2, p2 = _chunk(acc2, p2, a, w_desc, sw2, stride_skb, kb, k0, wrow, n0 + 2 * CH, xs, has2,
                                  TRANS, RESCALE, DOT_FP32)
                acc3, p3 = _chunk(acc3, p3, a, w_desc, sw3, stride_skb, kb, k0, wrow, n0 + 3 * CH, xs, has3,
                                  TRANS, RESCALE, DOT_FP32)
        rmask = rm < row_end
        _store_chunk(acc0, p0, y_ptr, stride_ym, stride_yn, rm, rmask, n0, NOUT, CH, RESCALE)
        if NCH > 1:
            _store_chunk(acc1, p1, y_ptr, stride_ym, stride_yn, rm, rmask, n0 + CH, NOUT, CH, RESCALE)
        if NCH > 2:
            _store_chunk(acc2, p2, y_ptr, stride_ym, stride_yn, rm, rmask, n0 + 2 * CH, NOUT, CH, RESCALE)
            _store_chunk(acc3, p3, y_ptr, stride_ym, stride_yn, rm, rmask, n0 + 3 * CH, NOUT, CH, RESCALE)


@triton.jit
def _tiles(a_desc, xs_ptr, stride_xsm, stride_xsk, w_desc, sw_ptr, stride_se, stride_skb, stride_snb,
           y_ptr, stride_ym, stride_yn, offs_ptr, map_ptr, n_tiles_m, S, E, R, NOUT, K_END, n_tiles_n, W_END,
           TRANS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CH: tl.constexpr, E_P2: tl.constexpr,
           RESCALE: tl.constexpr, PERSISTENT: tl.constexpr, NPROG: tl.constexpr, DOT_FP32: tl.constexpr,
           TILE_MAP: tl.constexpr):
    if PERSISTENT:  # work items pid, pid + NPROG, ... (n tiles fastest: neighbours share the x tile); an item past
        # the last tile finds e >= E in `expert_tile` and does nothing
        pid = tl.program_id(0)
        for t0 in range(0, W_END, NPROG):
            _tile(t0 + pid, a_desc, xs_ptr, stride_xsm, stride_xsk, w_desc, sw_ptr, stride_se, stride_skb, stride_snb,
                  y_ptr, stride_ym, stride_yn, offs_ptr, map_ptr, n_tiles_m, S, E, R, NOUT, K_END, n_tiles_n,
                  TRANS, BM, BN, CH, E_P2, RESCALE, DOT_FP32, TILE_MAP)
    else:
        _tile(tl.program_id(1) * n_tiles_n + tl.program_id(0), a_desc, xs_ptr, stride_xsm, stride_xsk,
              w_desc, sw_ptr, stride_se, stride_skb, stride_snb, y_ptr, stride_ym, stride_yn, offs_ptr, map_ptr,
              n_tiles_m, S, E, R, NOUT, K_END, n_tiles_n, TRANS, BM, BN, CH, E_P2, RESCALE, DOT_FP32, TILE_MAP)


# Shape ints and scale strides are not specialized (by divisibility): one binary per variant serves every model
# (the sweep compiles 8 variants, not 8 x 6 GEMM shapes); TMA coordinates and scalar scale loads gain nothing from it.
@triton.jit(do_not_specialize=["stride_xsm", "stride_se", "stride_skb", "stride_snb", "n_tiles_m", "S", "E", "R",
                               "NOUT", "KRED", "n_tiles_n", "n_work"])
def _fp8_hopper_kernel(
    a_desc, xs_ptr, stride_xsm, stride_xsk,
    w_desc, sw_ptr, stride_se, stride_skb, stride_snb,
    y_ptr, stride_ym, stride_yn,
    offs_ptr, map_ptr, n_tiles_m, S, E, R, NOUT, KRED, n_tiles_n, n_work, K_LOOP: tl.constexpr,
    WORK_LOOP: tl.constexpr, TRANS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CH: tl.constexpr,
    E_P2: tl.constexpr,
    RESCALE: tl.constexpr, PERSISTENT: tl.constexpr, NPROG: tl.constexpr, DOT_FP32: tl.constexpr,
    TILE_MAP: tl.constexpr,
):
    if K_LOOP > 0:  # interpreter: Python-int loop bounds (it cannot loop to a runtime scalar)
        _tiles(a_desc, xs_ptr, stride_xsm, stride_xsk, w_desc, sw_ptr, stride_se, stride_skb, stride_snb,
               y_ptr, stride_ym, stride_yn, offs_ptr, map_ptr, n_tiles_m, S, E, R, NOUT, K_LOOP, n_tiles_n,
               WORK_LOOP, TRANS, BM, BN, CH, E_P2, RESCALE, PERSISTENT, NPROG, DOT_FP32, TILE_MAP)
    else:
        _tiles(a_desc, xs_ptr, stride_xsm, stride_xsk, w_desc, sw_ptr, stride_se, stride_skb, stride_snb,
               y_ptr, stride_ym, stride_yn, offs_ptr, map_ptr, n_tiles_m, S, E, R, NOUT, KRED, n_tiles_n,
               n_work, TRANS, BM, BN, CH, E_P2, RESCALE, PERSISTENT, NPROG, DOT_FP32, TILE_MAP)


_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def fp8_grouped_mm(
    x: torch.Tensor,
    weight: GroupedWeight,
    offsets: torch.Tensor,
    *,
    trans: bool = False,
    out: torch.Tensor | None = None,
    config: HopperFp8Config | str | None = None,
    dot_fp32: bool | None = None,
    x_quant: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Grouped block-FP8 ``x @ W_e.T`` (``trans=False``: x [S, C] -> [S, R]) or ``x @ W_e`` (``trans=True``: x [S, R]
    -> [S, C]); the ``fp8_block`` path of `grouped_mm` without LoRA (same rows, offsets and output contract).

    x: bf16/fp16/fp32 [S, K] rows sorted by expert, quantized here with `quantize_act_1x128` (one pass) unless
    ``x_quant = (codes e4m3 [S, K], scale fp32 [S, ceil(K/128)])`` is given (any scale strides).
    offsets: int32 [E] END offsets on x's device. Output [S, N] in x's dtype (or ``out`` in float32: the accumulator
    unrounded, for numerics checks); rows past offsets[-1] are left unwritten.
    config: a `HopperFp8Config`, a key of `VARIANTS`, or None (`DEFAULT_VARIANT`).
    Raises ValueError where `unsupported_reason` names a reason (route those to `grouped_mm`).
    """
    E, R, C = weight.shape
    S, nout = check_operands(x, weight, offsets, trans)
    kred = x.shape[1]
    why = unsupported_reason(x, weight, trans)
    if why is not None:
        raise ValueError(f"fp8_grouped_mm: {why}; use impl.ops.dispatch.grouped_mm for these operands")
    cfg = VARIANTS[config] if isinstance(config, str) else (config or VARIANTS[DEFAULT_VARIANT])
    if dot_fp32 is None:
        dot_fp32 = interpret_mode()
    if out is None:
        out = torch.empty((S, nout), dtype=x.dtype, device=x.device)
    elif out.shape != (S, nout) or out.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"out {tuple(out.shape)} {out.dtype}: need {(S, nout)} in {x.dtype} or float32")
    if S == 0:
        return out
    if x_quant is None:
        xq, xs = quantize_act_1x128(x)
    else:
        xq, xs = x_quant
        nkb = triton.cdiv(kred, FP8_BLOCK)
        if xq.dtype != torch.float8_e4m3fn or xq.shape != (S, kred) or xs.shape != (S, nkb) or xs.dtype != torch.float32:
            raise ValueError(f"x_quant must be (e4m3 {(S, kred)}, fp32 {(S, nkb)}), got ({xq.dtype} {tuple(xq.shape)}, "
                             f"{xs.dtype} {tuple(xs.shape)})")
        if xq.stride() != (kred, 1) or xq.data_ptr() % TMA_ALIGN:
            raise ValueError(f"x_quant codes must be contiguous and 16-byte aligned, strides {xq.stride()}")
    if xs.numel() >= 2**31:  # the kernel indexes the activation scales with int32
        raise ValueError(f"activation scales {tuple(xs.shape)} have >= 2^31 elements; split the rows")
    a_desc = TensorDescriptor.from_tensor(xq, [cfg.BM, FP8_BLOCK])
    w2d = weight.data.view(E * R, C)
    w_desc = TensorDescriptor.from_tensor(w2d, [FP8_BLOCK, cfg.CH] if trans else [cfg.CH, FP8_BLOCK])
    sw = weight.scale
    n_tiles_n = triton.cdiv(nout, cfg.BN)
    n_tiles_m = triton.cdiv(S, cfg.BM) + E  # >= sum_e ceil(count_e / BM); the surplus programs exit at once
    n_work = n_tiles_m * n_tiles_n
    nprog = _num_sms(x.device) * cfg.ctas_per_sm
    grid = (min(nprog, n_work),) if cfg.persistent else (n_tiles_n, n_tiles_m)
    tiles = expert_tile_map(offsets, S, cfg.BM) if cfg.tile_map else offsets
    extra = {} if cfg.maxnreg is None or interpret_mode() else {"maxnreg": cfg.maxnreg}
    _fp8_hopper_kernel[grid](
        a_desc, xs, xs.stride(0), xs.stride(1),
        w_desc, sw, sw.stride(0), *((sw.stride(1), sw.stride(2)) if trans else (sw.stride(2), sw.stride(1))),
        out, out.stride(0), out.stride(1),
        offsets, tiles, n_tiles_m, S, E, R, nout, kred, n_tiles_n, n_work,
        K_LOOP=kred if interpret_mode() else 0, WORK_LOOP=n_work if interpret_mode() else 0,
        TRANS=trans, BM=cfg.BM, BN=cfg.BN, CH=cfg.CH, E_P2=max(16, next_pow2(E)), RESCALE=cfg.rescale,
        PERSISTENT=cfg.persistent, NPROG=nprog, DOT_FP32=dot_fp32, TILE_MAP=cfg.tile_map,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra,
    )
    return out
