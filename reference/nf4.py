"""NF4 (4-bit NormalFloat) blockwise quantization, bit-compatible with bitsandbytes.

Format (bitsandbytes ``quantize_4bit(quant_type="nf4")``, verified against 0.50.2 by tests/oracles/test_bnb_nf4.py):

- The tensor is flattened; blocks of ``blocksize`` consecutive elements share one fp32 ``absmax``.
- Each element becomes the index ``q`` of the nearest entry of the sorted 16-value ``NF4_CODE`` to ``x / absmax``.
- Two codes per byte, the FIRST element in the HIGH nibble: ``byte = q[2i] << 4 | q[2i+1]``; an odd numel is padded
  with the code of 0.0 (index 7) in the last low nibble. ``packed`` has ``(n + 1) // 2`` bytes.
- Dequantization: ``w[i] = NF4_CODE[q[i]] * absmax[i // blocksize]`` in fp32, then cast.
- Double quantization ("nested" absmax): ``offset = mean(absmax)``; ``absmax - offset`` is quantized with the 8-bit
  signed dynamic map (``dynamic_map()``) in blocks of 256, giving uint8 codes, one fp32 absmax per 256 blocks and the
  fp32 ``offset``. ``absmax ≈ DYN[codes] * absmax2[j // 256] + offset``.

Which bitsandbytes path matches (0.50.2; tests/oracles/test_bnb_nf4.py, the CUDA part run on an H200):
- CPU ``quantize_4bit`` (default backend): bit-identical, double quant with ``nested_rounding=BNB_CPU_LUT``.
- CUDA ``quantize_4bit``: bit-identical bytes/absmax/nested codes (``NEAREST``) except: an all-zero block packs code 0
  (0x00, dequant -0.0) instead of 7; a zero partial tail stores absmax 0, not 1e-38; 4 of the 15 decision-tree
  thresholds are the fp32 midpoints +-1 ulp, so exact ties at codes 0|1, 12|13, 14|15 go up; the offset is a GPU mean.
- Dequantization: identical everywhere (CPU, CUDA), except bnb's AVX-512 CPU kernel bug (see the oracle's findings).

Everything is computed in fp32, as bitsandbytes does; float64 inputs are rounded to fp32 first (the format's arithmetic
is fp32), and ``dequantize_nf4(..., dtype=torch.float64)`` returns the exact product of the two fp32 factors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# bitsandbytes `get_4bit_type("nf4")`: quantiles of N(0, 1) normalised to [-1, 1] (QLoRA), sorted ascending.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
NF4_ZERO_INDEX = 7  # NF4_CODE[7] == 0.0; the padding nibble of an odd numel
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax in blocks of 256 (fixed)
# bitsandbytes clamps the absmax it divides by at 1e-38 so an all-zero block maps to 0/1e-38 = 0, not NaN.
ABSMAX_FLOOR = 1e-38

NEAREST = "nearest"  # exact nearest code, ties to the lower index (bnb default backend: bucketize on fp32 midpoints)
BNB_CPU_LUT = "bnb_cpu_lut"  # bnb >= 0.50.1 native CPU kernel: nearest code of the centre of one of 65536 bins
ROUNDINGS = (NEAREST, BNB_CPU_LUT)
LUT_SIZE = 65536


@dataclass
class NestedAbsmax:
    """Double-quantized absmax: ``absmax ≈ code[codes] * absmax[j // blocksize] + offset`` (all fp32).

    codes: uint8 [n_blocks]; absmax: fp32 [ceil(n_blocks / 256)]; offset: mean of the original absmax;
    code: fp32 [256] the dynamic map; blocksize: 256.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    offset: float
    code: torch.Tensor
    blocksize: int = NESTED_BLOCKSIZE


@dataclass
class NF4State:
    """Everything needed to dequantize packed NF4 data.

    absmax: fp32 [n_blocks], or None when ``nested`` holds it double-quantized; blocksize: elements per block;
    shape / dtype: of the original tensor.
    """

    absmax: torch.Tensor | None
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    nested: NestedAbsmax | None = None


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit map (``create_dynamic_map``), fp32 [2**total_bits], sorted ascending.

    For exponent ``i`` in 0..max_exponent_bits-1 it takes the midpoints of ``linspace(0.1, 1, 2**(i+e)+1)``
    (``e = total_bits-1-max_exponent_bits``; one more bit when unsigned) times ``10**(i-max_exponent_bits+1)``, and
    their negatives when signed; then 0 and 1.0. The signed default spans [-0.99297, 1.0] (there is no -1.0) with
    0.0 at index 127. The same torch ops as upstream are used so the values are bit-identical.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        n_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        data += _scaled_means(n_items, i, max_exponent_bits, signed)
    if additional_items > 0:
        # upstream reuses the last loop exponent `i` here
        data += _scaled_means(additional_items + 1, i, max_exponent_bits, signed)
    data.append(0)
    data.append(1.0)
    if len(data) != 2**total_bits:
        raise ValueError(
            f"dynamic map with {max_exponent_bits=}, {total_bits=}, {signed=} has {len(data)} entries, not {2**total_bits}"
        )
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _scaled_means(n_items: int, i: int, max_exponent_bits: int, signed: bool) -> list[float]:
    boundaries = torch.linspace(0.1, 1, n_items, dtype=torch.float32)
    means = (boundaries[:-1] + boundaries[1:]) / 2.0
    scale = 10 ** (-(max_exponent_bits - 1) + i)
    out = (scale * means).tolist()
    if signed:
        out += (-scale * means).tolist()
    return out


def nf4_max_half_gap() -> float:
    """Half the largest gap between adjacent NF4 codes: per element ``|w - dq(q(w))| <= this * absmax``."""
    return float((NF4_CODE[1:] - NF4_CODE[:-1]).max()) / 2


# ---------------------------------------------------------------- nearest-code search


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the nearest entry of the sorted fp32 ``code`` to each fp32 ``scaled``.

    Thresholds are the fp32 midpoints ``(code[i] + code[i+1]) / 2``; a value exactly on a midpoint goes to the LOWER
    index (``bucketize(right=False)``, as bitsandbytes' default backend).
    """
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, right=False)


@functools.lru_cache(maxsize=4)
def _build_lut(code: tuple[float, ...]) -> torch.Tensor:
    midpoints = torch.tensor(code, dtype=torch.float32)
    midpoints = 0.5 * (midpoints[:-1] + midpoints[1:])
    grid = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / float(LUT_SIZE - 1)
    return torch.searchsorted(midpoints, grid, side="left")


def _lut_nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes >= 0.50.1 native CPU ``quantize_blockwise``: a 65536-entry lookup table, not an exact search.

    ``lut[i]`` = number of fp32 midpoints ``0.5f * (c[k] + c[k+1])`` strictly below ``-1 + 2i/65535`` (fp32);
    a value maps to ``lut[trunc((clamp(v, -1, 1) + 1) * 0.5 * 65535 + 0.5)]`` (fp32 arithmetic).
    """
    lut = _build_lut(tuple(code.tolist()))
    v = scaled.clamp(-1.0, 1.0)
    idx = ((v + 1.0) * 0.5 * float(LUT_SIZE - 1) + 0.5).to(torch.int64)  # truncation, the value is positive
    return lut[idx]


# ---------------------------------------------------------------- 8-bit blockwise (the nested absmax)


def quantize_blockwise_8bit(
    x: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE, rounding: str = NEAREST
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of a 1-D fp32 ``x`` with a 256-entry ``code``: (uint8 [n], fp32 absmax [nb]).

    ``NEAREST`` (bnb default backend): ``absmax = max|x|`` per block; full blocks use ``x * (1/max(absmax, 1e-38))``,
    a partial last block ``x / max(absmax, 1e-38)`` and stores the clamped absmax; then ``nearest_code``.
    ``BNB_CPU_LUT`` (bnb native CPU kernel): ``x * (1/absmax)`` then ``_lut_nearest``; an all-zero block gets code 0.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    flat = x.reshape(-1).to(torch.float32)
    if rounding == NEAREST:
        scaled, absmax = _scale_blocks(flat, blocksize)
        return nearest_code(scaled, code).to(torch.uint8), absmax
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, (-n) % blocksize)).reshape(-1, blocksize)
    absmax = padded.abs().amax(dim=1)
    safe = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    scaled = (padded * (1.0 / safe)[:, None]).reshape(-1)[:n]
    q = _lut_nearest(scaled, code)
    zero_block = (absmax == 0).repeat_interleave(blocksize)[:n]
    q = torch.where(zero_block, torch.zeros_like(q), q)
    return q.to(torch.uint8), absmax


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """fp32 [n]: ``code[codes[i]] * absmax[i // blocksize]`` (fp32 product)."""
    flat = codes.reshape(-1).to(torch.int64)
    return code[flat] * absmax.repeat_interleave(blocksize)[: flat.numel()]


def _scale_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' normalisation of fp32 [n] into [-1, 1] per block: (scaled fp32 [n], absmax fp32 [nb]).

    Full blocks: ``clamp(x * (1 / max(absmax, 1e-38)), -1, 1)``, absmax stored unclamped (0 for a zero block).
    Partial last block: ``clamp(x / max(absmax, 1e-38), -1, 1)`` (a division, not a reciprocal multiply) and its
    absmax is stored CLAMPED (1e-38 for a zero tail). Both quirks are upstream's; they matter only bitwise.
    """
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].reshape(-1, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=ABSMAX_FLOOR))[:, None], -1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=ABSMAX_FLOOR)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return scaled, absmax


# ---------------------------------------------------------------- nibble packing


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [(n+1)//2] from 4-bit codes [n]: ``q[2i] << 4 | q[2i+1]`` (first element HIGH), odd n padded with 7."""
    q8 = q.reshape(-1).to(torch.uint8)
    if q8.numel() % 2:
        q8 = torch.cat([q8, q8.new_full((1,), NF4_ZERO_INDEX)])
    return (q8[0::2] << 4) | q8[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """4-bit codes int64 [n] from uint8 packed bytes (any shape, e.g. bnb's [(n+1)//2, 1]); inverse of pack_nibbles."""
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)  # bnb's quant_storage may be another 1-byte or wider dtype
    if flat.numel() != (n + 1) // 2:
        raise ValueError(f"packed NF4 data has {flat.numel()} bytes, expected (n+1)//2 = {(n + 1) // 2} for n={n}")
    q = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    return q[:n].to(torch.int64)


# ---------------------------------------------------------------- NF4


def quantize_nf4(
    w: torch.Tensor, blocksize: int = 64, double_quant: bool = False, nested_rounding: str = NEAREST
) -> tuple[torch.Tensor, NF4State]:
    """Quantize ``w`` (any shape, fp16/bf16/fp32/fp64) to NF4: (packed uint8 [(n+1)//2], NF4State).

    ``q = nearest_code(clamp(w_blk / absmax_blk, -1, 1), NF4_CODE)`` per block (see ``_scale_blocks`` for the exact
    fp32 arithmetic). ``double_quant`` stores the absmax as ``NestedAbsmax``; ``nested_rounding`` chooses how those
    8-bit codes are rounded: ``NEAREST`` (the spec; bnb's default backend) or ``BNB_CPU_LUT`` (bnb's native CPU kernel,
    which is what ``quantize_4bit(compress_statistics=True)`` runs on CPU in bitsandbytes >= 0.50.1).
    """
    if w.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"quantize_nf4 needs a floating tensor (fp16/bf16/fp32/fp64), got {w.dtype}")
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor of shape {tuple(w.shape)}")
    flat = w.reshape(-1).to(torch.float32)
    if not torch.isfinite(flat).all():
        raise ValueError(f"quantize_nf4: input of shape {tuple(w.shape)} has non-finite values")
    scaled, absmax = _scale_blocks(flat, blocksize)
    packed = pack_nibbles(nearest_code(scaled, NF4_CODE))
    state = NF4State(absmax=absmax, blocksize=blocksize, shape=w.shape, dtype=w.dtype)
    if double_quant:
        state = _nest(state, nested_rounding)
    return packed, state


