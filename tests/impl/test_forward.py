"""impl experts forward vs the float64 reference, for every family of the installed transformers x {dense, nf4, fp8}.

The reference (`reference.experts`) runs in float64 on the module's own dequantized weights (storage exactness vs
`reference.nf4` / `reference.fp8` is tests/impl/test_quant_experts.py), so these bounds measure only the forward's
arithmetic: bf16 compute <= 2e-2, fp32 compute <= 1e-5 relative Frobenius error (derivation in moe_helpers.REL_TOL).

With PEFT LoRA (``target_parameters`` on both 3-D weights, lora_B randomised so orientation errors are visible), the
reference takes the factors in the orientation `reference.layout.peft_swaps(peft.__version__, 3, is_transposed)`
predicts, independently of the live wrapper flag impl reads. Gradients: LoRA factor grads and dX match the reference's
autograd; every expert that received tokens has nonzero LoRA grads and the expert that got none has exactly zero.
GPU (marked gpu): the same quantized model with LoRA moved to CUDA gives the CPU logits and LoRA grads (bf16 bound).

Guards of the forward (issues 12 / 13), each forcing its situation: the CPU model path runs LoRA as grouped GEMMs
(the count of matmul-like ops does not grow with E); a backend asked for by name that cannot run raises, with and
without an adapter; float64 has one explicit path ("loop"); an orientation error raises inside the forward and LoRA is
never silently off; backward keeps no dense dequantized copy of quantized experts.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from impl.backends import BACKENDS, register_backend  # noqa: E402
from impl.forward import LoraSpec, expert_lora, lora_attached  # noqa: E402
from impl.loading import quantize_experts  # noqa: E402
from impl.quant_experts import QuantizedExperts  # noqa: E402
from impl.storage import DenseConfig, QuantizedExpertsError  # noqa: E402
from impl.torch_backend import LoopBackend  # noqa: E402
from reference.layout import FUSED_LINEAR, GPT_OSS, LayoutError, Orientation, peft_swaps  # noqa: E402
from reference.lora import STRIDE_E, LoraFactors, convert_adapter, delta_weight  # noqa: E402
from tests.impl.moe_helpers import (  # noqa: E402
    F64,
    KINDS,
    REL_TOL,
    dense_copies,
    held_for_backward,
    quant_config,
    reference_experts,
    rel_err,
    routing_inputs,
    tiny,
)
from tests.support import zoo  # noqa: E402
from tests.support.zoo import Holder  # noqa: E402

pytestmark = pytest.mark.upstream
BF16 = torch.bfloat16
FUSED_FAMILIES = [f for f in zoo.families() if zoo.compat.expert_layout(f, zoo.installed_version()) != "module_list"]
R, ALPHA = 2, 4
GPU_IDS = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))


def _quantized(family, kind, dtype=BF16, variant="2i_ne_h"):
    m = tiny(family, variant, dtype=dtype)
    quantize_experts(m, quant_config(kind, dtype, variant))
    d = zoo.describe(m)
    return m, d


@functools.cache
def _original(family, dtype=BF16):
    """(first experts module, describe()) of a cached tiny model; QuantizedExperts never modifies the original."""
    d = zoo.describe(tiny(family, dtype=dtype))
    return d["experts"][0], {k: d[k] for k in ("E", "H", "I")}


def _experts(family, kind, dtype=BF16):
    ex, d = _original(family, dtype)
    return QuantizedExperts(ex, quant_config(kind, dtype)), d


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_experts_forward_matches_reference(family, kind):
    q, d = _experts(family, kind)
    x, idx, w = routing_inputs(d["E"], d["H"], dtype=BF16)
    got = q(x, idx, w)
    assert got.dtype == BF16 and got.shape == x.shape
    assert rel_err(got, reference_experts(q, x, idx, w)) <= REL_TOL[BF16]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_experts_forward_fp32_tight(family):
    if family not in FUSED_FAMILIES:
        pytest.skip(f"{family} has no fused experts in transformers {zoo.installed_version()}")
    q, d = _experts(family, "nf4", torch.float32)
    x, idx, w = routing_inputs(d["E"], d["H"])
    for backend in ("grouped_mm", "loop"):
        q.backend = backend
        assert rel_err(q(x, idx, w), reference_experts(q, x, idx, w)) <= REL_TOL[torch.float32], backend


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_full_model_matches_transformers_on_dequantized_weights(family):
    """The swapped module inside the real model (the model's own router, shared experts, norms): logits ==
    transformers' own experts implementation on the dequantized weights (fp32)."""
    m, d = _quantized(family, "nf4", torch.float32)
    ref_model = tiny(family, dtype=torch.float32)
    for q, ex in zip(d["experts"], zoo.describe(ref_model)["experts"]):
        with torch.no_grad():
            for n in ("gate_up_proj", "down_proj"):
                getattr(ex, n).copy_(q.storage(n).dequantize(torch.float32))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    assert rel_err(m(ids).logits, ref_model(ids).logits) <= REL_TOL[torch.float32]


# --- LoRA through PEFT -------------------------------------------------------------------------------------------


TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def _randomize_lora_B(pm, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _peft(family, kind, dtype=BF16):
    """PEFT model around a Holder of one QuantizedExperts; lora_B random (PEFT's zeros would hide orientation)."""
    q, d = _experts(family, kind, dtype)
    pm = peft.get_peft_model(Holder(q), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_parameters=TARGETS))
    _randomize_lora_B(pm)
    return pm, d


def _wrappers(pm):
    """(outer wrapper = down_proj, inner = gate_up_proj)."""
    outer = pm.base_model.model.experts
    return outer, outer.base_layer


def _factors(wrapper, q, dtype=F64, requires_grad=False) -> LoraFactors:
    swapped = peft_swaps(peft.__version__, 3, q.is_transposed)
    A = wrapper.lora_A["default"].weight.detach().to(dtype).requires_grad_(requires_grad)
    B = wrapper.lora_B["default"].weight.detach().to(dtype).requires_grad_(requires_grad)
    o = Orientation.SWAPPED if swapped else Orientation.STANDARD
    return LoraFactors(A, B, float(wrapper.scaling["default"]), o)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_lora_forward_and_gradients_match_reference(family, kind):
    pm, d = _peft(family, kind)
    outer, inner = _wrappers(pm)
    assert (outer.parameter_name, inner.parameter_name) == ("down_proj", "gate_up_proj")
    q = inner.base_layer
    E = d["E"]
    x, idx, w = routing_inputs(E, d["H"], T=16, dtype=BF16, skip=E - 1)
    x.requires_grad_(True)
    got = outer(x, idx, w)
    proj = torch.randn(got.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    (got.float() * proj.float()).sum().backward()

    x64 = x.detach().to(F64).requires_grad_(True)
    lora = {"gate_up": _factors(inner, q, requires_grad=True), "down": _factors(outer, q, requires_grad=True)}
    ref = reference_experts(q, x64, idx, w, lora=lora)
    (ref * proj).sum().backward()
    # bf16 forward with LoRA: bound REL_TOL[bf16]; grads pass through the same roundings once more: 2x.
    assert rel_err(got, ref) <= REL_TOL[BF16]
    assert rel_err(x.grad, x64.grad) <= 2 * REL_TOL[BF16]
    hit = set(idx.unique().tolist())
    assert hit == set(range(E - 1))
    for wrapper, key in ((inner, "gate_up"), (outer, "down")):
        A, B = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
        assert rel_err(A.grad, lora[key].lora_A.grad) <= 2 * REL_TOL[BF16], key
        assert rel_err(B.grad, lora[key].lora_B.grad) <= 2 * REL_TOL[BF16], key
        for e in range(E):
            a_e, b_e = A.grad[e * R : (e + 1) * R], B.grad[:, e::E]
            if e in hit:
                assert a_e.abs().sum() > 0 and b_e.abs().sum() > 0, (key, e)
            else:
                assert a_e.abs().sum() == 0 and b_e.abs().sum() == 0, (key, e)


def test_lora_dense_equals_peft_own_path():
    """DenseConfig experts + impl's LoRA == PEFT's own parametrization path on the unquantized model (fp32)."""
    family = FUSED_FAMILIES[0]
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_parameters=TARGETS)
    plain = peft.get_peft_model(tiny(family, dtype=torch.float32), cfg)
    m, _ = _quantized(family, "dense", torch.float32)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_parameters=TARGETS))
    _randomize_lora_B(pm)
    sd = _lora_state_in_orientation_of(pm, plain)
    missing = plain.load_state_dict(sd, strict=False)
    assert not missing.unexpected_keys
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    assert rel_err(pm(ids).logits, plain(ids).logits) <= REL_TOL[torch.float32]


