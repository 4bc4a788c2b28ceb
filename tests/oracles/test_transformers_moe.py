"""Oracles: transformers' own MoE routers and experts (tiny zoo models) against reference/ routing + experts.

Per family the installed transformers has, and for a 2I == H and a 2I != H variant:
- router (5.x router modules; 4.57 DeepSeek/GLM `TopkRouter` and GPT-OSS router) vs reference routing;
- experts module (5.x, with `_experts_implementation` eager / grouped_mm / batched_mm; 4.57 GPT-OSS) vs
  reference experts in float64, and in float64 end to end where the module runs in float64;
- the whole MoE block (routing + experts + shared experts; 4.57 ModuleList blocks) vs the reference.
Version-dependent behaviour (group mask value, router first output, score dtype) is read from impl/compat.py.

Tolerances: relative Frobenius error ``‖got − ref‖ / ‖ref‖`` against a float64 reference. For a length-n fp32
dot product the rounding error is at most γ_n = n·u/(1−n·u), u = 2⁻²⁴ ≈ 6e-8. An expert MLP chains two
products (n = H ≤ 32, then n = I ≤ 32) plus O(1) ulp for the activation, routing product and the k-sum:
(32 + 32 + 8)·u ≈ 4.3e-6 worst case per element; bound RTOL_F32 = 2e-5 (≈ 4.6× headroom). Routing weights
come from a softmax/sigmoid of fp32 logits (n = H): RTOL_F32 covers it too. In float64 the same count gives
72·2⁻⁵³ ≈ 8e-15; bound RTOL_F64 = 1e-12.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

from impl import compat
from reference import experts as rx
from reference import routing as rr
from tests.support import zoo

pytestmark = pytest.mark.oracle

VERSION = transformers.__version__
FUSED = compat.fused_experts(VERSION)
VARIANTS = ("2i_eq_h", "2i_ne_h")
RTOL_F32 = 2e-5
RTOL_F64 = 1e-12
T = 24  # tokens: with E = 8 and k = 2 some experts get several tokens, and zero-token experts occur too
F64 = torch.float64


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().to(F64), ref.detach().to(F64)
    return float((got - ref).norm() / ref.norm())


@pytest.fixture(autouse=True)
def _record_upstream(record_property):
    record_property("upstream", f"transformers=={VERSION}")


# ------------------------------------------------------------------------------------------------------------
# Models: zoo model, first MoE layer re-randomised so routing is well separated and every parameter matters.


def _fill(p: torch.Tensor, g: torch.Generator, std: float, low: float | None = None) -> None:
    with torch.no_grad():
        if low is None:
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * std)
        else:  # uniform in [low, low + std)
            p.copy_(low + torch.rand(p.shape, generator=g, dtype=F64) * std)


def _randomize(d: dict, seed: int) -> None:
    """Router logits with std ≈ 2 for unit inputs (distinct top-k); expert weights O(1/sqrt(fan_in))."""
    g = torch.Generator().manual_seed(seed)
    layer = d["layers"][0]
    h = d["H"]
    for name, p in layer.router.named_parameters():
        if name in ("weight", "proj.weight"):
            _fill(p, g, 2.0 / h**0.5)
        elif name == "bias":
            _fill(p, g, 0.5)
        elif name == "scale":
            _fill(p, g, 0.5, low=0.75)
        elif name == "per_expert_scale":
            _fill(p, g, 1.0, low=0.5)
        else:
            raise AssertionError(f"unexpected router parameter {name}")
    if hasattr(layer.router, "e_score_correction_bias"):
        # positive: s + bias > 0, where the 0.0 and -inf group masks agree (see test_group_mask_value)
        _fill(layer.router.e_score_correction_bias, g, 0.5, low=0.0)
    for name, p in layer.experts.named_parameters():
        _fill(p, g, 0.1 if name.endswith("bias") else 1.0 / h**0.5)


@functools.cache
def _model(family: str, variant: str):
    model = zoo.build_model(family, variant, seed=0)
    d = zoo.describe(model)
    _randomize(d, seed=1)
    return model, d


def _x(h: int, seed: int = 2, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(T, h, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2.0).to(dtype)


def _ref_route(d: dict, layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference routing (float64) of rows x [T, H] for the model's router."""
    kind, p, r = d["router_kind"], d["router"], layer.router
    x = x.to(F64)
    if kind == compat.GEMMA4_ROUTER:
        return rr.gemma4_router(x, r.scale.to(F64), r.proj.weight.to(F64), r.per_expert_scale.to(F64), **p)
    weight = (r.weight if hasattr(r, "weight") else r.proj.weight).to(F64)
    logits = x @ weight.T
    if kind == compat.GPT_OSS_TOPK:
        return rr.gpt_oss_topk(logits + r.bias.to(F64), p["k"])
    if kind == compat.SIGMOID_GROUP_TOPK:
        return rr.sigmoid_group_topk(logits, r.e_score_correction_bias.to(F64), **p)
    return rr.softmax_topk(logits, p["k"], p["renormalize"])


