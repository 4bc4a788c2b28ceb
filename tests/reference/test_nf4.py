"""Properties of reference/nf4.py: codebook, nibble order, round-trip bounds, requant identity, double quant."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from reference import nf4

FP32_EPS = 2.0**-23  # unit roundoff of fp32 is 2^-24; 2^-23 leaves room for two roundings


def _w(n: int, seed: int, scale_exp: int, dtype: torch.dtype, zero_blocks: int, blocksize: int) -> torch.Tensor:
    """n Gaussian values times 2^scale_exp in `dtype`, the first `zero_blocks` blocks set to 0."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * 2.0**scale_exp
    w[: zero_blocks * blocksize] = 0
    return w.to(dtype)


cases = given(
    n=st.integers(1, 700),
    blocksize=st.sampled_from([32, 64, 128, 256, 100]),
    seed=st.integers(0, 2**16),
    scale_exp=st.integers(-20, 12),  # randn * 2^12 stays below fp16's max 65504
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    zero_blocks=st.integers(0, 2),
)
pins = [
    example(n=128, blocksize=64, seed=0, scale_exp=0, dtype=torch.float32, zero_blocks=2),  # all-zero tensor
    example(n=130, blocksize=64, seed=1, scale_exp=0, dtype=torch.float32, zero_blocks=1),  # zero block + tail of 2
    example(n=1, blocksize=64, seed=2, scale_exp=0, dtype=torch.float32, zero_blocks=0),  # odd numel, one element
    example(n=99, blocksize=64, seed=3, scale_exp=-3, dtype=torch.bfloat16, zero_blocks=0),  # odd, partial block
    example(n=200, blocksize=128, seed=4, scale_exp=3, dtype=torch.float16, zero_blocks=0),  # not a multiple of 128
    example(n=640, blocksize=256, seed=5, scale_exp=-14, dtype=torch.float16, zero_blocks=0),  # fp16 subnormals
]


def _apply(fn, decorators):
    for d in decorators:
        fn = d(fn)
    return fn


def test_codebook_shape_order_and_zero():
    c = nf4.NF4_CODE
    assert c.dtype == torch.float32 and c.shape == (16,)
    assert bool((c[1:] > c[:-1]).all()), "NF4 code must be strictly increasing (bucketize relies on it)"
    assert c[0] == -1.0 and c[-1] == 1.0 and c[nf4.NF4_ZERO_INDEX] == 0.0


def test_half_gap_is_derived_from_the_codebook():
    # the largest gap is the bottom one, -1.0 to -0.69619 (the code is asymmetric: 7 negative, 8 positive values)
    gaps = [float(b) - float(a) for a, b in zip(nf4.NF4_CODE[:-1].tolist(), nf4.NF4_CODE[1:].tolist(), strict=True)]
    assert nf4.nf4_max_half_gap() == pytest.approx(max(gaps) / 2, rel=1e-7)
    assert 0.151 < nf4.nf4_max_half_gap() < 0.152


def test_nibble_order_first_element_high():
    # w = [1, -1]: absmax 1, codes 15 (1.0) and 0 (-1.0); bnb packs the FIRST element in the HIGH nibble -> 0xF0
    packed, _ = nf4.quantize_nf4(torch.tensor([1.0, -1.0]))
    assert packed.tolist() == [0xF0]
    # odd numel: the missing second element is padded with the code of 0.0 (index 7) -> 0xF7
    packed, _ = nf4.quantize_nf4(torch.tensor([1.0]))
    assert packed.tolist() == [0xF7]
    q = torch.tensor([3, 12, 5])
    assert nf4.pack_nibbles(q).tolist() == [3 * 16 + 12, 5 * 16 + 7]
    assert nf4.unpack_nibbles(nf4.pack_nibbles(q), 3).tolist() == [3, 12, 5]


def test_ties_go_to_the_lower_code():
    # a value exactly on the fp32 midpoint between codes 8 and 9 must get code 8 (bucketize right=False)
    mid = (nf4.NF4_CODE[8] + nf4.NF4_CODE[9]) / 2
    assert int(nf4.nearest_code(mid[None], nf4.NF4_CODE)) == 8
    assert int(nf4.nearest_code(torch.nextafter(mid, torch.tensor(1.0))[None], nf4.NF4_CODE)) == 9