def _lora_state_in_orientation_of(src, dst) -> dict[str, torch.Tensor]:
    """src's LoRA state dict, each ParamWrapper's factors re-expressed (same ΔW) in dst's orientation.

    The orientations can differ legitimately: on transformers 4.57 GPT-OSS has no ``is_transposed`` attribute, so PEFT
    >= 0.19.1 swaps on the stock module, while QuantizedExperts states ``is_transposed=True`` and is not swapped.
    """
    dst_wrappers = {n: m for n, m in dst.named_modules() if isinstance(m, peft.tuners.lora.ParamWrapper)}
    out = {}
    for name, w in src.named_modules():
        if not isinstance(w, peft.tuners.lora.ParamWrapper):
            continue
        d = dst_wrappers[name]
        a, b = w.lora_A["default"].weight.detach(), w.lora_B["default"].weight.detach()
        src_o = Orientation.SWAPPED if getattr(w, "_did_swap_in_out_features", False) else Orientation.STANDARD
        dst_o = Orientation.SWAPPED if getattr(d, "_did_swap_in_out_features", False) else Orientation.STANDARD
        a, b = convert_adapter(a, b, w.num_experts, src_orientation=src_o, dst_orientation=dst_o)
        out[f"{name}.lora_A.default.weight"], out[f"{name}.lora_B.default.weight"] = a, b
    return out