def _upstream_route(d: dict, layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(weights [T,k], idx [T,k], first output or None) from the upstream router path of this version."""
    kind, r = d["router_kind"], layer.router
    if kind == compat.SIGMOID_GROUP_TOPK:
        if compat.sigmoid_routing_in_router(VERSION):
            logits, w, idx = r(x)
            return w, idx, logits
        if FUSED:  # 5.0–5.12: router gives logits, the MoE block routes
            logits = r(x)
            idx, w = layer.block.route_tokens_to_experts(logits)
            return w, idx, logits
        idx, w = r(x)  # 4.57
        return w, idx, None
    if kind == compat.GPT_OSS_TOPK and compat.gpt_oss_router_dense_scores(VERSION):
        dense, idx = r(x)
        return dense.gather(1, idx), idx, None
    first, w, idx = r(x)
    return w, idx, first


def _has_router_module(family: str) -> bool:
    """4.57 softmax families route inside the block (gate is nn.Linear); covered by test_block_matches_reference."""
    return FUSED or compat.FAMILIES[family].router_kind in (compat.SIGMOID_GROUP_TOPK, compat.GPT_OSS_TOPK)


FAMILIES = zoo.families()
ROUTER_CASES = [(f, v) for f in FAMILIES if _has_router_module(f) for v in VARIANTS]
BLOCK_FAMILIES = [f for f in FAMILIES if f != compat.GEMMA4]  # Gemma4's "block" is the whole decoder layer


@pytest.mark.parametrize(("family", "variant"), ROUTER_CASES)
def test_router_matches_reference(family, variant):
    _, d = _model(family, variant)
    layer = d["layers"][0]
    x = _x(d["H"])
    with torch.no_grad():
        w, idx, _ = _upstream_route(d, layer, x)
    rw, ridx = _ref_route(d, layer, x)
    w, idx = rr.canonical_order(w, idx)
    rw, ridx = rr.canonical_order(rw, ridx)
    assert torch.equal(idx, ridx), f"{family}: routed experts differ\n{idx}\n{ridx}"
    assert rel_err(w, rw) < RTOL_F32  # fp32 softmax/sigmoid of length-H logits: see module docstring


# ------------------------------------------------------------------------------------------------------------
# Experts module alone, with routing fixed by the reference (random positive weights so every slot counts).


def _routing_inputs(d: dict, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token drawn from 0..E-2 (so expert E-1 gets zero tokens); weights in [0.25, 1.25)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(d["E"] - 1, generator=g)[: d["k"]] for _ in range(T)])
    w = torch.rand(T, d["k"], generator=g, dtype=F64) + 0.25
    return idx, w


def _ref_experts(d: dict, experts, x, idx, w) -> torch.Tensor:
    """Reference experts forward in float64 from the module's own parameters."""
    if d["layout"] == "gpt_oss":
        alpha, limit = d["swiglu"]
        return rx.gpt_oss_experts(
            x, idx, w, experts.gate_up_proj, experts.gate_up_proj_bias, experts.down_proj, experts.down_proj_bias,
            alpha=alpha, limit=limit, compute_dtype=F64,
        )  # fmt: skip
    if d["layout"] == "module_list":
        gate, up, down = zoo.module_list_weights(experts)
        return rx.module_list_experts(x, idx, w, gate, up, down, d["act"], compute_dtype=F64)
    return rx.fused_linear_experts(x, idx, w, experts.gate_up_proj, experts.down_proj, d["act"], compute_dtype=F64)


def _call_experts(d: dict, experts, x, idx, w) -> torch.Tensor:
    if d["layout"] == "gpt_oss" and compat.gpt_oss_router_dense_scores(VERSION):
        # 4.57: weights are dense [T, E] and the hidden states [B, S, H] (CPU loop path)
        dense = rr.dense_weights(w, idx, d["E"])
        return experts(x[None], idx, dense).reshape(x.shape)
    return experts(x, idx, w)


EXPERT_CASES = [
    (f, v, impl)
    for f in FAMILIES
    for v in VARIANTS
    for impl in (compat.experts_implementations(VERSION) or ("module",))
    if FUSED or compat.expert_layout(f, VERSION) == "gpt_oss"
]


@pytest.mark.parametrize(("family", "variant", "impl"), EXPERT_CASES)
def test_experts_match_reference(family, variant, impl):
    model, d = _model(family, variant)
    if FUSED:
        zoo.set_experts_implementation(model, impl)
    experts = d["layers"][0].experts
    x = _x(d["H"])
    idx, w = _routing_inputs(d)
    with torch.no_grad():
        got = _call_experts(d, experts, x, idx, w.float())
    ref = _ref_experts(d, experts, x, idx, w)
    assert got.dtype == torch.float32
    assert rel_err(got, ref) < RTOL_F32  # two fp32 matmuls of length <= 32: see module docstring


F64_CASES = [
    (f, v, impl)
    for (f, v, impl) in EXPERT_CASES
    if impl == "module" or impl in compat.experts_implementations_float64(VERSION)
]


def _run_experts_in(dtype, model, d, impl, x, idx, w):
    """(upstream output, float64 reference) with the first layer's experts cast to `dtype` for the call."""
    if FUSED:
        zoo.set_experts_implementation(model, impl)
    experts = d["layers"][0].experts
    experts.to(dtype)
    try:
        with torch.no_grad():
            got = _call_experts(d, experts, x.to(dtype), idx, w.to(dtype))
        ref = _ref_experts(d, experts, x.to(dtype).to(F64), idx, w.to(dtype).to(F64))
    finally:
        experts.to(torch.float32)
    return got, ref


@pytest.mark.parametrize(("family", "variant", "impl"), F64_CASES)
def test_experts_match_reference_float64(family, variant, impl):
    """The experts forward in float64 agrees with the reference to float64 rounding."""
    model, d = _model(family, variant)
    idx, w = _routing_inputs(d)
    got, ref = _run_experts_in(F64, model, d, impl, _x(d["H"]), idx, w)
    assert got.dtype == F64
    assert rel_err(got, ref) < RTOL_F64  # float64: (H + I + 8)·2⁻⁵³ ≈ 8e-15 worst case, see module docstring


@pytest.mark.skipif(not FUSED, reason="experts implementations exist from transformers 5.0")
def test_grouped_mm_experts_refuse_float64():
    """Documented limitation (compat.experts_implementations_float64): grouped_mm experts raise on float64
    instead of falling back. Repro: `model.set_experts_implementation("grouped_mm")`, cast an `*Experts` module
    to float64 and call it on float64 hidden states on CPU."""
    model, d = _model(compat.QWEN3_MOE, "2i_ne_h")
    idx, w = _routing_inputs(d)
    assert "grouped_mm" not in compat.experts_implementations_float64(VERSION)
    with pytest.raises(RuntimeError, match="Float32, BFloat16 or Float16"):
        _run_experts_in(F64, model, d, "grouped_mm", _x(d["H"]), idx, w)


BF16_CASES = [(f, impl) for (f, v, impl) in EXPERT_CASES if v == "2i_ne_h" and impl != "batched_mm"]


@pytest.mark.parametrize(("family", "impl"), BF16_CASES)
def test_experts_match_reference_bf16(family, impl):
    """bf16 module and inputs vs float64 math on the same bf16 values. Rounded steps: the two matmul outputs,
    activation, gate·up product, routing-weight product, the k-sum / index_add into bf16 and the final cast,
    each <= u = 2⁻⁸ relative (products accumulate in fp32 inside the matmuls): ~7u; bound 12u ≈ 0.047."""
    model, d = _model(family, "2i_ne_h")
    idx, w = _routing_inputs(d)
    got, ref = _run_experts_in(torch.bfloat16, model, d, impl, _x(d["H"]), idx, w)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, ref) < 12 * 2.0**-8