def _nest(state: NF4State, rounding: str) -> NF4State:
    absmax = state.absmax
    offset = absmax.mean()  # fp32 torch mean, the same reduction bitsandbytes uses
    code = dynamic_map(signed=True)
    codes, absmax2 = quantize_blockwise_8bit(absmax - offset, code, NESTED_BLOCKSIZE, rounding)
    nested = NestedAbsmax(codes=codes, absmax=absmax2, offset=float(offset), code=code)
    return NF4State(absmax=None, blocksize=state.blocksize, shape=state.shape, dtype=state.dtype, nested=nested)


def absmax_of(state: NF4State) -> torch.Tensor:
    """fp32 [n_blocks] absmax; for a nested state ``code[codes] * absmax2[j // 256] + offset`` (fp32, as bnb)."""
    if state.nested is None:
        if state.absmax is None:
            raise ValueError("NF4State has neither absmax nor nested absmax")
        return state.absmax.to(torch.float32)
    nst = state.nested
    deq = dequantize_blockwise_8bit(nst.codes, nst.absmax.to(torch.float32), nst.code, nst.blocksize)
    return deq + torch.tensor(nst.offset, dtype=torch.float32)


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """Tensor[state.shape]: ``NF4_CODE[q[i]] * absmax[i // blocksize]``.

    The product is fp32 (bit-identical to bitsandbytes) and then cast to ``dtype``; for ``dtype=torch.float64`` the
    product of the two fp32 factors is formed exactly in float64. ``dtype=None`` means ``state.dtype``.
    """
    dtype = state.dtype if dtype is None else dtype
    n = 1
    for d in state.shape:
        n *= d
    q = unpack_nibbles(packed, n)
    absmax = absmax_of(state)
    n_blocks = -(-n // state.blocksize)
    if absmax.numel() != n_blocks:
        raise ValueError(f"absmax has {absmax.numel()} entries, expected ceil({n}/{state.blocksize}) = {n_blocks}")
    per_elem = absmax.repeat_interleave(state.blocksize)[:n]
    if dtype == torch.float64:
        out = NF4_CODE.double()[q] * per_elem.double()
    else:
        out = (NF4_CODE[q] * per_elem).to(dtype)
    return out.reshape(state.shape)