def test_dequantized_weights_not_saved_for_backward():
    pm, d = _peft(FUSED_FAMILIES[0], "nf4")
    outer, inner = _wrappers(pm)
    q = inner.base_layer
    full = min(q.storage(n).shape.numel() for n in ("gate_up_proj", "down_proj"))
    x, idx, w = routing_inputs(d["E"], d["H"], dtype=BF16)
    x.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        outer(x, idx, w).sum().backward()
    assert saved and max(saved) < full, (max(saved), full)


def test_peft_parametrization_reaching_storage_raises():
    pm, d = _peft(FUSED_FAMILIES[0], "nf4")
    outer, _ = _wrappers(pm)
    x, idx, w = routing_inputs(d["E"], d["H"], dtype=BF16)
    original_forward = type(outer).forward.__wrapped__  # PEFT's own ParamWrapper.forward
    with pytest.raises(QuantizedExpertsError, match="parametriz"):
        original_forward(outer, x, idx, w)


class _Variant(LoopBackend):
    """The loop backend under another name, with a capability switched off."""

    def __init__(self, name, lora=True, backward=True):
        self.name, self.lora, self.backward = name, lora, backward


def test_backend_registry_refusals():
    pm, d = _peft(FUSED_FAMILIES[0], "nf4")
    outer, inner = _wrappers(pm)
    q = inner.base_layer
    x, idx, w = routing_inputs(d["E"], d["H"], dtype=BF16)
    register_backend(_Variant("test_nolora", lora=False))
    register_backend(_Variant("test_nobwd", backward=False))
    try:
        q.backend = "test_nolora"
        with pytest.raises(QuantizedExpertsError, match="cannot apply the LoRA"):
            outer(x, idx, w)
        with pm.disable_adapter():
            outer(x, idx, w)  # no LoRA attached: allowed
        q.backend = "test_nobwd"
        xg = x.clone().requires_grad_(True)
        with pytest.raises(QuantizedExpertsError, match="no backward"):
            outer(xg, idx, w).sum().backward()
        q.backend = "no_such_backend"
        with pytest.raises(QuantizedExpertsError, match="unknown experts backend"):
            outer(x, idx, w)
    finally:
        BACKENDS.pop("test_nolora")
        BACKENDS.pop("test_nobwd")


# --- guards of the forward ------------------------------------------------------------------------------------------

MATMUL_OPS = ("mm", "bmm", "addmm", "baddbmm", "matmul", "mv", "dot", "_grouped_mm", "linear")


