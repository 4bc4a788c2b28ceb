"""reference/dispatch.py: sort by expert, END offsets (checked against torch's real grouped GEMM), gather and
weighted combine, against a dense one-hot computation written here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from reference import dispatch

F64 = torch.float64
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": F64}
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11, "fp32": 2.0**-24, "fp64": 2.0**-53}


def routing(T: int, E: int, k: int, seed: int, skip_expert: int | None = None):
    """idx [T, k] distinct experts per token (never `skip_expert` when given), weights [T, k] in [0.1, 1.1)."""
    g = torch.Generator().manual_seed(seed)
    pool = [e for e in range(E) if e != skip_expert]
    idx = torch.stack([torch.tensor(pool)[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)])
    w = torch.rand(T, k, generator=g, dtype=F64) + 0.1
    return idx, w


cases = st.tuples(st.integers(1, 9), st.integers(1, 7)).flatmap(
    lambda te: st.tuples(st.just(te[0]), st.just(te[1]), st.integers(1, te[1]))
)


@given(tek=cases, seed=st.integers(0, 2**16))
@example(tek=(4, 1, 1), seed=0)  # E == 1
@example(tek=(3, 5, 5), seed=1)  # top_k == E
def test_sort_by_expert_invariants(tek, seed):
    T, E, k = tek
    idx, _ = routing(T, E, k, seed)
    d = dispatch.sort_by_expert(idx, E)
    S = T * k
    flat = idx.reshape(-1)
    assert sorted(d.order.tolist()) == list(range(S))  # a permutation of the pairs
    assert torch.equal(flat[d.order], d.expert_ids_sorted)
    assert bool((d.expert_ids_sorted[1:] >= d.expert_ids_sorted[:-1]).all())
    same = d.expert_ids_sorted[1:] == d.expert_ids_sorted[:-1]
    assert bool((d.order[1:][same] > d.order[:-1][same]).all())  # stable: pair order kept within an expert
    assert torch.equal(idx[d.token_idx, d.slot_idx], d.expert_ids_sorted)
    assert torch.equal(d.counts, F.one_hot(flat, E).sum(0))
    assert d.offsets.dtype == torch.int32 and d.offsets.shape == (E,) and int(d.offsets[-1]) == S
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), d.offsets[:-1].long()])
    for e in range(E):  # END offsets: rows [offsets[e-1], offsets[e]) are expert e's
        assert bool((d.expert_ids_sorted[starts[e] : d.offsets[e]] == e).all())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_offsets_follow_torch_grouped_mm_convention(dtype):
    """torch's grouped GEMM with our offsets computes each expert's rows with that expert's matrix, including
    an expert with zero rows (repeated offset). Dims are multiples of 16 bytes (its CPU kernel requires it)."""
    T, E, k, H, N = 6, 4, 2, 8, 8
    idx, _ = routing(T, E, k, seed=0, skip_expert=2)
    d = dispatch.sort_by_expert(idx, E)
    assert int(d.counts[2]) == 0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=g).to(DTYPES[dtype])
    w = torch.randn(E, H, N, generator=g).to(DTYPES[dtype])
    xs = dispatch.gather(x, d)
    got = F.grouped_mm(xs, w, offs=d.offsets)
    want = torch.einsum("sh,shn->sn", xs.to(F64), w.to(F64)[d.expert_ids_sorted])
    err = float((got.to(F64) - want).norm() / want.norm())
    assert err < 8 * UNIT_ROUNDOFF[dtype]  # one rounding of fp32-accumulated length-8 dots: <= (8+1)·u, norm-wise


@given(
    tek=cases,
    H=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(sorted(DTYPES)),
    zero_expert=st.booleans(),
)
@example(tek=(4, 1, 1), H=3, seed=0, dtype="fp32", zero_expert=False)  # E == 1
@example(tek=(3, 4, 4), H=2, seed=1, dtype="fp64", zero_expert=False)  # top_k == E
@example(tek=(5, 6, 2), H=4, seed=2, dtype="fp32", zero_expert=True)  # an expert with zero tokens
@example(tek=(5, 6, 2), H=4, seed=3, dtype="bf16", zero_expert=False)
@example(tek=(5, 6, 2), H=4, seed=4, dtype="fp16", zero_expert=False)
def test_dispatch_combine_equals_dense_one_hot(tek, H, seed, dtype, zero_expert):
    """gather -> per-expert linear map M[e] -> combine == sum_e dense_w[t, e] · x[t] M[e] (one-hot dense)."""
    T, E, k = tek
    skip = E - 1 if zero_expert and k < E else None
    idx, w = routing(T, E, k, seed, skip_expert=skip)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, H, generator=g, dtype=F64).to(DTYPES[dtype])
    M = torch.randn(E, H, H, generator=g, dtype=F64).to(DTYPES[dtype])
    d = dispatch.sort_by_expert(idx, E)
    ys = torch.einsum("sh,shj->sj", dispatch.gather(x, d), M[d.expert_ids_sorted])  # in the input dtype
    out = dispatch.combine(ys, d, w.to(DTYPES[dtype]), T)
    assert out.dtype == DTYPES[dtype]

    dense_w = (F.one_hot(idx, E).to(F64) * w.to(DTYPES[dtype]).to(F64)[..., None]).sum(1)  # [T, E]
    dense = torch.einsum("te,th,ehj->tj", dense_w, x.to(F64), M.to(F64))
    u = UNIT_ROUNDOFF[dtype]
    # per output: a length-H dot (<= (H+1)·u), the weight product and the k-sum in fp32 (~k·2⁻²⁴), and the final
    # rounding to dtype (u); norm-wise relative, with the inputs' dot products possibly cancelling: (2H + 4)·u
    # relative to sum |terms|, so compare against the absolute-value computation
    scale = torch.einsum("te,th,ehj->tj", dense_w.abs(), x.to(F64).abs(), M.to(F64).abs())
    assert bool(((out.to(F64) - dense).abs() <= (2 * H + 4) * u * scale + 1e-300).all())


def test_combine_accumulation_dtype():
    """fp32 accumulation of bf16 rows is exact-to-rounding; bf16 accumulation rounds every product."""
    T, E, k, H = 64, 4, 4, 16
    idx, w = routing(T, E, k, seed=5)
    d = dispatch.sort_by_expert(idx, E)
    ys = torch.randn(T * k, H, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    wb = w.to(torch.bfloat16)
    exact = dispatch.combine(ys.double(), d, wb.double(), T, accum_dtype=F64)
    out32 = dispatch.combine(ys, d, wb, T, accum_dtype=torch.float32)
    out16 = dispatch.combine(ys, d, wb, T, accum_dtype=torch.bfloat16)
    out32_f = dispatch.combine(ys, d, wb, T, accum_dtype=torch.float32, out_dtype=torch.float32)
    assert out32.dtype == out16.dtype == torch.bfloat16 and out32_f.dtype == torch.float32
    # fp32 accumulation: error is the final bf16 rounding only (<= 2⁻⁸ relative per element) ...
    assert bool(((out32.double() - exact).abs() <= 2.0**-8 * exact.abs()).all())
    assert float((out32_f.double() - exact).norm() / exact.norm()) < 8 * 2.0**-24  # k=4 fp32 adds
    # ... bf16 accumulation also rounds the products and the partial sums: measurably worse in norm
    err32 = float((out32.double() - exact).norm())
    err16 = float((out16.double() - exact).norm())
    assert err16 > err32


def test_sort_by_expert_rejects_bad_ids():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        dispatch.sort_by_expert(torch.tensor([[0, 4]]), 4)
    with pytest.raises(ValueError, match="integer"):
        dispatch.sort_by_expert(torch.tensor([[0.0, 1.0]]), 4)


def test_combine_rejects_shape_mismatch():
    d = dispatch.sort_by_expert(torch.tensor([[0, 1], [1, 2]]), 3)
    with pytest.raises(ValueError, match="S must be T·k"):
        dispatch.combine(torch.zeros(4, 2), d, torch.ones(3, 2), 3)
