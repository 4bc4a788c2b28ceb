"""Triton NF4 dequantization of a whole (flattened) tensor: the baseline `nf4_dequant_grouped_mm` path.

``packed`` uint8 ``[n/2]`` (first element in the HIGH nibble, bitsandbytes), fp32 ``absmax [n/64]`` (blocksize 64,
de-nested), ``code`` fp32 [16] -> ``out [n]`` in bf16/fp16/fp32 (``code[q] * absmax`` in fp32, then cast: the same
arithmetic as `reference.nf4.dequantize_nf4` and bitsandbytes' ``dequantize_4bit``). Needs ``n % 64 == 0``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from impl.ops.launches import tracked


@tracked
@triton.jit
def _nf4_dequant_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, NBYTES, BLOCK_BYTES: tl.constexpr):
    pid = tl.program_id(0)
    ob = pid.to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    mask = ob < NBYTES
    byte = tl.load(packed_ptr + ob, mask=mask, other=0).to(tl.int32)
    hi = tl.load(code_ptr + ((byte >> 4) & 15))
    lo = tl.load(code_ptr + (byte & 15))
    am = tl.load(absmax_ptr + ob // 32, mask=mask, other=0.0)  # 64 elements = 32 bytes per block
    vals = tl.interleave(hi * am, lo * am)
    oe = pid.to(tl.int64) * (2 * BLOCK_BYTES) + tl.arange(0, 2 * BLOCK_BYTES)
    # (oe // 2) < NBYTES, not oe < 2 * NBYTES: NBYTES in [2^30, 2^31) is specialized as int32 and 2 * NBYTES wrapped
    # negative, so nothing was stored (DeepSeek-V3 down, 3.76 G elements: garbage / NaN on the H200, 2026-11-29).
    # Verified after the fix on the H200 at 3.76 G and 7.5 G elements: bitwise equal to code[q] * absmax in torch
    # (bench/check_large_nf4.py, reports/gpu/*large-nf4*).
    tl.store(out_ptr + oe, vals.to(out_ptr.dtype.element_ty), mask=(oe // 2) < NBYTES)


def nf4_dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shape: tuple[int, ...],
    dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize to ``shape`` (numel n, n % 64 == 0); ``out`` (contiguous, ``shape``) is reused when given."""
    n = 1
    for d in shape:
        n *= d
    if n % 64 or packed.dtype != torch.uint8 or packed.numel() != n // 2 or absmax.numel() != n // 64:
        raise ValueError(f"nf4_dequantize: shape {shape} (n={n}, need n % 64 == 0), packed {packed.dtype} "
                         f"{packed.numel()} (need uint8 n/2), absmax {absmax.numel()} (need n/64)")
    if absmax.dtype != torch.float32:
        raise TypeError(f"absmax must be fp32 (de-nested), got {absmax.dtype}")
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    elif tuple(out.shape) != tuple(shape) or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {tuple(shape)}, got {tuple(out.shape)}")
    BLOCK_BYTES = 2048
    grid = (triton.cdiv(n // 2, BLOCK_BYTES),)
    _nf4_dequant_kernel[grid](packed, absmax, code, out, n // 2, BLOCK_BYTES=BLOCK_BYTES, num_warps=8)
    return out