class _CountMatmuls(TorchDispatchMode):
    """Counts every matmul-like aten op that runs (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATMUL_OPS:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _matmuls_of_a_training_step(num_experts: int, backend: str) -> dict[str, int]:
    """Matmul-like ops of one forward + backward of a tiny NF4 Qwen3-MoE with PEFT LoRA on both expert weights."""
    family = "qwen3_moe"
    m = tiny(family, dtype=BF16, num_experts=num_experts)
    quantize_experts(m, quant_config("nf4", BF16), backend=backend)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_parameters=TARGETS))
    ids = torch.randint(3, 128, (1, 32), generator=torch.Generator().manual_seed(0))
    with _CountMatmuls() as mode:
        pm(ids, labels=ids).loss.backward()
    return mode.counts


@pytest.mark.skipif("qwen3_moe" not in FUSED_FAMILIES, reason="needs 5.x fused Qwen3-MoE experts")
def test_cpu_model_lora_is_grouped_not_a_loop_over_experts():
    """CPU "auto" (grouped_mm): the same number of matmul-like ops with 4 and with 32 experts. The control: the loop
    backend at 32 experts runs more (one per expert hit), so the count can tell the two apart."""
    few, many = _matmuls_of_a_training_step(4, "auto"), _matmuls_of_a_training_step(32, "auto")
    assert few.get("_grouped_mm", 0) > 0, few
    assert few == many, (few, many)
    loop = _matmuls_of_a_training_step(32, "loop")
    assert sum(loop.values()) > sum(many.values()) + 32, (loop, many)


def _holder_with_lora(q):
    pm = peft.get_peft_model(Holder(q), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_parameters=TARGETS))
    _randomize_lora_B(pm)
    return pm


@pytest.mark.parametrize("r", [1, 3, 8, 16])
def test_grouped_lora_matches_the_loop_for_any_rank(r):
    """The grouped LoRA (rank zero-padded to a 16-byte multiple, or not; PEFT's stride-E views made contiguous) gives
    the per-expert loop's output and LoRA gradients (fp32: bound 1e-5, moe_helpers.REL_TOL)."""
    q, d = _experts(FUSED_FAMILIES[0], "dense", torch.float32)
    pm = peft.get_peft_model(Holder(q), peft.LoraConfig(r=r, lora_alpha=2 * r, target_parameters=TARGETS))
    _randomize_lora_B(pm)
    x, idx, w = routing_inputs(d["E"], d["H"], dtype=torch.float32, skip=d["E"] - 1)
    got = {}
    for backend in ("grouped_mm", "loop"):
        q.backend = backend
        pm.zero_grad()
        out = pm(x, idx, w)
        out.square().sum().backward()
        got[backend] = (out.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if "lora_" in n})
    (y, gy), (ref, gref) = got["grouped_mm"], got["loop"]
    assert rel_err(y, ref) <= REL_TOL[torch.float32]
    assert len(gy) == 4
    for n in gy:
        assert rel_err(gy[n], gref[n]) <= REL_TOL[torch.float32], n


@pytest.mark.parametrize("layout", [FUSED_LINEAR, GPT_OSS])
@pytest.mark.parametrize("orientation", [Orientation.STANDARD, Orientation.SWAPPED])
def test_expert_lora_is_the_sum_of_the_adapters_delta_weights(layout, orientation):
    """`expert_lora` (one place: orientation -> per-expert down/up, adapters stacked along the rank) reproduces
    ``Σ ΔW`` of `reference.lora.delta_weight` in the layer's input -> output sense (float64, exact up to rounding)."""
    E, d1, d2 = 3, 10, 6
    a, b = (d1, d2) if orientation is Orientation.STANDARD else (d2, d1)
    g = torch.Generator().manual_seed(0)
    specs = [LoraSpec(torch.randn(r * E, a, generator=g, dtype=F64), torch.randn(b, r * E, generator=g, dtype=F64), s,
                      orientation.value, STRIDE_E) for r, s in ((2, 0.5), (3, 2.0))]  # fmt: skip
    in_features = d2 if layout == FUSED_LINEAR else d1  # fused_linear W [E, out, in]; GPT-OSS W [E, in, out]
    lora = expert_lora(specs, E, layout, in_features)
    got = (lora.down @ lora.up) * lora.scaling  # [E, in, out]
    want = sum(delta_weight(sp.lora_A, sp.lora_B, E, sp.scaling, orientation=sp.orientation, convention=STRIDE_E)
               for sp in specs)  # fmt: skip
    want = want.transpose(1, 2) if layout == FUSED_LINEAR else want
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(QuantizedExpertsError, match="input features"):
        expert_lora(specs, E, layout, in_features + 1)
    out_features = d1 + d2 - in_features
    assert expert_lora(specs, E, layout, in_features, out_features) is not None
    with pytest.raises(QuantizedExpertsError, match=f"give {out_features} output features, the weight has"):
        expert_lora(specs, E, layout, in_features, out_features + 1)