def _roundtrip_bound(n, blocksize, seed, scale_exp, dtype, zero_blocks):
    w = _w(n, seed, scale_exp, dtype, zero_blocks, blocksize)
    packed, state = nf4.quantize_nf4(w, blocksize=blocksize)
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 1) // 2,)
    assert state.absmax.shape == (-(-n // blocksize),)
    out = nf4.dequantize_nf4(packed, state, dtype=torch.float64)
    assert out.shape == w.shape
    w64 = w.double()
    per_elem_absmax = state.absmax.double().repeat_interleave(blocksize)[:n]
    # the stored absmax is the block max |w| exactly; bnb floors it at 1e-38 only in a zero PARTIAL tail block
    ref_absmax = torch.nn.functional.pad(w64.abs(), (0, (-n) % blocksize)).reshape(-1, blocksize).amax(1).float()
    if n % blocksize and ref_absmax[-1] == 0:
        ref_absmax[-1] = nf4.ABSMAX_FLOOR
    assert torch.equal(state.absmax, ref_absmax)
    # |w/a - code| <= max_gap/2 for the nearest code; x a, plus two fp32 roundings (w/a and code*a) -> 2^-23 a
    bound = (nf4.nf4_max_half_gap() + FP32_EPS) * per_elem_absmax
    err = (w64 - out).abs()
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max())}"
    # zero blocks reconstruct exactly
    assert bool((out[w64 == 0] == 0).all())


test_roundtrip_error_bound = _apply(_roundtrip_bound, [cases, *pins])


def _codes_are_nearest(n, blocksize, seed, scale_exp, dtype, zero_blocks):
    # independent check in float64: the chosen code minimises |w/a - code| (ties within fp32 rounding allowed)
    w = _w(n, seed, scale_exp, dtype, zero_blocks, blocksize)
    packed, state = nf4.quantize_nf4(w, blocksize=blocksize)
    q = nf4.unpack_nibbles(packed, n)
    a = state.absmax.double().repeat_interleave(blocksize)[:n]
    s = torch.where(a > 0, w.double() / a.clamp(min=1e-300), torch.zeros_like(a))
    dist = (s[:, None] - nf4.NF4_CODE.double()[None, :]).abs()
    chosen = dist.gather(1, q[:, None])[:, 0]
    assert bool((chosen <= dist.min(1).values + 2 * FP32_EPS).all())


test_codes_are_nearest = _apply(_codes_are_nearest, [cases, *pins])


def _requant_identity(n, blocksize, seed, scale_exp, dtype, zero_blocks):
    # requant(dequant(q)) == q bitwise: each block's max element has |w/a| = 1 -> code ±1, so the dequantized block's
    # absmax is exactly a; every other dequantized value is code*a, and (code*a)/a is code within 1 ulp, far closer
    # than the smallest gap (0.0796), so the same code is chosen. Zero blocks stay 0 with the same stored absmax.
    w = _w(n, seed, scale_exp, dtype, zero_blocks, blocksize)
    packed, state = nf4.quantize_nf4(w, blocksize=blocksize)
    deq = nf4.dequantize_nf4(packed, state, dtype=torch.float32)
    packed2, state2 = nf4.quantize_nf4(deq, blocksize=blocksize)
    assert torch.equal(packed2, packed)
    assert torch.equal(state2.absmax, state.absmax)


test_requant_of_dequant_is_identity = _apply(_requant_identity, [cases, *pins])


def test_fp32_dequant_is_the_rounded_exact_product():
    w = _w(333, 7, 0, torch.float32, 1, 64)
    packed, state = nf4.quantize_nf4(w)
    exact = nf4.dequantize_nf4(packed, state, dtype=torch.float64)
    # fp32 product of two fp32 numbers == exact (float64) product rounded once to fp32
    assert torch.equal(nf4.dequantize_nf4(packed, state, dtype=torch.float32), exact.float())
    assert nf4.dequantize_nf4(packed, state, dtype=None).dtype == torch.float32
    assert torch.equal(nf4.dequantize_nf4(packed, state, dtype=torch.bfloat16), exact.float().bfloat16())


