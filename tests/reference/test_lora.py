"""reference/lora.py: per-expert factors under both lora_B conventions and both orientations, the forward delta,
adapter conversion.

Oracles are written here independently: explicit per-expert column index lists and per-row Python loops in float64.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from reference.layout import EXPERT_LAYOUTS, GPT_OSS, Orientation
from reference.lora import (
    CONTIGUOUS_R,
    STRIDE_E,
    LoraFactors,
    convert_adapter,
    delta_weight,
    expert_factors,
    expert_ids_from_offsets,
    lora_forward_delta,
)

ORIENTATIONS = (Orientation.STANDARD, Orientation.SWAPPED)
CONVENTIONS = (STRIDE_E, CONTIGUOUS_R)
F64 = torch.float64


def b_columns(e: int, r: int, E: int, convention: str) -> list[int]:
    """lora_B columns of expert e: stride-E (PEFT) k·E + e; contiguous-r (Unsloth before rank-major) e·r + k."""
    return [k * E + e for k in range(r)] if convention == STRIDE_E else [e * r + k for k in range(r)]


def loop_delta(lora_A, lora_B, E, s, orientation, convention):
    """Oracle ΔW [E, d1, d2], one expert at a time: ``B_e A_e = Σ_k outer(B_e[:, k], A_e[k])`` summed in rank order.

    The explicit rank-ordered sum (instead of ``B_e @ A_e``) fixes the rounding: a BLAS kernel may block or fuse the
    r products differently for ``B A`` and ``(Aᵀ Bᵀ)ᵀ`` (seen on AVX-512 CPUs), while here both sides add the same
    products in the same order, so factors that only move entries give bit-identical deltas.
    """
    r = lora_A.shape[0] // E
    out = []
    for e in range(E):
        A_e = lora_A[e * r : (e + 1) * r]
        B_e = lora_B[:, b_columns(e, r, E, convention)]
        BA = torch.zeros(B_e.shape[0], A_e.shape[1], dtype=torch.promote_types(A_e.dtype, B_e.dtype))
        for k in range(r):
            BA = BA + torch.outer(B_e[:, k], A_e[k])
        BA = s * BA
        out.append(BA.T if orientation is Orientation.STANDARD else BA)
    return torch.stack(out)


def make_adapter(E, r, d1, d2, orientation, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    a, b = (d1, d2) if orientation is Orientation.STANDARD else (d2, d1)
    return torch.randn(r * E, a, generator=g, dtype=dtype), torch.randn(b, r * E, generator=g, dtype=dtype)


dims = st.integers(1, 9)


@given(E=st.integers(1, 4), r=st.integers(1, 3), d1=dims, d2=dims, seed=st.integers(0, 2**16))
@example(E=4, r=2, d1=12, d2=6, seed=0)  # gate_up [E, 2I, H] with 2I != H
@example(E=4, r=2, d1=8, d2=8, seed=1)  # 2I == H: square, orientations differ only by a transpose
@example(E=1, r=2, d1=5, d2=3, seed=2)  # E == 1
@example(E=3, r=1, d1=4, d2=7, seed=3)  # r == 1
@example(E=3, r=2, d1=65, d2=130, seed=4)  # dims not multiples of 64
def test_delta_weight_matches_per_expert_loop(E, r, d1, d2, seed):
    for o, c in itertools.product(ORIENTATIONS, CONVENTIONS):
        A, B = make_adapter(E, r, d1, d2, o, seed)
        got = delta_weight(A, B, E, 0.75, orientation=o, convention=c)
        want = loop_delta(A, B, E, 0.75, o, c)
        assert got.shape == (E, d1, d2) and got.dtype == F64
        # float64, each entry is an r-term dot product: |err| <= r·2^-53·Σ|terms| ~ 1e-15 relative; 1e-12 is loose
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@given(E=st.integers(1, 4), r=st.integers(1, 3), d1=dims, d2=dims, seed=st.integers(0, 2**16))
@example(E=4, r=2, d1=8, d2=8, seed=1)
def test_stride_e_is_peft_einsum(E, r, d1, d2, seed):
    """stride_e is PEFT's reading: lora_B.reshape(out, r, E) with PEFT's einsum (peft/tuners/lora/layer.py)."""
    for o, eq in ((Orientation.STANDARD, "o r e, e r i -> e i o"), (Orientation.SWAPPED, "o r e, e r i -> e o i")):
        A, B = make_adapter(E, r, d1, d2, o, seed)
        want = torch.einsum(eq, B.reshape(B.shape[0], r, E), A.reshape(E, r, A.shape[1])) * 2.0
        torch.testing.assert_close(delta_weight(A, B, E, 2.0, orientation=o), want, rtol=1e-12, atol=1e-12)


@given(E=st.integers(1, 4), r=st.integers(1, 3), d=dims, seed=st.integers(0, 2**16))
@example(E=1, r=3, d=4, seed=0)
@example(E=3, r=1, d=4, seed=0)
@example(E=2, r=2, d=4, seed=0)
def test_conventions_differ_iff_E_and_r_above_one(E, r, d, seed):
    """The two column conventions agree exactly when the index maps coincide (E == 1 or r == 1)."""
    A, B = make_adapter(E, r, d, d + 1, Orientation.STANDARD, seed)
    s = delta_weight(A, B, E, 1.0, orientation="standard", convention=STRIDE_E)
    c = delta_weight(A, B, E, 1.0, orientation="standard", convention=CONTIGUOUS_R)
    if E == 1 or r == 1:
        assert torch.equal(s, c)
    else:
        # random Gaussian factors: a different column selection changes ΔW by O(1) almost surely
        assert (s - c).abs().max() > 1e-3


def test_expert_factors_index_maps():
    """Element-level: B[e][:, k] is column k·E + e (stride_e) / e·r + k (contiguous_r); A[e][k] is row e·r + k."""
    E, r = 3, 2
    lora_A = torch.arange(r * E, dtype=F64)[:, None].expand(r * E, 2)
    lora_B = torch.arange(r * E, dtype=F64)[None, :].expand(5, r * E)
    for c in CONVENTIONS:
        A, B = expert_factors(lora_A, lora_B, E, c)
        assert A.shape == (E, r, 2) and B.shape == (E, 5, r)
        for e, k in itertools.product(range(E), range(r)):
            assert A[e, k, 0] == e * r + k
            assert B[e, 0, k] == b_columns(e, r, E, c)[k]


@given(
    E=st.integers(1, 4),
    r=st.integers(1, 3),
    d_in=dims,
    d_out=dims,
    S=st.integers(0, 12),
    seed=st.integers(0, 2**16),
)
@example(E=4, r=2, d_in=8, d_out=8, S=6, seed=0)  # square
@example(E=1, r=1, d_in=3, d_out=5, S=4, seed=1)  # E == 1, r == 1
@example(E=4, r=2, d_in=6, d_out=12, S=0, seed=2)  # no tokens at all
def test_forward_delta_equals_x_times_delta_weight(E, r, d_in, d_out, S, seed):
    """lora_forward_delta(x)[i] == x[i] @ ΔW[e_i]ᵀ for (E, out, in) layouts and x[i] @ ΔW[e_i] for gpt_oss (E, in, out),
    for every layout × orientation × convention; experts 0 and E-1 may get zero tokens (ids drawn from 1..E-2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, d_in, generator=g, dtype=F64)
    hi = max(E - 1, 1)
    ids = torch.randint(min(1, E - 1), hi, (S,), generator=g) if E > 2 else torch.randint(0, E, (S,), generator=g)
    for layout, o, c in itertools.product(EXPERT_LAYOUTS, ORIENTATIONS, CONVENTIONS):
        d1, d2 = (d_in, d_out) if layout == GPT_OSS else (d_out, d_in)
        A, B = make_adapter(E, r, d1, d2, o, seed)
        dW = loop_delta(A, B, E, 0.5, o, c)
        want = torch.zeros(S, d_out, dtype=F64)
        for i in range(S):
            W = dW[ids[i]] if layout == GPT_OSS else dW[ids[i]].T  # [in, out]
            want[i] = x[i] @ W
        got = lora_forward_delta(x, A, B, ids, E, 0.5, orientation=o, expert_layout=layout, convention=c)
        assert got.shape == (S, d_out)
        # float64; sums of d_in + r products: error ~ (d_in + r)·2^-53 relative, far below 1e-12
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        f = LoraFactors(A, B, 0.5, o, c)
        torch.testing.assert_close(f.forward_delta(x, ids, E, layout), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(f.delta_weight(E), dW, rtol=1e-12, atol=1e-12)


def test_forward_delta_with_offsets_and_empty_expert():
    """END offsets [2, 2, 5] (expert 1 has no rows) give the same result as explicit expert ids [0, 0, 2, 2, 2]."""
    E, r, d_in, d_out = 3, 2, 4, 6
    A, B = make_adapter(E, r, d_out, d_in, Orientation.SWAPPED, 0)
    x = torch.randn(5, d_in, dtype=F64)
    offsets = torch.tensor([2, 2, 5], dtype=torch.int32)
    ids = torch.tensor([0, 0, 2, 2, 2])
    assert torch.equal(expert_ids_from_offsets(offsets), ids)
    kw = dict(orientation="swapped", expert_layout="fused_linear")
    got = lora_forward_delta(x, A, B, None, E, 1.0, offsets=offsets, **kw)
    assert torch.equal(got, lora_forward_delta(x, A, B, ids, E, 1.0, **kw))
    with pytest.raises(ValueError, match="non-decreasing"):
        expert_ids_from_offsets(torch.tensor([3, 2, 5]))
    with pytest.raises(ValueError, match="exactly one"):
        lora_forward_delta(x, A, B, ids, E, 1.0, offsets=offsets, **kw)
    with pytest.raises(ValueError, match="out of range"):
        lora_forward_delta(x, A, B, torch.tensor([0, 0, 3, 2, 2]), E, 1.0, **kw)


def test_forward_delta_rejects_wrong_input_width():
    """A non-square adapter applied in the wrong layout sense names the mismatch instead of broadcasting."""
    E, r = 2, 1
    A, B = make_adapter(E, r, 6, 4, Orientation.SWAPPED, 0)  # fused_linear [E, out=6, in=4]
    x = torch.randn(3, 6, dtype=F64)  # width of the output side
    with pytest.raises(ValueError, match="input features"):
        lora_forward_delta(
            x, A, B, torch.zeros(3, dtype=torch.long), E, 1.0, orientation="swapped", expert_layout="fused_linear"
        )


@given(E=st.integers(1, 4), r=st.integers(1, 3), d1=dims, d2=dims, seed=st.integers(0, 2**16))
@example(E=4, r=2, d1=8, d2=8, seed=0)
@example(E=1, r=1, d1=2, d2=3, seed=0)
def test_convert_adapter_preserves_delta_and_round_trips(E, r, d1, d2, seed):
    """For all 4×4 (orientation, convention) pairs: ΔW is preserved exactly (conversion only moves entries) and
    converting back returns the original tensors bit for bit."""
    pairs = list(itertools.product(ORIENTATIONS, CONVENTIONS))
    for (so, sc), (do, dc) in itertools.product(pairs, pairs):
        A, B = make_adapter(E, r, d1, d2, so, seed)
        A2, B2 = convert_adapter(A, B, E, src_orientation=so, dst_orientation=do, src_convention=sc, dst_convention=dc)
        a2, b2 = (d1, d2) if do is Orientation.STANDARD else (d2, d1)
        assert A2.shape == (r * E, a2) and B2.shape == (b2, r * E)
        assert torch.equal(loop_delta(A2, B2, E, 1.0, do, dc), loop_delta(A, B, E, 1.0, so, sc))
        A3, B3 = convert_adapter(
            A2, B2, E, src_orientation=do, dst_orientation=so, src_convention=dc, dst_convention=sc
        )
        assert torch.equal(A3, A) and torch.equal(B3, B)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_delta_weight_within_rounding_bound(dtype):
    """ΔW from bf16/fp16/fp32 factors vs float64 of the same (already rounded) values.

    Bound: one rounding of the r-term product to `dtype` (unit roundoff u), one of the scaling multiply (u) and the
    accumulation (r·u if CPU accumulates in `dtype`): relative-norm error <= (2 + r)·u, r = 2 -> 4u; assert 5u.
    """
    E, r, d1, d2 = 4, 2, 12, 8
    u = torch.finfo(dtype).eps / 2
    for o, c in itertools.product(ORIENTATIONS, CONVENTIONS):
        A, B = make_adapter(E, r, d1, d2, o, 7, dtype=dtype)
        got = delta_weight(A, B, E, 0.5, orientation=o, convention=c)
        assert got.dtype == dtype
        want = loop_delta(A.double(), B.double(), E, 0.5, o, c)
        rel = (got.double() - want).norm() / want.norm()
        assert rel <= 5 * u, (dtype, o, c, float(rel))


def test_unknown_orientation_and_convention_are_refused():
    A, B = make_adapter(2, 1, 3, 3, Orientation.STANDARD, 0)
    with pytest.raises(ValueError, match="UNKNOWN"):
        delta_weight(A, B, 2, 1.0, orientation=Orientation.UNKNOWN)
    with pytest.raises(ValueError, match="convention"):
        delta_weight(A, B, 2, 1.0, orientation="standard", convention="rank_major")
    with pytest.raises(ValueError, match="r·E"):
        delta_weight(A, B, 3, 1.0, orientation="standard")


def test_mixed_dtypes_compute_in_the_promoted_dtype():
    """bf16 activations with fp32 factors compute (and return) fp32; float64 anywhere gives float64."""
    E, r = 2, 2
    A, B = make_adapter(E, r, 6, 4, Orientation.SWAPPED, 0, dtype=torch.float32)
    x = torch.randn(3, 4).to(torch.bfloat16)
    ids = torch.tensor([0, 1, 1])
    kw = dict(orientation="swapped", expert_layout="fused_linear")
    y = lora_forward_delta(x, A, B, ids, E, 1.0, **kw)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, lora_forward_delta(x.float(), A, B, ids, E, 1.0, **kw), rtol=0, atol=0)
    assert lora_forward_delta(x, A.double(), B, ids, E, 1.0, **kw).dtype == F64
    assert delta_weight(A.to(torch.bfloat16), B, E, 1.0, orientation="swapped").dtype == torch.float32