@pytest.mark.parametrize("with_lora", [False, True])
def test_explicit_backend_that_cannot_run_raises(with_lora):
    """grouped_mm has no float64 kernel; the Triton FP8 kernel needs 128x128 blocks (the tiny variant has 16x16). The
    error names the backend, the weights' kind and shape, the input dtype and device, the adapter and torch's version."""
    family = FUSED_FAMILIES[0]
    ex, d = _original(family, torch.float32)
    cases = [(QuantizedExperts(ex, DenseConfig(compute_dtype=F64)), "grouped_mm", F64, "float64"),
             (QuantizedExperts(ex, quant_config("fp8", torch.float32)), "triton", torch.float32, "128x128")]
    for q, backend, dtype, why in cases:
        model = _holder_with_lora(q) if with_lora else Holder(q)
        x, idx, w = routing_inputs(d["E"], d["H"], dtype=dtype)
        q.backend = backend
        with pytest.raises(QuantizedExpertsError) as err:
            model(x, idx, w)
        msg = str(err.value)
        for part in (repr(backend), q.kind, str(tuple(q.storage("gate_up_proj").shape)), str(dtype), "cpu",
                     torch.__version__, "with a LoRA adapter" if with_lora else "without a LoRA adapter", why):
            assert part in msg, (part, msg)


def test_float64_has_one_explicit_path():
    """"auto" refuses float64 on CPU and names backend="loop"; "loop" runs it, matching the float64 reference."""
    family = FUSED_FAMILIES[0]
    ex, d = _original(family, torch.float32)
    q = QuantizedExperts(ex, DenseConfig(compute_dtype=F64))
    pm = _holder_with_lora(q).to(F64)  # PEFT keeps its factors in fp32: all of it in float64
    x, idx, w = routing_inputs(d["E"], d["H"], dtype=F64)
    with pytest.raises(QuantizedExpertsError, match="backend='loop'"):
        pm(x, idx, w)
    q.backend = "loop"
    outer, inner = _wrappers(pm)
    lora = {"gate_up": _factors(inner, q), "down": _factors(outer, q)}
    assert rel_err(pm(x, idx, w), reference_experts(q, x, idx, w, lora=lora)) <= 1e-12


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_lora_is_never_silently_off(backend):
    """With the adapters enabled the output differs from ``disable_adapter()``'s by about the LoRA delta's size."""
    pm, d = _peft(FUSED_FAMILIES[0], "nf4")
    _, inner = _wrappers(pm)
    inner.base_layer.backend = backend
    x, idx, w = routing_inputs(d["E"], d["H"], dtype=BF16)
    on = pm(x, idx, w)
    with pm.disable_adapter():
        off = pm(x, idx, w)
    assert rel_err(on, off) > 0.1, rel_err(on, off)  # lora_B ~ N(0, 0.5): the delta is O(1) of the output