def test_shapes_are_kept_and_blocks_run_over_the_flat_tensor():
    w = _w(3 * 50, 3, 0, torch.float32, 0, 64).reshape(3, 50)
    packed, state = nf4.quantize_nf4(w)
    assert state.shape == (3, 50) and state.absmax.shape == (3,)  # ceil(150/64): blocks cross rows
    flat_packed, _ = nf4.quantize_nf4(w.reshape(-1))
    assert torch.equal(packed, flat_packed)
    assert nf4.dequantize_nf4(packed, state).shape == (3, 50)


def test_float64_input_is_rounded_to_fp32_first():
    w = _w(64, 4, 0, torch.float32, 0, 64).double() + 1e-12  # the 1e-12 is lost in fp32 for |w| >> 1e-5
    packed, state = nf4.quantize_nf4(w)
    packed32, state32 = nf4.quantize_nf4(w.float())
    assert torch.equal(packed, packed32) and torch.equal(state.absmax, state32.absmax)
    assert state.dtype == torch.float64


@pytest.mark.parametrize(
    ("w", "err"),
    [
        (torch.tensor([1, 2, 3]), TypeError),
        (torch.empty(0), ValueError),
        (torch.tensor([1.0, float("nan")]), ValueError),
        (torch.tensor([1.0, float("inf")]), ValueError),
    ],
)
def test_bad_inputs_are_refused(w, err):
    with pytest.raises(err):
        nf4.quantize_nf4(w)


def test_bad_blocksize_and_packed_length_are_refused():
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize_nf4(torch.ones(4), blocksize=0)
    packed, state = nf4.quantize_nf4(torch.ones(10))
    with pytest.raises(ValueError, match="bytes"):
        nf4.dequantize_nf4(packed[:-1], state)


# ---------------------------------------------------------------- dynamic map and double quant


def test_dynamic_map_matches_its_closed_form():
    # signed dynamic map: for i in 0..6, 10^(i-6) * (0.1 + (j+0.5) * 0.9/2^i), j < 2^i, both signs; plus 0 and 1.
    expected = [0.0, 1.0]
    for i in range(7):
        for j in range(2**i):
            v = 10.0 ** (i - 6) * (0.1 + (j + 0.5) * 0.9 / 2**i)
            expected += [v, -v]
    expected = torch.tensor(sorted(expected), dtype=torch.float64)
    m = nf4.dynamic_map()
    assert m.dtype == torch.float32 and m.shape == (256,)
    assert bool((m[1:] > m[:-1]).all())
    assert m[127] == 0 and m[255] == 1.0 and m[0] > -1.0  # no -1.0 entry: -1 maps to -0.99297
    # fp32 linspace/mean/scale rounding: within a few ulps of the closed form
    assert torch.allclose(m.double(), expected, rtol=4 * FP32_EPS, atol=0)