# ------------------------------------------------------------------------------------------------------------
# Whole MoE block: routing + experts (+ shared experts), 4.57 ModuleList blocks included.


def _shared_ref(family: str, block, x: torch.Tensor) -> torch.Tensor:
    """Shared-expert term in float64 (transformers.md §1.3–1.5): Qwen3-Next / 3.5 gate it with
    ``sigmoid(x · g)``; DeepSeek-V3 / GLM4 add it ungated; the other families have none."""
    x = x.to(F64)

    def mlp(m):
        return rx.module_list_mlp(x, m.gate_proj.weight.to(F64), m.up_proj.weight.to(F64), m.down_proj.weight.to(F64))

    if family in (compat.QWEN3_NEXT, compat.QWEN3_5_MOE):
        return torch.sigmoid(x @ block.shared_expert_gate.weight.to(F64).T) * mlp(block.shared_expert)
    if family in (compat.DEEPSEEK_V3, compat.GLM4_MOE):
        return mlp(block.shared_experts)
    return torch.zeros_like(x)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", BLOCK_FAMILIES)
def test_block_matches_reference(family, variant):
    model, d = _model(family, variant)
    if FUSED:
        zoo.set_experts_implementation(model, "eager")
    layer = d["layers"][0]
    x = _x(d["H"])
    with torch.no_grad():
        out = layer.block(x[None])
    got = (out[0] if isinstance(out, tuple) else out).reshape(x.shape)
    w, idx = _ref_route(d, layer, x)
    ref = _ref_experts(d, layer.experts, x.to(F64), idx, w) + _shared_ref(family, layer.block, x)
    assert rel_err(got, ref) < RTOL_F32  # fp32 routing + two matmuls: see module docstring


