"""FP8 e4m3fn quantization: block / row / column / tensor scales, dequant, requant, UE8M0, activation quant.

Naming: ``scale_inv`` is always the dequantization MULTIPLIER (``w ≈ q.float() * scale_inv``), the name DeepSeek and
transformers' finegrained FP8 use for ``weight_scale_inv``. Quantizing DIVIDES by it: ``q = e4m3(w / scale_inv)``.

- Block quant (default 128×128, over the last two dims, ceil grid so edge blocks may be partial):
  ``scale_inv[b] = max(amax_b / 448, eps)``, ``q = e4m3(clamp(w / scale_inv, -448, 448))`` (fp32 arithmetic,
  round-to-nearest-even cast). An all-zero block gets ``scale_inv = eps`` and codes 0.
- UE8M0 (``ue8m0=True``): ``scale_inv`` is rounded UP to a power of two (so ``|w / scale_inv| <= 448`` still holds) and
  returned as ``torch.float8_e8m0fnu``; all arithmetic with it is fp32, never in the scale's dtype.
- e5m2 (and the fnuz variants) are refused with ``FP8FormatError``.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
FP8_DTYPE = torch.float8_e4m3fn
UE8M0_DTYPE = getattr(torch, "float8_e8m0fnu", None)
DEFAULT_BLOCK = (128, 128)
DEFAULT_EPS = 1e-12
ACT_GROUP = 128  # per-token-group activation quant of block-FP8 GEMMs (DeepSeek / transformers `act_quant`)


class FP8FormatError(ValueError):
    """An FP8 tensor/scale combination the reference refuses (wrong fp8 dtype, scale grid mismatch, ...)."""


def _check_e4m3(q: torch.Tensor, what: str = "q") -> None:
    if q.dtype != FP8_DTYPE:
        if q.dtype == torch.float8_e5m2 or "float8" in str(q.dtype):
            raise FP8FormatError(
                f"{what} has dtype {q.dtype}; only float8_e4m3fn (max 448) is supported. e5m2 / fnuz weights use a "
                "different range and are refused rather than reinterpreted"
            )
        raise FP8FormatError(f"{what} must be float8_e4m3fn, got {q.dtype}")


def round_up_pow2(x: torch.Tensor) -> torch.Tensor:
    """fp32: the smallest power of two >= x (x > 0), exactly (via frexp, no log2 rounding)."""
    mant, exp = torch.frexp(x.to(torch.float32))
    exp = torch.where(mant == 0.5, exp - 1, exp)  # x is already a power of two
    return torch.ldexp(torch.ones_like(mant), exp)


def _to_e4m3(x_over_scale: torch.Tensor) -> torch.Tensor:
    # the e4m3fn cast does not saturate (448+ -> NaN), hence the clamp
    return x_over_scale.clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def _check_block(block: tuple[int, int]) -> tuple[int, int]:
    bm, bn = (int(b) for b in block)
    if bm <= 0 or bn <= 0:
        raise FP8FormatError(f"block sizes must be positive, got {block}")
    return bm, bn


def _expand_grid(s: torch.Tensor, rows: int, cols: int, bm: int, bn: int) -> torch.Tensor:
    """[..., gr, gc] -> [..., rows, cols]: each scale covers a bm×bn tile; edge tiles are truncated (ceil grid)."""
    return s.repeat_interleave(bm, dim=-2)[..., :rows, :].repeat_interleave(bn, dim=-1)[..., :cols]


def quantize_fp8_block(
    w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK, *, eps: float = DEFAULT_EPS, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise e4m3fn quant of ``w [..., R, C]``: (q e4m3fn [..., R, C], scale_inv [..., ceil(R/bm), ceil(C/bn)]).

    ``scale_inv = max(amax_block / 448, eps)`` (fp32; UE8M0: rounded up to 2^k and stored as float8_e8m0fnu);
    ``q = e4m3(clamp(w / scale_inv, ±448))`` with the division in fp32. Inputs of any float dtype are cast to fp32
    first (bf16/fp16 exactly). Per-tensor / per-row / per-column scales are the blocks (R, C) / (1, C) / (R, 1).
    """
    if not w.is_floating_point() or w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise FP8FormatError(f"quantize_fp8_block needs a high-precision float tensor, got {w.dtype}")
    if w.ndim < 2:
        raise FP8FormatError(f"quantize_fp8_block needs [..., R, C], got shape {tuple(w.shape)}")
    bm, bn = _check_block(block)
    rows, cols = w.shape[-2:]
    x = w.to(torch.float32)
    if not torch.isfinite(x).all():
        raise FP8FormatError(f"quantize_fp8_block: input of shape {tuple(w.shape)} has non-finite values")
    gr, gc = -(-rows // bm), -(-cols // bn)
    # zero padding to the ceil grid does not change a block's amax
    padded = torch.nn.functional.pad(x, (0, gc * bn - cols, 0, gr * bm - rows))
    tiles = padded.reshape(*x.shape[:-2], gr, bm, gc, bn)
    amax = tiles.abs().amax(dim=(-3, -1))
    scale_inv = torch.clamp(amax / E4M3_MAX, min=eps)
    if ue8m0:
        scale_inv = round_up_pow2(scale_inv)
    q = _to_e4m3(x / _expand_grid(scale_inv, rows, cols, bm, bn))
    if ue8m0:
        if UE8M0_DTYPE is None:
            raise FP8FormatError(f"ue8m0 scales need torch.float8_e8m0fnu, absent in torch {torch.__version__}")
        return q, scale_inv.to(UE8M0_DTYPE)
    return q, scale_inv


def requantize_fp8_block(
    w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK, *, eps: float = DEFAULT_EPS, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Requantize a (e.g. merged) high-precision weight with freshly computed scales; same as ``quantize_fp8_block``.

    ``requantize_fp8_block(dequantize_fp8(q, s, block), block) == (q, s)`` bitwise for fp32 scales; for UE8M0 the
    dequantized values are reproduced exactly and the codes too unless a block's max |code| is <= 224 (then the
    recomputed power of two halves: ``q' = 2q, s' = s/2``). See tests/reference/test_fp8.py for the derivation.
    """
    return quantize_fp8_block(w, block, eps=eps, ue8m0=ue8m0)


def _resolve_scale(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """The fp32 multiplier broadcast to ``q.shape`` (see ``dequantize_fp8`` for the accepted scale shapes)."""
    rows, cols = q.shape[-2:]
    s = scale_inv.to(torch.float32)  # e8m0 / bf16 / fp16 scales: exact in fp32, the math is fp32
    if s.numel() == 1 and block is None:
        return s.reshape(())
    if q.ndim == 2 and s.ndim == 1 and block is None:
        if rows == cols:
            raise FP8FormatError(
                f"1-D scale of length {s.numel()} on a square {rows}x{cols} weight is ambiguous (per-row or per-column);"
                " pass it as [R, 1] (per-row) or [1, C] (per-column)"
            )
        if s.numel() == rows:
            return s[:, None]
        if s.numel() == cols:
            return s[None, :]
        raise FP8FormatError(f"1-D scale of length {s.numel()} matches neither rows={rows} nor cols={cols}")
    if s.ndim != q.ndim or s.shape[:-2] != q.shape[:-2]:
        raise FP8FormatError(
            f"scale grid shape {tuple(s.shape)} does not fit weight shape {tuple(q.shape)} (need [..., gr, gc])"
        )
    gr, gc = s.shape[-2:]
    bm, bn = _check_block(block) if block is not None else _infer_block(rows, cols, gr, gc)
    if (gr, gc) != (-(-rows // bm), -(-cols // bn)):
        raise FP8FormatError(
            f"scale grid {(gr, gc)} is not the ceil grid of weight ({rows}, {cols}) with block ({bm}, {bn}); "
            f"expected {(-(-rows // bm), -(-cols // bn))}"
        )
    return _expand_grid(s, rows, cols, bm, bn)


def _infer_block(rows: int, cols: int, gr: int, gc: int) -> tuple[int, int]:
    """Block of a scale grid when none is given, per dim: 1 block -> the whole dim; one per row/col -> 1;
    ``ceil(dim/128)`` blocks -> 128 (the block every FP8 checkpoint uses); anything else is refused.

    A grid alone does not determine the block: 192 rows in 2 row-blocks fit any block from 96 to 191, and an exact
    division (200 rows, 4 blocks -> 50) is no better a guess than the real 64. Guessing R // g silently misreads
    partial grids (transformers 5.8+ does, see tests/oracles/test_transformers_fp8.py), so other blocks are explicit.
    """
    return _infer_dim(rows, gr, "rows"), _infer_dim(cols, gc, "cols")


def _infer_dim(n: int, g: int, name: str) -> int:
    if g == 1:
        return max(n, 1)
    if g == n:
        return 1
    if g == -(-n // 128):
        return 128
    raise FP8FormatError(
        f"cannot infer the block of {g} scale blocks over {name}={n}: it is not 1, {n} or ceil({n}/128); "
        "pass block=(bm, bn)"
    )


def dequantize_fp8(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``w = q.float() * scale_inv`` broadcast, computed in fp32, then cast to ``dtype`` (float64: exact product).

    q: e4m3fn [..., R, C]. scale_inv (any float dtype incl. float8_e8m0fnu; read as fp32):
    - one element (per-tensor);
    - 2-D q only: 1-D [R] (per-row) or [C] (per-column), refused when R == C (ambiguous);
    - [..., gr, gc]: a block grid, including [..., R, 1] per-row and [..., 1, C] per-column. ``block`` is explicit, or
      inferred by ``_infer_block`` (whole dim, 1 or 128 only); the grid must be the ceil grid
      ``(ceil(R/bm), ceil(C/bn))`` (partial edge blocks).
    """
    _check_e4m3(q)
    if q.ndim < 2:
        raise FP8FormatError(f"dequantize_fp8 needs q [..., R, C], got shape {tuple(q.shape)}")
    s = _resolve_scale(q, scale_inv, block)
    if dtype == torch.float64:
        return q.to(torch.float64) * s.to(torch.float64)
    return (q.to(torch.float32) * s).to(dtype)


def quantize_rowwise(x: torch.Tensor, *, eps: float = DEFAULT_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row activation quant for a scaled grouped GEMM: (q e4m3fn [M, K], scale fp32 [M]).

    ``scale[m] = max(max_k |x[m, k]| / 448, eps)`` is the dequant MULTIPLIER (``x ≈ q * scale[:, None]``), the
    ``scale_a`` that ``torch._scaled_grouped_mm`` multiplies by.
    """
    if x.ndim != 2:
        raise FP8FormatError(f"quantize_rowwise needs x [M, K], got shape {tuple(x.shape)}")
    q, s = quantize_fp8_block(x, (1, x.shape[1]), eps=eps)
    return q, s[:, 0]


def quantize_act_groups(
    x: torch.Tensor, group: int = ACT_GROUP, *, eps: float = DEFAULT_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """1×``group`` per-token-group activation quant: (q e4m3fn [..., K], scale fp32 [..., ceil(K/group)]).

    ``scale = max(max|x_group| / 448, eps)`` (dequant multiplier), ``q = e4m3(x / scale)``. transformers' Triton
    ``act_quant`` uses ``s = max|x|/448`` without ``eps``, so an all-zero group gives 0/0 = NaN there; here it is 0.
    """
    if x.ndim < 1:
        raise FP8FormatError("quantize_act_groups needs x [..., K]")
    lead = x.shape[:-1]
    q, s = quantize_fp8_block(x.reshape(-1, 1, x.shape[-1]), (1, group), eps=eps)
    return q.reshape(x.shape), s.reshape(*lead, s.shape[-1])
