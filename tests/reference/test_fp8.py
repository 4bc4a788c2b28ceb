"""Properties of reference/fp8.py: scale direction, round-trip bounds, requant identity, scale shapes, UE8M0."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from reference import fp8

# e4m3fn: 3 mantissa bits. A normal y in [2^e, 2^(e+1)) has spacing 2^(e-3); round-to-nearest errs by at most half
# of it, 2^(e-4) <= 2^-4 |y|. Below the smallest normal 2^-6 the spacing is the subnormal step 2^-9, so the error is
# at most 2^-10 (in units of y = w / scale_inv, i.e. 2^-10 * scale_inv in units of w).
E4M3_REL = 2.0**-4
E4M3_SUBNORMAL_HALF_STEP = 2.0**-10
FP32_EPS = 2.0**-23  # two fp32 roundings (w / s and q * s), each <= 2^-24 relative


def _u8(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def _weights(rows, cols, seed, scale_exp, dtype, zero_block, experts=0):
    g = torch.Generator().manual_seed(seed)
    shape = (experts, rows, cols) if experts else (rows, cols)
    w = torch.randn(shape, generator=g) * 2.0**scale_exp
    # heavy-tailed outliers so blocks have different amax
    w = w * (1 + 9 * (torch.rand(shape, generator=g) < 0.01))
    if zero_block:
        w[..., :64, :64] = 0
    return w.to(dtype)


def _block_loop_scale(w: torch.Tensor, bm: int, bn: int, eps: float) -> torch.Tensor:
    """Independent float64 definition of scale_inv over the ceil grid, block by block; rounded once to fp32."""
    rows, cols = w.shape
    gr, gc = math.ceil(rows / bm), math.ceil(cols / bn)
    s = torch.empty(gr, gc, dtype=torch.float64)
    for i in range(gr):
        for j in range(gc):
            amax = w[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn].double().abs().max()
            s[i, j] = max(float(amax) / 448.0, float(torch.tensor(eps, dtype=torch.float32)))
    # fl32(a / 448) == round_to_fp32(a / 448 computed in float64): double rounding is innocuous for division when
    # the wide format has >= 2p+2 bits (53 >= 2*24+2)
    return s.float()


shapes = given(
    rows=st.integers(1, 200),
    cols=st.integers(1, 200),
    block=st.sampled_from([(128, 128), (64, 128), (1, 128), (32, 32), (128, 1)]),
    seed=st.integers(0, 2**16),
    scale_exp=st.integers(-30, 8),  # x10 outliers of randn * 2^8 stay below fp16 max 65504
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    zero_block=st.booleans(),
)


def _pins(fn):
    fn = example(rows=256, cols=256, block=(128, 128), seed=0, scale_exp=0, dtype=torch.float32, zero_block=True)(fn)
    fn = example(rows=200, cols=136, block=(128, 128), seed=1, scale_exp=0, dtype=torch.bfloat16, zero_block=False)(fn)
    fn = example(rows=192, cols=129, block=(128, 128), seed=2, scale_exp=-8, dtype=torch.float16, zero_block=True)(fn)
    fn = example(rows=1, cols=1, block=(128, 128), seed=3, scale_exp=0, dtype=torch.float32, zero_block=False)(fn)
    fn = example(rows=64, cols=64, block=(128, 128), seed=4, scale_exp=0, dtype=torch.float32, zero_block=True)(fn)
    # tiny values: amax/448 < eps, so the eps floor sets the scale and codes are not full-range
    fn = example(rows=130, cols=70, block=(64, 128), seed=5, scale_exp=-45, dtype=torch.float32, zero_block=False)(fn)
    return fn


def test_scale_direction_is_a_dequant_multiplier():
    # amax 896 -> scale_inv = 896 / 448 = 2: the weight is DIVIDED by 2 to quantize, the code MULTIPLIED by 2 back
    w = torch.full((4, 4), 3.0)
    w[0, 0] = 896.0
    q, s = fp8.quantize_fp8_block(w)
    assert s.tolist() == [[2.0]]
    assert q.float()[0, 0] == 448.0 and q.float()[1, 1] == 1.5
    assert fp8.dequantize_fp8(q, s)[1, 1] == 3.0


@shapes
@_pins
def test_scale_inv_matches_blockwise_definition(rows, cols, block, seed, scale_exp, dtype, zero_block):
    w = _weights(rows, cols, seed, scale_exp, dtype, zero_block)
    q, s = fp8.quantize_fp8_block(w, block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32
    assert torch.equal(s, _block_loop_scale(w, *block, fp8.DEFAULT_EPS))


@shapes
@_pins
def test_roundtrip_error_bound(rows, cols, block, seed, scale_exp, dtype, zero_block):
    w = _weights(rows, cols, seed, scale_exp, dtype, zero_block)
    q, s = fp8.quantize_fp8_block(w, block)
    out = fp8.dequantize_fp8(q, s, block, dtype=torch.float64)
    s_elem = s.double().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    w64 = w.double()
    bound = (E4M3_REL + FP32_EPS) * w64.abs() + E4M3_SUBNORMAL_HALF_STEP * s_elem
    err = (out - w64).abs()
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max())}"
    assert bool((out[w64 == 0] == 0).all())


@shapes
@_pins
def test_requant_of_dequant_is_bitwise_identity(rows, cols, block, seed, scale_exp, dtype, zero_block):
    # Why it holds with a RECOMPUTED scale: s = fl(a/448). The block max code is 448 (a/s = 448(1±2^-23) rounds or
    # clamps to 448), so the dequantized block's amax is fl(448 s), and fl(fl(448 s)/448) == s for every s of that
    # form (test_recomputed_scale_is_the_same below checks all 2^23 mantissas). Same scale -> each code q is
    # recovered: fl(q s)/s = q (1 ± 2^-23), far inside half an e4m3 step. The eps floor and zero blocks give s = eps
    # both times (the dequantized amax cannot exceed the original).
    w = _weights(rows, cols, seed, scale_exp, dtype, zero_block)
    q, s = fp8.quantize_fp8_block(w, block)
    q2, s2 = fp8.requantize_fp8_block(fp8.dequantize_fp8(q, s, block), block)
    assert torch.equal(_u8(q2), _u8(q)) and torch.equal(s2, s)


def test_recomputed_scale_is_the_same():
    # all fp32 mantissas of one binade (the property is invariant under powers of two away from under/overflow)
    a = (torch.arange(2**23, dtype=torch.int32) | (127 << 23)).view(torch.float32)
    s = a / 448.0
    assert torch.equal((s * 448.0) / 448.0, s)
    # ... and it is a property of s = fl(a/448), not of any fp32 s: ~11% of arbitrary mantissas fail
    assert int(((a * 448.0) / 448.0 != a).sum()) > 2**19


def test_all_zero_blocks():
    w = torch.zeros(256, 200)
    w[128:, 128:] = torch.randn(128, 72)
    q, s = fp8.quantize_fp8_block(w)
    eps32 = float(torch.tensor(fp8.DEFAULT_EPS, dtype=torch.float32))
    assert s[0, 0] == eps32 and s[0, 1] == eps32 and s[1, 0] == eps32 and s[1, 1] > eps32
    assert bool((_u8(q[:128]) == 0).all())
    assert bool((fp8.dequantize_fp8(q, s)[:128] == 0).all())


def test_float64_input_and_output():
    w = torch.randn(130, 260, dtype=torch.float64)
    q, s = fp8.quantize_fp8_block(w)
    q32, s32 = fp8.quantize_fp8_block(w.float())
    assert torch.equal(_u8(q), _u8(q32)) and torch.equal(s, s32)  # the format's arithmetic is fp32
    exact = fp8.dequantize_fp8(q, s, dtype=torch.float64)
    assert torch.equal(fp8.dequantize_fp8(q, s), exact.float())  # fp32 product == exact product rounded once


# ---------------------------------------------------------------- scale shapes


def _explicit(q, per_elem_scale):
    return q.double() * per_elem_scale


@pytest.fixture
def qr():
    g = torch.Generator().manual_seed(11)
    return (torch.randn(6, 10, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)


def test_per_tensor_scale(qr):
    for s in (torch.tensor(0.5), torch.tensor([0.5]), torch.tensor([[0.5]])):
        assert torch.equal(fp8.dequantize_fp8(qr, s, dtype=torch.float64), _explicit(qr, 0.5))


def test_per_row_and_per_column_scales(qr):
    rows = torch.arange(1, 7, dtype=torch.float32) / 8
    cols = torch.arange(1, 11, dtype=torch.float32) / 16
    want_r = _explicit(qr, rows.double()[:, None])
    want_c = _explicit(qr, cols.double()[None, :])
    assert torch.equal(fp8.dequantize_fp8(qr, rows, dtype=torch.float64), want_r)
    assert torch.equal(fp8.dequantize_fp8(qr, rows[:, None], dtype=torch.float64), want_r)
    assert torch.equal(fp8.dequantize_fp8(qr, cols, dtype=torch.float64), want_c)
    assert torch.equal(fp8.dequantize_fp8(qr, cols[None, :], dtype=torch.float64), want_c)


def test_square_1d_scale_is_ambiguous():
    q = torch.zeros(4, 4).to(torch.float8_e4m3fn)
    with pytest.raises(fp8.FP8FormatError, match="ambiguous"):
        fp8.dequantize_fp8(q, torch.ones(4))


def test_block_grid_with_partial_edges_and_experts():
    w = _weights(200, 300, 12, 0, torch.float32, True, experts=3)
    q, s = fp8.quantize_fp8_block(w)
    assert s.shape == (3, 2, 3)
    out = fp8.dequantize_fp8(q, s, dtype=torch.float64)
    for e in range(3):
        for i, (r0, r1) in enumerate([(0, 128), (128, 200)]):
            for j, (c0, c1) in enumerate([(0, 128), (128, 256), (256, 300)]):
                want = q[e, r0:r1, c0:c1].double() * float(s[e, i, j])
                assert torch.equal(out[e, r0:r1, c0:c1], want)
        assert torch.equal(_u8(q[e]), _u8(fp8.quantize_fp8_block(w[e])[0]))  # experts are independent


def test_grid_inference_prefers_128_over_an_exact_division():
    # 192 rows with a [2, 2] grid: 192/2 = 96 divides exactly, but the checkpoint block is 128 (transformers 5.8+
    # infers 96 here, see tests/oracles/test_transformers_fp8.py)
    w = _weights(192, 256, 13, 0, torch.float32, False)
    q, s = fp8.quantize_fp8_block(w)
    assert torch.equal(fp8.dequantize_fp8(q, s), fp8.dequantize_fp8(q, s, block=(128, 128)))
    assert not torch.equal(fp8.dequantize_fp8(q, s), fp8.dequantize_fp8(q, s, block=(96, 128)))


def test_non_128_grids_need_an_explicit_block():
    # 200 rows in 4 row-blocks of 64: 200/4 = 50 divides exactly but is wrong, so no block is guessed
    w = _weights(200, 256, 14, 0, torch.float32, False)
    q, s = fp8.quantize_fp8_block(w, (64, 64))
    with pytest.raises(fp8.FP8FormatError, match="infer"):
        fp8.dequantize_fp8(q, s)
    assert torch.equal(fp8.dequantize_fp8(q, s, block=(64, 64)), q.float() * _expand(s, 64, 64, 200, 256))
    with pytest.raises(fp8.FP8FormatError, match="ceil grid"):
        fp8.dequantize_fp8(q, s, block=(128, 128))
    with pytest.raises(fp8.FP8FormatError, match="does not fit"):
        fp8.dequantize_fp8(q, s[None])


def _expand(s, bm, bn, rows, cols):
    return s.repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]


def test_e5m2_and_other_dtypes_are_refused():
    q = torch.zeros(4, 4, dtype=torch.float8_e5m2)
    with pytest.raises(fp8.FP8FormatError, match="e5m2"):
        fp8.dequantize_fp8(q, torch.tensor(1.0))
    with pytest.raises(fp8.FP8FormatError, match="float8_e4m3fn"):
        fp8.dequantize_fp8(torch.zeros(4, 4), torch.tensor(1.0))
    with pytest.raises(fp8.FP8FormatError):
        fp8.quantize_fp8_block(q)
    with pytest.raises(fp8.FP8FormatError, match="non-finite"):
        fp8.quantize_fp8_block(torch.tensor([[1.0, float("nan")]]))


# ---------------------------------------------------------------- UE8M0


@shapes
@_pins
def test_ue8m0_scales(rows, cols, block, seed, scale_exp, dtype, zero_block):
    w = _weights(rows, cols, seed, scale_exp, dtype, zero_block)
    q, s = fp8.quantize_fp8_block(w, block, ue8m0=True)
    assert s.dtype == torch.float8_e8m0fnu
    s32 = s.float()
    mant, _ = torch.frexp(s32)
    assert bool((mant == 0.5).all()), "UE8M0 scales are powers of two"
    s_fp32 = _block_loop_scale(w, *block, fp8.DEFAULT_EPS)
    # rounded UP to the next power of two: s_fp32 <= s < 2 s_fp32, so |w / s| <= 448 with no clamping
    assert bool((s32 >= s_fp32).all() and (s32 < 2 * s_fp32).all())
    out = fp8.dequantize_fp8(q, s, block, dtype=torch.float64)
    s_elem = s32.double().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    bound = (E4M3_REL + FP32_EPS) * w.double().abs() + E4M3_SUBNORMAL_HALF_STEP * s_elem
    assert bool(((out - w.double()).abs() <= bound).all())
    # requant with recomputed power-of-two scales reproduces the dequantized values exactly (q' s' == q s); the codes
    # themselves only when the block max |q| > 224 (see test_ue8m0_requant_halves_the_scale_at_224)
    deq = fp8.dequantize_fp8(q, s, block)
    q2, s2 = fp8.requantize_fp8_block(deq, block, ue8m0=True)
    assert torch.equal(fp8.dequantize_fp8(q2, s2, block), deq)


def test_ue8m0_requant_halves_the_scale_at_224():
    # amax 224.5: 224.5/448 = 0.501 rounds up to s = 1, and 224.5 rounds to the e4m3 code 224 (step 16 in
    # [128, 256)). Dequantized amax 224 gives 224/448 = 0.5 = 2^-1 exactly: s' = 0.5 and q' = 448. Values unchanged.
    w = torch.tensor([[224.5, 1.0]])
    q, s = fp8.quantize_fp8_block(w, ue8m0=True)
    assert s.float().tolist() == [[1.0]] and q.float().tolist() == [[224.0, 1.0]]
    q2, s2 = fp8.requantize_fp8_block(fp8.dequantize_fp8(q, s), ue8m0=True)
    assert s2.float().tolist() == [[0.5]] and q2.float().tolist() == [[448.0, 2.0]]


def test_ue8m0_arithmetic_is_fp32_not_the_scale_dtype():
    # computing q * s in float8_e8m0fnu (Unsloth F3/F4) would round every product to a power of two
    q = torch.tensor([[1.5, 3.0, -0.75]]).to(torch.float8_e4m3fn)
    s = torch.tensor([[0.25]]).to(torch.float8_e8m0fnu)
    out = fp8.dequantize_fp8(q, s, block=(1, 3))
    assert out.dtype == torch.float32 and out.tolist() == [[0.375, 0.75, -0.1875]]
    assert fp8.round_up_pow2(torch.tensor([0.375, 0.25, 3e-39, 1.0])).tolist() == [0.5, 0.25, 2.0**-127, 1.0]


# ---------------------------------------------------------------- activation quant


@given(m=st.integers(1, 9), k=st.integers(1, 400), seed=st.integers(0, 2**16), zero_row=st.booleans())
@example(m=3, k=256, seed=0, zero_row=True)
@example(m=2, k=130, seed=1, zero_row=False)
def test_rowwise_activation_quant(m, k, seed, zero_row):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 5
    if zero_row:
        x[0] = 0
    q, s = fp8.quantize_rowwise(x)
    assert q.shape == (m, k) and s.shape == (m,) and s.dtype == torch.float32
    assert torch.equal(s, _block_loop_scale(x, 1, k, fp8.DEFAULT_EPS)[:, 0])
    out = q.double() * s.double()[:, None]  # the multiplier a scaled GEMM applies
    bound = (E4M3_REL + FP32_EPS) * x.double().abs() + E4M3_SUBNORMAL_HALF_STEP * s.double()[:, None]
    assert bool(((out - x.double()).abs() <= bound).all())


@given(k=st.integers(1, 400), seed=st.integers(0, 2**16))
@example(k=384, seed=0)
@example(k=200, seed=1)
def test_act_group_quant(k, seed):
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(seed)) * 3
    x[0, 1, :128] = 0  # an all-zero group: scale eps, codes 0 (no 0/0 NaN)
    q, s = fp8.quantize_act_groups(x)
    assert q.shape == x.shape and s.shape == (2, 3, math.ceil(k / 128))
    want = _block_loop_scale(x.reshape(6, k), 1, 128, fp8.DEFAULT_EPS).reshape(2, 3, -1)
    assert torch.equal(s, want)
    assert not torch.isnan(q.float()).any()
    out = q.double() * s.double().repeat_interleave(128, -1)[..., :k]
    s_elem = s.double().repeat_interleave(128, -1)[..., :k]
    bound = (E4M3_REL + FP32_EPS) * x.double().abs() + E4M3_SUBNORMAL_HALF_STEP * s_elem
    assert bool(((out - x.double()).abs() <= bound).all())