# ------------------------------------------------------------------------------------------------------------
# Version-dependent behaviour, expected values from impl/compat.py.


def _negative_choice_case(d: dict, layer) -> torch.Tensor:
    """Set a correction bias under which, for every token, the group-limited top-k must include an allowed
    expert with ``s + bias < 0``: every expert gets bias -1 except expert 0 (+1), so the allowed set is
    group 0 plus the best other group, and only expert 0 has a positive choice score."""
    bias = torch.full((d["E"],), -1.0)
    bias[0] = 1.0
    with torch.no_grad():
        layer.router.e_score_correction_bias.copy_(bias)
    return bias


@pytest.mark.parametrize("family", [f for f in FAMILIES if compat.FAMILIES[f].router_kind == compat.SIGMOID_GROUP_TOPK])
def test_group_mask_value(family):
    """DeepSeek-V3 / GLM4-MoE mask non-selected groups with compat.group_mask_value(version) (0.0 up to 5.5,
    -inf from 5.6). With one positive choice score per token, mask 0.0 fills the second slot with a masked
    expert (c = 0 > negative allowed scores) and -inf with an allowed one. Which masked expert wins the 0.0 tie
    is torch.topk's choice, so the test checks only masked-vs-allowed membership."""
    _, d = _model(family, "2i_ne_h")
    layer = d["layers"][0]
    saved = layer.router.e_score_correction_bias.clone()
    try:
        bias = _negative_choice_case(d, layer)
        x = _x(d["H"])
        with torch.no_grad():
            _, idx, _ = _upstream_route(d, layer, x)
        p = d["router"]
        s = torch.sigmoid(x.to(F64) @ layer.router.weight.to(F64).T)
        group_size = d["E"] // p["n_group"]
        c = (s + bias.to(F64)).view(T, p["n_group"], group_size)
        kept = torch.topk(c.topk(2, dim=-1).values.sum(-1), p["topk_group"], dim=-1).indices  # [T, topk_group]
        group_of = idx // group_size
        allowed = (group_of[:, :, None] == kept[:, None, :]).any(-1)  # [T, k]
        masked_picks = int((~allowed).sum())
        if compat.group_mask_value(VERSION) == 0.0:
            assert masked_picks == T * (p["k"] - 1)  # every slot after expert 0 went to a masked expert
        else:
            assert masked_picks == 0
        assert bool((idx == 0).any(-1).all())  # expert 0 (the only positive score) always chosen
    finally:
        with torch.no_grad():
            layer.router.e_score_correction_bias.copy_(saved)


SOFTMAX_ROUTER_FAMILIES = [f for f in FAMILIES if compat.FAMILIES[f].router_kind == compat.SOFTMAX_TOPK]


@pytest.mark.skipif(not FUSED, reason="4.57 has no softmax router module (gate is nn.Linear)")
@pytest.mark.parametrize("family", SOFTMAX_ROUTER_FAMILIES)
def test_softmax_router_first_output(family):
    """5.0–5.5 softmax routers return the probabilities first, 5.6+ the raw logits (compat)."""
    _, d = _model(family, "2i_ne_h")
    layer = d["layers"][0]
    x = _x(d["H"])
    with torch.no_grad():
        first, _, _ = layer.router(x)
    logits = x.to(F64) @ layer.router.weight.to(F64).T
    want = logits if compat.softmax_router_first_output(VERSION) == "logits" else torch.softmax(logits, -1)
    assert rel_err(first, want) < RTOL_F32  # fp32 linear (+ softmax) of length H: see module docstring


@pytest.mark.skipif(not FUSED, reason="4.57 has no softmax router module (gate is nn.Linear)")
@pytest.mark.parametrize("family", SOFTMAX_ROUTER_FAMILIES)
def test_softmax_router_score_dtype(family):
    """In a bf16 model the top-k weights are bf16 iff compat says the router casts to the model dtype."""
    model = zoo.build_model(family, "2i_ne_h", seed=0, dtype=torch.bfloat16)
    layer = zoo.describe(model)["layers"][0]
    with torch.no_grad():
        _, w, _ = layer.router(_x(model.config.hidden_size, dtype=torch.bfloat16))
    want = torch.bfloat16 if compat.softmax_router_scores_in_model_dtype(family, VERSION) else torch.float32
    assert w.dtype == want