def _nested_bound(n, blocksize, seed, scale_exp, dtype, zero_blocks, rounding):
    w = _w(n, seed, scale_exp, dtype, zero_blocks, blocksize)
    packed, plain = nf4.quantize_nf4(w, blocksize=blocksize)
    packed_dq, state = nf4.quantize_nf4(w, blocksize=blocksize, double_quant=True, nested_rounding=rounding)
    assert torch.equal(packed, packed_dq)  # codes depend on the exact absmax, not on how it is stored
    assert state.absmax is None and state.nested.codes.dtype == torch.uint8
    nb = plain.absmax.numel()
    assert state.nested.codes.shape == (nb,) and state.nested.absmax.shape == (-(-nb // 256),)
    assert state.nested.offset == float(plain.absmax.mean())
    dyn = nf4.dynamic_map().double()
    # nearest-code error in normalised units: half the largest gap, or the distance from -1 to the lowest code
    half_gap = max(float((dyn[1:] - dyn[:-1]).max()) / 2, 1.0 + float(dyn[0]))
    if rounding == nf4.BNB_CPU_LUT:
        half_gap += 1.0 / (nf4.LUT_SIZE - 1)  # the value is first moved to the centre of a bin of width 2/65535
    a2 = state.nested.absmax.double().repeat_interleave(256)[:nb]
    err = (nf4.absmax_of(state).double() - plain.absmax.double()).abs()
    # + fp32 roundings of (absmax - offset), code*absmax2 and + offset, each <= 2^-24 of a magnitude <= 2 max absmax
    slack = 4 * FP32_EPS * float(plain.absmax.max())
    assert bool((err <= half_gap * a2 + slack).all())


@cases
@pins[0]
@pins[1]
@pins[2]
@pins[3]
@example(n=64 * 300, blocksize=64, seed=6, scale_exp=0, dtype=torch.float32, zero_blocks=0)  # > 256 blocks
def test_double_quant_absmax_error_bound(n, blocksize, seed, scale_exp, dtype, zero_blocks):
    for rounding in nf4.ROUNDINGS:
        _nested_bound(n, blocksize, seed, scale_exp, dtype, zero_blocks, rounding)


def test_double_quant_requant_keeps_packed_codes():
    # dequant(nested) uses the reconstructed absmax a_r; requantizing gives the same packed codes and stores a_r
    # (precondition: every reconstructed absmax is > 0, true here: errors ~0.01 against absmax ~1.5-4)
    w = _w(64 * 40 + 5, 8, 0, torch.float32, 1, 64)
    packed, state = nf4.quantize_nf4(w, double_quant=True)
    deq = nf4.dequantize_nf4(packed, state)
    packed2, state2 = nf4.quantize_nf4(deq)
    assert torch.equal(packed2, packed)
    # a zero block reconstructs to DYN[q]*a2 + offset != 0, but its codes are all "0.0", so it dequantizes to 0
    nonzero = nf4.quantize_nf4(w)[1].absmax > 0
    assert torch.equal(state2.absmax[nonzero], nf4.absmax_of(state)[nonzero])
    assert bool((state2.absmax[~nonzero] == 0).all())


def test_single_block_nested_offset_carries_the_absmax():
    # one block: absmax - mean == 0, an all-zero 8-bit block; the absmax survives entirely in the offset
    w = _w(64, 9, 0, torch.float32, 0, 64)
    for rounding in nf4.ROUNDINGS:
        _, state = nf4.quantize_nf4(w, double_quant=True, nested_rounding=rounding)
        assert float(nf4.absmax_of(state)) == float(w.abs().max())
    # one nested block of 1 < 256 values is a PARTIAL block: the default backend stores its absmax floored at 1e-38,
    # the native CPU kernel stores 0
    floor = float(torch.tensor(nf4.ABSMAX_FLOOR, dtype=torch.float32))
    assert nf4.quantize_nf4(w, double_quant=True)[1].nested.absmax.tolist() == [floor]
    assert nf4.quantize_nf4(w, double_quant=True, nested_rounding=nf4.BNB_CPU_LUT)[1].nested.absmax.tolist() == [0.0]
    # the two roundings store different (irrelevant) codes for that zero block: nearest -> 0.0 (127), LUT -> 0
    assert nf4.quantize_nf4(w, double_quant=True)[1].nested.codes.tolist() == [127]
    lut_state = nf4.quantize_nf4(w, double_quant=True, nested_rounding=nf4.BNB_CPU_LUT)[1]
    assert lut_state.nested.codes.tolist() == [0]


def test_lut_rounding_is_not_nearest_for_tiny_values():
    # bins are 2/65535 = 3.05e-5 wide, but the dynamic map has codes 5.5e-7, 3.25e-6, 7.75e-6 ... near 0: a value of
    # 1e-5 is moved to the bin centre 1.526e-5 and gets the code nearest THAT (1.525e-5), not the nearest to 1e-5.
    dyn = nf4.dynamic_map()
    x = torch.tensor([1e-5, 1.0])  # the 1.0 fixes the block absmax at 1
    near, _ = nf4.quantize_blockwise_8bit(x, dyn, 256, nf4.NEAREST)
    lut, _ = nf4.quantize_blockwise_8bit(x, dyn, 256, nf4.BNB_CPU_LUT)
    d = (dyn.double() - 1e-5).abs()
    assert int(near[0]) == int(d.argmin())
    assert int(lut[0]) != int(near[0]) and float(d[int(lut[0])]) > float(d[int(near[0])])
    assert int(near[1]) == int(lut[1]) == 255


def test_unknown_rounding_is_refused():
    with pytest.raises(ValueError, match="rounding"):
        nf4.quantize_nf4(torch.ones(4), double_quant=True, nested_rounding="stochastic")
