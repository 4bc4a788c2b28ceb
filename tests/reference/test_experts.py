"""reference/experts.py: vectorised forward == per-expert loop for every layout (with and without LoRA), the
layouts' gate/up conventions, activations against torch's own, and low-precision inputs against float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from reference import experts as rx
from reference.layout import Orientation
from reference.lora import LoraFactors

F64 = torch.float64
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": F64}
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11, "fp32": 2.0**-24, "fp64": 2.0**-53}
LAYOUTS = ("fused_linear", "gpt_oss", "module_list")


def routing(T, E, k, g, skip_expert=None):
    pool = torch.tensor([e for e in range(E) if e != skip_expert])
    idx = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(T)])
    return idx, torch.rand(T, k, generator=g, dtype=F64) + 0.1


def make_params(layout, E, H, I, g):
    """Random float64 weights of `layout` with O(1) activations for unit inputs."""

    def r(*shape, fan_in):
        return torch.randn(*shape, generator=g, dtype=F64) / fan_in**0.5

    if layout == "fused_linear":
        return dict(gate_up=r(E, 2 * I, H, fan_in=H), down=r(E, H, I, fan_in=I))
    if layout == "gpt_oss":
        return dict(
            gate_up=r(E, H, 2 * I, fan_in=H) * 3,  # * 3: pre-activations reach the clamp limit 7 sometimes
            gate_up_bias=r(E, 2 * I, fan_in=4),
            down=r(E, I, H, fan_in=I),
            down_bias=r(E, H, fan_in=4),
        )
    return dict(gate=list(r(E, I, H, fan_in=H)), up=list(r(E, I, H, fan_in=H)), down=list(r(E, H, I, fan_in=I)))


def cast(params, dtype):
    return {k: ([t.to(dtype) for t in v] if isinstance(v, list) else v.to(dtype)) for k, v in params.items()}


def forward(layout, loop, x, idx, w, params, **kw):
    fn = {
        ("fused_linear", False): rx.fused_linear_experts,
        ("fused_linear", True): rx.fused_linear_experts_loop,
        ("gpt_oss", False): rx.gpt_oss_experts,
        ("gpt_oss", True): rx.gpt_oss_experts_loop,
        ("module_list", False): rx.module_list_experts,
        ("module_list", True): rx.module_list_experts_loop,
    }[(layout, loop)]
    return fn(x, idx, w, **params, **kw)


def rel_err(got, ref):
    return float((got.to(F64) - ref.to(F64)).norm() / ref.to(F64).norm())


dims = st.tuples(
    st.integers(1, 8),  # T
    st.integers(1, 6),  # E
    st.integers(1, 12),  # H
    st.integers(1, 10),  # I
).flatmap(lambda t: st.tuples(*map(st.just, t), st.integers(1, t[1])))  # k <= E


@given(
    layout=st.sampled_from(LAYOUTS),
    dims=dims,
    seed=st.integers(0, 2**16),
    zero_expert=st.booleans(),
)
@example(layout="fused_linear", dims=(5, 4, 8, 4, 2), seed=0, zero_expert=False)  # 2I == H
@example(layout="gpt_oss", dims=(5, 4, 8, 4, 2), seed=1, zero_expert=False)  # 2I == H
@example(layout="fused_linear", dims=(5, 4, 6, 6, 2), seed=2, zero_expert=False)  # I == H
@example(layout="module_list", dims=(4, 1, 6, 3, 1), seed=3, zero_expert=False)  # E == 1
@example(layout="gpt_oss", dims=(4, 3, 6, 5, 3), seed=4, zero_expert=False)  # top_k == E
@example(layout="fused_linear", dims=(3, 6, 6, 5, 2), seed=5, zero_expert=True)  # an expert with zero tokens
def test_vectorised_equals_loop_float64(layout, dims, seed, zero_expert):
    T, E, H, I, k = dims
    g = torch.Generator().manual_seed(seed)
    skip = E - 1 if zero_expert and k < E else None
    idx, w = routing(T, E, k, g, skip)
    x = torch.randn(T, H, generator=g, dtype=F64)
    params = make_params(layout, E, H, I, g)
    vec = forward(layout, False, x, idx, w, params)
    loop = forward(layout, True, x, idx, w, params)
    assert vec.shape == (T, H) and vec.dtype == F64
    # same float64 math in another order: (H + I + k + 8)·2⁻⁵³ ≲ 4e-15 per element; 1e-12 in norm
    assert rel_err(vec, loop) < 1e-12


@given(layout=st.sampled_from(LAYOUTS), dtype=st.sampled_from(["bf16", "fp16", "fp32"]), seed=st.integers(0, 2**16))
@example(layout="fused_linear", dtype="bf16", seed=0)
@example(layout="gpt_oss", dtype="fp16", seed=1)
@example(layout="module_list", dtype="fp32", seed=2)
@settings(max_examples=10)  # each example runs 6 forwards; the pinned examples cover every layout and dtype
def test_low_precision_inputs_against_float64(layout, dtype, seed):
    """Inputs and weights in bf16 / fp16 / fp32, math in that dtype (accumulation in fp32), vs float64 math on
    the same rounded values. Each of ~6 rounded steps (2 matmul outputs, activation, gate·up product, weight
    product, final cast) adds <= u relative, matmul accumulation is fp32: bound 12·u (2× headroom)."""
    T, E, H, I, k = 8, 4, 16, 8, 2
    g = torch.Generator().manual_seed(seed)
    idx, w = routing(T, E, k, g)
    dt = DTYPES[dtype]
    x = torch.randn(T, H, generator=g, dtype=F64).to(dt)
    params = cast(make_params(layout, E, H, I, g), dt)
    w = w.to(dt)
    for loop in (False, True):
        got = forward(layout, loop, x, idx, w, params)
        ref = forward(layout, loop, x, idx, w, params, compute_dtype=F64)
        assert got.dtype == dt and ref.dtype == F64
        assert rel_err(got, ref) < 12 * UNIT_ROUNDOFF[dtype]


def test_fused_layout_is_concat_gate_then_up():
    """fused_linear gate_up[e] = cat(gate[e], up[e]) (transformers 5.x `Concatenate(dim=1)` of
    [gate_stack, up_stack]); the swapped concatenation is a different function (silu is not symmetric)."""
    T, E, H, I, k = 6, 3, 5, 4, 2
    g = torch.Generator().manual_seed(0)
    idx, w = routing(T, E, k, g)
    x = torch.randn(T, H, generator=g, dtype=F64)
    p = make_params("module_list", E, H, I, g)
    gate, up, down = torch.stack(p["gate"]), torch.stack(p["up"]), torch.stack(p["down"])
    by_hand = torch.zeros(T, H, dtype=F64)
    for t in range(T):
        for j in range(k):
            e = int(idx[t, j])
            by_hand[t] += w[t, j] * (F.silu(gate[e] @ x[t]) * (up[e] @ x[t])) @ down[e].T
    for fn in (rx.fused_linear_experts, rx.fused_linear_experts_loop):
        assert rel_err(fn(x, idx, w, torch.cat([gate, up], 1), down), by_hand) < 1e-13
        assert rel_err(fn(x, idx, w, torch.cat([up, gate], 1), down), by_hand) > 1e-2
    assert rel_err(rx.module_list_experts(x, idx, w, p["gate"], p["up"], p["down"]), by_hand) < 1e-13


def test_gpt_oss_layout_interleaved_and_clamped():
    """gpt_oss gate_up [E, H, 2I] has gate in even columns and up in odd ones; bias added before the clamp;
    out = (clamp(up, ±limit) + 1) · g · sigmoid(alpha·g), g = min(gate, limit)."""
    T, E, H, I, k, alpha, limit = 5, 2, 4, 3, 1, 1.702, 0.5
    g = torch.Generator().manual_seed(1)
    idx, w = routing(T, E, k, g)
    x = torch.randn(T, H, generator=g, dtype=F64) * 3
    G, U = torch.randn(E, H, I, generator=g, dtype=F64), torch.randn(E, H, I, generator=g, dtype=F64)
    bg, bu = torch.randn(E, I, generator=g, dtype=F64), torch.randn(E, I, generator=g, dtype=F64)
    D, bd = torch.randn(E, I, H, generator=g, dtype=F64), torch.randn(E, H, generator=g, dtype=F64)
    gate_up = torch.stack([G, U], dim=-1).reshape(E, H, 2 * I)  # interleave columns g0 u0 g1 u1 ...
    gate_up_bias = torch.stack([bg, bu], dim=-1).reshape(E, 2 * I)
    by_hand = torch.zeros(T, H, dtype=F64)
    for t in range(T):
        e = int(idx[t, 0])
        gg = torch.minimum(x[t] @ G[e] + bg[e], torch.tensor(limit, dtype=F64))
        uu = (x[t] @ U[e] + bu[e]).clamp(-limit, limit)
        by_hand[t] = w[t, 0] * (((uu + 1) * gg * torch.sigmoid(alpha * gg)) @ D[e] + bd[e])
    got = rx.gpt_oss_experts(x, idx, w, gate_up, gate_up_bias, D, bd, alpha=alpha, limit=limit)
    assert rel_err(got, by_hand) < 1e-13
    unclamped = rx.gpt_oss_experts(x, idx, w, gate_up, gate_up_bias, D, bd, alpha=alpha, limit=float("inf"))
    assert rel_err(unclamped, by_hand) > 1e-2  # the clamp is active at limit 0.5 for these inputs


def test_activations_match_torch():
    x = torch.linspace(-8, 8, 1001, dtype=F64)
    assert torch.allclose(rx.silu(x), F.silu(x), rtol=1e-14, atol=1e-15)
    assert torch.allclose(rx.gelu_tanh(x), F.gelu(x, approximate="tanh"), rtol=1e-14, atol=1e-15)
    with pytest.raises(KeyError, match="gelu_new"):
        rx.activation("gelu_new")


def test_gelu_activation_is_used():
    """act="gelu_pytorch_tanh" (Gemma4) changes the result vs silu, identically in both forms."""
    T, E, H, I, k = 4, 3, 5, 4, 2
    g = torch.Generator().manual_seed(2)
    idx, w = routing(T, E, k, g)
    x = torch.randn(T, H, generator=g, dtype=F64)
    p = make_params("fused_linear", E, H, I, g)
    gelu = rx.fused_linear_experts(x, idx, w, **p, act="gelu_pytorch_tanh")
    assert rel_err(rx.fused_linear_experts_loop(x, idx, w, **p, act="gelu_pytorch_tanh"), gelu) < 1e-13
    assert rel_err(rx.fused_linear_experts(x, idx, w, **p, act="silu"), gelu) > 1e-3


# ------------------------------------------------------------------------------------------------------------
# LoRA: vectorised (forward_delta on the factors) vs loop (W + ΔW per expert), both orientations.


def lora_for(param_shape, r, orientation, g, scaling=0.5):
    E, d1, d2 = param_shape
    a, b = (d1, d2) if orientation is Orientation.STANDARD else (d2, d1)
    return LoraFactors(
        lora_A=torch.randn(r * E, a, generator=g, dtype=F64),
        lora_B=torch.randn(b, r * E, generator=g, dtype=F64),
        scaling=scaling,
        orientation=orientation,
    )


@given(
    layout=st.sampled_from(["fused_linear", "gpt_oss"]),
    orientation=st.sampled_from([Orientation.STANDARD, Orientation.SWAPPED]),
    r=st.integers(1, 3),
    which=st.sampled_from([("gate_up",), ("down",), ("gate_up", "down")]),
    seed=st.integers(0, 2**16),
)
@example(layout="fused_linear", orientation=Orientation.SWAPPED, r=2, which=("gate_up", "down"), seed=0)
@example(layout="gpt_oss", orientation=Orientation.STANDARD, r=2, which=("gate_up", "down"), seed=1)
def test_lora_vectorised_equals_loop(layout, orientation, r, which, seed):
    T, E, H, I, k = 6, 3, 8, 4, 2  # 2I == H: both orientations fit gate_up's shape
    g = torch.Generator().manual_seed(seed)
    idx, w = routing(T, E, k, g)
    x = torch.randn(T, H, generator=g, dtype=F64)
    p = make_params(layout, E, H, I, g)
    lora = {name: lora_for(tuple(p[name].shape), r, orientation, g) for name in which}
    vec = forward(layout, False, x, idx, w, p, lora=lora)
    loop = forward(layout, True, x, idx, w, p, lora=lora)
    base = forward(layout, False, x, idx, w, p)
    assert rel_err(vec, loop) < 1e-12  # float64, same math in another order
    assert rel_err(vec, base) > 1e-3  # the adapter does change the output


def test_lora_rejects_unknown_key():
    g = torch.Generator().manual_seed(0)
    p = make_params("fused_linear", 2, 4, 2, g)
    with pytest.raises(KeyError, match="up_proj"):
        rx.fused_linear_experts(
            torch.zeros(1, 4, dtype=F64),
            torch.zeros(1, 1, dtype=torch.long),
            torch.ones(1, 1, dtype=F64),
            **p,
            lora={"up_proj": lora_for((2, 4, 4), 1, Orientation.STANDARD, g)},
        )


def test_routing_shape_errors():
    p = make_params("fused_linear", 2, 4, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        rx.fused_linear_experts(torch.zeros(1, 4, dtype=F64), torch.tensor([[2]]), torch.ones(1, 1, dtype=F64), **p)
    with pytest.raises(ValueError, match="idx"):
        rx.fused_linear_experts(torch.zeros(2, 4, dtype=F64), torch.tensor([[0]]), torch.ones(1, 1, dtype=F64), **p)
