"""reference/routing.py: properties of every router against independent formulas.

Inputs are tie-free by construction (`distinct_logits`): a random permutation of 0..E-1 plus noise in [0, 0.5),
times a power of two, is exactly representable-distinct in bf16 / fp16 / fp32, so torch.topk's unspecified tie
order never matters. Oracles here use sorting / logsumexp / per-token Python loops, not the code under test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given
from hypothesis import strategies as st

from reference import routing as rr

F64 = torch.float64
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": F64}
U64 = 2.0**-53


def distinct_logits(T: int, E: int, seed: int, dtype=F64, scale_pow2: int = -1) -> torch.Tensor:
    """[T, E] logits, all distinct within a row in `dtype` (see module docstring), centred near 0."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(E, generator=g).to(F64) + 0.5 * torch.rand(E, generator=g, dtype=F64) for _ in range(T)]
    x = (torch.stack(rows) - E / 2) * 2.0**scale_pow2
    out = x.to(dtype)
    assert all(len(set(r.tolist())) == E for r in out.to(F64)), "construction must keep rows distinct"
    return out


def topk_oracle(scores: torch.Tensor, k: int) -> list[set[int]]:
    """Per-row set of the k largest entries by full sort."""
    return [set(torch.argsort(r, descending=True)[:k].tolist()) for r in scores.to(F64)]


def softmax_tol(logits: torch.Tensor, dtype: str) -> float:
    """Relative bound for softmax values: an absolute error δ in an exponent is a relative error δ in exp, and
    δ <= ~2·|logit|·u (the shift by max / logsumexp); plus a few ulp for exp and the normalising sum."""
    u = U64 if dtype == "fp64" else 2.0**-24
    return (8 + 4 * float(logits.abs().max())) * u


def as_sets(idx: torch.Tensor) -> list[set[int]]:
    return [set(r.tolist()) for r in idx]


shapes = st.tuples(st.integers(1, 6), st.integers(1, 12)).flatmap(
    lambda te: st.tuples(st.just(te[0]), st.just(te[1]), st.integers(1, te[1]))
)


# ------------------------------------------------------------------------------------------------------------
# softmax_topk


@given(tek=shapes, renorm=st.booleans(), seed=st.integers(0, 2**16), dtype=st.sampled_from(sorted(DTYPES)))
@example(tek=(3, 1, 1), renorm=True, seed=0, dtype="fp32")  # E == 1
@example(tek=(3, 6, 6), renorm=False, seed=1, dtype="fp32")  # top_k == E
@example(tek=(4, 8, 2), renorm=True, seed=2, dtype="bf16")
@example(tek=(4, 8, 2), renorm=True, seed=3, dtype="fp16")
def test_softmax_topk(tek, renorm, seed, dtype):
    T, E, k = tek
    logits = distinct_logits(T, E, seed, DTYPES[dtype])
    w, idx = rr.softmax_topk(logits, k, renorm)
    want_dtype = F64 if dtype == "fp64" else torch.float32
    assert w.dtype == want_dtype and idx.dtype == torch.int64 and w.shape == idx.shape == (T, k)
    assert as_sets(idx) == topk_oracle(logits, k)  # softmax is monotone: the k largest logits
    ll = logits.to(F64)
    sel = ll.gather(1, idx)
    if renorm:  # softmax over the chosen logits only
        want = torch.exp(sel - torch.logsumexp(sel, dim=1, keepdim=True))
    else:  # the full softmax's values at the chosen experts
        want = torch.exp(sel - torch.logsumexp(ll, dim=1, keepdim=True))
    tol = softmax_tol(logits, dtype)
    assert torch.allclose(w.to(F64), want, rtol=tol, atol=0)
    if renorm or k == E:
        assert torch.allclose(w.to(F64).sum(1), torch.ones(T, dtype=F64), rtol=tol, atol=0)
    assert bool((w[:, :-1] >= w[:, 1:]).all())  # slots in descending weight order (topk sorted=True)


def test_softmax_topk_without_renorm_does_not_sum_to_one():
    """The unnormalised weights are the top-k of the full softmax: they sum to < 1 when k < E."""
    logits = distinct_logits(5, 8, seed=7)
    w, _ = rr.softmax_topk(logits, 2, renormalize=False)
    assert bool((w.sum(1) < 1 - 1e-3).all())


# ------------------------------------------------------------------------------------------------------------
# sigmoid_group_topk