def test_orientation_error_inside_the_forward_raises():
    """Factors that fit neither orientation raise, through PEFT (detection) and when attached directly (forward)."""
    family = FUSED_FAMILIES[0]
    pm, d = _peft(family, "nf4")
    outer, inner = _wrappers(pm)
    q = inner.base_layer
    x, idx, w = routing_inputs(d["E"], d["H"], dtype=BF16)
    E, r = d["E"], R
    A = inner.lora_A["default"].weight
    with torch.no_grad():
        inner.lora_A["default"].weight = nn.Parameter(torch.randn(r * E, A.shape[1] + 3))
    with pytest.raises((LayoutError, QuantizedExpertsError)):
        pm(x, idx, w)
    with pm.disable_adapter():
        pm(x, idx, w)  # the base alone still runs
    d1, d2 = q.storage("gate_up_proj").shape[1:]
    bad = LoraSpec(torch.randn(r * E, d1 + d2), torch.randn(d1, r * E), 1.0, Orientation.SWAPPED.value, STRIDE_E)
    # the A side is d1 + d2 wide: the input side (standard layouts) or the output side (GPT-OSS [E, in, out]) fails
    with lora_attached(q, "gate_up_proj", [bad]), pytest.raises(QuantizedExpertsError, match="(input|output) features"):
        q(x, idx, w)


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
@pytest.mark.parametrize("kind", ["nf4", "fp8"])
def test_backward_keeps_no_dense_copy_of_quantized_experts(kind, backend):
    """Nothing the graph keeps for backward (saved tensors, custom-Function ctx tensors) is a dequantized weight."""
    pm, d = _peft(FUSED_FAMILIES[0], kind)
    _, inner = _wrappers(pm)
    q = inner.base_layer
    q.backend = backend
    x, idx, w = routing_inputs(d["E"], d["H"], dtype=BF16)
    x.requires_grad_(True)
    out, held = held_for_backward(lambda: pm(x, idx, w))
    assert held and not dense_copies(held, q), dense_copies(held, q)
    out.sum().backward()
    assert x.grad is not None and inner.lora_A["default"].weight.grad is not None


def test_post_expert_norm_is_refused():
    """transformers' ``has_post_expert_norm`` experts apply a norm impl.forward does not run: wrapping them raises."""
    ex, _ = _original(FUSED_FAMILIES[0])
    ex.has_post_expert_norm = True
    try:
        with pytest.raises(QuantizedExpertsError, match="post-expert norm"):
            QuantizedExperts(ex, quant_config("dense"))
    finally:
        del ex.has_post_expert_norm


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_silu_glu_flag_names_exactly_the_silu_gated_experts(family):
    """``silu_glu`` (the Triton backend's fused SiLU·up) is set where the gate is ``silu(g) * u`` on concatenated
    halves: a SiLU activation and no GPT-OSS interleaved clamped gate."""
    q, _ = _experts(family, "dense")
    cfg = getattr(q, "config", None)  # 4.57's GPT-OSS experts keep no config (and are transposed: never silu_glu)
    act = getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None)
    assert q.silu_glu == (not q.is_transposed and act in ("silu", "swish")), (family, act, q.is_transposed)


# --- GPU (marked gpu: run on the H200 with `pytest -m gpu`) ---------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_matches_cpu_with_lora(kind):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (run on the H200: pytest -m gpu)")
    if kind == "nf4":
        pytest.importorskip("bitsandbytes")
    family = FUSED_FAMILIES[0]
    m = tiny(family, "fp8", dtype=BF16)
    quantize_experts(m, quant_config(kind, BF16, "fp8"))
    pm = peft.get_peft_model(
        m, peft.LoraConfig(r=4, lora_alpha=8, target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    cpu = pm(GPU_IDS, labels=GPU_IDS)
    cpu.loss.backward()
    cpu_grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    pm.zero_grad()
    pm.to("cuda")
    q = next(mm for mm in pm.modules() if isinstance(mm, QuantizedExperts))
    assert q.gate_up_proj.device.type == "cuda" and q.storage("gate_up_proj").device.type == "cuda"
    gpu = pm(GPU_IDS.cuda(), labels=GPU_IDS.cuda())
    gpu.loss.backward()
    # bf16 bound; FP8: the CUDA kernel also quantizes the activations to e4m3 1x128 (3 mantissa bits: RMS rounding
    # 2^-4/sqrt(3) ~ 3.6 % per GEMM input) and the CPU grouped_mm does not: 0.1 as in tests/ops/test_model_dispatch.py
    # (measured 0.062 on the logits, H100, 2026-12-05)
    tol = 0.1 if kind == "fp8" else REL_TOL[BF16]
    assert rel_err(gpu.logits.cpu(), cpu.logits) <= tol
    for n, p in pm.named_parameters():
        if n in cpu_grads and "lora_" in n:
            assert rel_err(p.grad.cpu(), cpu_grads[n]) <= 4 * tol, n