def group_topk_oracle(logits, bias, k, n_group, topk_group, renorm, scaling, mask_value):
    """Per-token Python loop: group score = sum of its two best s+bias, keep the topk_group best groups,
    others score `mask_value`, pick k best, weight = sigmoid(logit) (no bias), renorm, scale."""
    T, E = logits.shape
    G = E // n_group
    s = torch.sigmoid(logits.to(F64))
    c = s + bias.to(F64)
    sets, weights = [], []
    for t in range(T):
        gscore = [sorted(c[t, g * G : (g + 1) * G].tolist(), reverse=True)[:2] for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: -sum(gscore[g]))[:topk_group]
        masked = [c[t, e].item() if e // G in kept else mask_value for e in range(E)]
        chosen = sorted(range(E), key=lambda e: -masked[e])[:k]
        w = [s[t, e].item() for e in chosen]
        if renorm:
            tot = sum(w) + 1e-20
            w = [v / tot for v in w]
        sets.append(set(chosen))
        weights.append(dict(zip(chosen, [v * scaling for v in w])))
    return sets, weights


group_cfg = st.sampled_from([(4, 2, 1), (8, 4, 2), (8, 2, 1), (8, 4, 4), (6, 3, 2), (2, 1, 1)])  # (E, n_group, tg)


@given(
    cfg=group_cfg,
    k=st.integers(1, 8),
    T=st.integers(1, 5),
    renorm=st.booleans(),
    scaling=st.sampled_from([1.0, 2.5]),
    seed=st.integers(0, 2**16),
)
@example(cfg=(8, 4, 2), k=2, T=3, renorm=True, scaling=2.5, seed=0)  # DeepSeek-like
@example(cfg=(2, 1, 1), k=2, T=2, renorm=True, scaling=1.0, seed=1)  # top_k == E, one group
def test_sigmoid_group_topk_matches_loop_oracle(cfg, k, T, renorm, scaling, seed):
    E, n_group, topk_group = cfg
    allowed = topk_group * (E // n_group)
    assume(k <= allowed)  # with k > allowed experts, -inf slots would be picked among exact ties
    logits = distinct_logits(T, E, seed)
    bias = torch.rand(E, generator=torch.Generator().manual_seed(seed + 1), dtype=F64) * 0.5  # c > 0
    w, idx = rr.sigmoid_group_topk(logits, bias, k, n_group, topk_group, renorm, scaling, float("-inf"))
    sets, weights = group_topk_oracle(logits, bias, k, n_group, topk_group, renorm, scaling, float("-inf"))
    assert as_sets(idx) == sets
    want = torch.tensor([[weights[t][int(e)] for e in idx[t]] for t in range(T)], dtype=F64)
    assert torch.allclose(w, want, rtol=64 * U64, atol=0)  # float64, a handful of ops: 64 ulp
    if renorm:
        assert torch.allclose(w.sum(1), torch.full((T,), scaling, dtype=F64), rtol=64 * U64, atol=0)


@given(cfg=group_cfg, T=st.integers(1, 6), seed=st.integers(0, 2**16))
@example(cfg=(8, 4, 2), T=4, seed=0)
def test_group_mask_zero_vs_neg_inf(cfg, T, seed):
    """Mask 0.0 and -inf pick the same experts iff the k-th best allowed choice score c = s + bias is > 0
    (or nothing is masked). With a negative bias a masked expert at 0.0 outranks negative allowed ones."""
    E, n_group, topk_group = cfg
    k = min(2, topk_group * (E // n_group))
    logits = distinct_logits(T, E, seed)
    bias = torch.rand(E, generator=torch.Generator().manual_seed(seed + 1), dtype=F64) * 2.0 - 1.5  # many c < 0
    args = (logits, bias, k, n_group, topk_group, True, 1.0)
    _, idx_zero = rr.sigmoid_group_topk(*args, mask_value=0.0)
    _, idx_inf = rr.sigmoid_group_topk(*args, mask_value=float("-inf"))
    oracle_inf, _ = group_topk_oracle(*args, float("-inf"))
    assert as_sets(idx_inf) == oracle_inf
    c = torch.sigmoid(logits) + bias
    for t in range(T):
        kth_allowed = sorted((c[t, e].item() for e in oracle_inf[t]), reverse=True)[k - 1]
        same = set(idx_zero[t].tolist()) == set(idx_inf[t].tolist())
        assert same == (kth_allowed > 0 or topk_group == n_group)


def test_group_mask_divergence_case_exists():
    """The documented case concretely: E=4, 2 groups, keep 1, k=2, expert 0 the only positive c."""
    logits = torch.zeros(1, 4, dtype=F64)  # s = 0.5 everywhere
    bias = torch.tensor([0.0, -1.0, -2.0, -2.0], dtype=F64)  # c = [0.5, -0.5, -1.5, -1.5]: group 0 kept
    args = (logits, bias, 2, 2, 1, False, 1.0)
    assert set(rr.sigmoid_group_topk(*args, mask_value=float("-inf"))[1][0].tolist()) == {0, 1}
    picked = set(rr.sigmoid_group_topk(*args, mask_value=0.0)[1][0].tolist())
    assert 0 in picked and picked & {2, 3} and 1 not in picked  # a masked expert (c := 0) beats c = -0.5


def test_routed_scaling_and_bias_free_weights():
    logits = distinct_logits(4, 8, seed=3)
    bias = torch.rand(8, generator=torch.Generator().manual_seed(0), dtype=F64)
    w1, i1 = rr.sigmoid_group_topk(logits, bias, 2, 4, 2, False, 1.0, float("-inf"))
    w3, i3 = rr.sigmoid_group_topk(logits, bias, 2, 4, 2, False, 3.0, float("-inf"))
    assert torch.equal(i1, i3)
    assert torch.allclose(w3, 3.0 * w1, rtol=2 * U64, atol=0)
    assert torch.equal(w1, torch.sigmoid(logits).gather(1, i1))  # weights exclude the correction bias


def test_sigmoid_group_topk_rejects_bad_groups():
    with pytest.raises(ValueError, match="groups of >= 2"):
        rr.sigmoid_group_topk(torch.zeros(1, 4), torch.zeros(4), 1, 4, 1, True, 1.0, 0.0)
    with pytest.raises(ValueError, match="topk_group"):
        rr.sigmoid_group_topk(torch.zeros(1, 4), torch.zeros(4), 1, 2, 3, True, 1.0, 0.0)


# ------------------------------------------------------------------------------------------------------------
# GPT-OSS and Gemma4


@given(tek=shapes, seed=st.integers(0, 2**16), dtype=st.sampled_from(sorted(DTYPES)))
@example(tek=(2, 1, 1), seed=0, dtype="fp32")  # E == 1
@example(tek=(2, 5, 5), seed=1, dtype="bf16")  # top_k == E
def test_gpt_oss_topk_is_softmax_over_k(tek, seed, dtype):
    T, E, k = tek
    logits = distinct_logits(T, E, seed, DTYPES[dtype], scale_pow2=1)
    w, idx = rr.gpt_oss_topk(logits, k)
    assert as_sets(idx) == topk_oracle(logits, k)
    sel = logits.to(F64).gather(1, idx)
    want = torch.exp(sel - torch.logsumexp(sel, dim=1, keepdim=True))
    tol = softmax_tol(logits, dtype)
    assert torch.allclose(w.to(F64), want, rtol=tol, atol=0)
    # same decision and weights as a renormalised softmax top-k (the two formulas agree mathematically)
    w2, idx2 = rr.softmax_topk(logits, k, renormalize=True)
    assert torch.equal(idx, idx2) and torch.allclose(w, w2, rtol=tol, atol=0)


@given(T=st.integers(1, 5), H=st.integers(2, 16), E=st.integers(2, 8), seed=st.integers(0, 2**16))
@example(T=3, H=8, E=4, seed=0)
def test_gemma4_router(T, H, E, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g, dtype=F64) * 3
    scale = torch.rand(H, generator=g, dtype=F64) + 0.5
    proj = torch.randn(E, H, generator=g, dtype=F64)
    pes = torch.rand(E, generator=g, dtype=F64) + 0.5
    eps = 1e-6
    logits = (F.rms_norm(x, (H,), eps=eps) * scale * H**-0.5) @ proj.T  # torch's RMSNorm as the oracle
    assert torch.allclose(rr.gemma4_router_logits(x, scale, proj, eps), logits, rtol=1e-12, atol=1e-12)
    k = min(2, E)
    lsorted = logits.sort(dim=1, descending=True).values
    assume(bool((lsorted[:, :-1] - lsorted[:, 1:] > 1e-9).all()))  # tie-free
    w, idx = rr.gemma4_router(x, scale, proj, pes, k, eps)
    w1, idx1 = rr.gemma4_router(x, scale, proj, torch.ones(E, dtype=F64), k, eps)
    assert torch.equal(idx, idx1) and as_sets(idx) == topk_oracle(logits, k)
    assert torch.allclose(w1.sum(1), torch.ones(T, dtype=F64), rtol=1e-14, atol=0)  # renormalised
    assert torch.allclose(w, w1 * pes[idx], rtol=1e-15, atol=0)  # per_expert_scale after renormalising


def test_canonical_order_and_dense_weights():
    w = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    idx = torch.tensor([[3, 1], [0, 2]])
    cw, ci = rr.canonical_order(w, idx)
    assert torch.equal(ci, torch.tensor([[1, 3], [0, 2]])) and torch.equal(cw, torch.tensor([[0.3, 0.7], [0.6, 0.4]]))
    dense = rr.dense_weights(w, idx, 4)
    assert torch.equal(dense, torch.tensor([[0.0, 0.3, 0.0, 0.7], [0.6, 0.0, 0.4, 0.0]]))


@pytest.mark.parametrize("k", [0, 5])
def test_top_k_out_of_range(k):
    with pytest.raises(ValueError, match="top_k"):
        rr.softmax_topk(torch.zeros(2, 4), k, True)
