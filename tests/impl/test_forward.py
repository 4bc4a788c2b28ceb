"""impl experts forward vs the float64 reference, for every family of the installed transformers x {dense, nf4, fp8}.

The reference (`reference.experts`) runs in float64 on the module's own dequantized weights (storage exactness vs
`reference.nf4` / `reference.fp8` is tests/impl/test_quant_experts.py), so these bounds measure only the forward's
arithmetic: bf16 compute <= 2e-2, fp32 compute <= 1e-5 relative Frobenius error (derivation in moe_helpers.REL_TOL).

With PEFT LoRA (``target_parameters`` on both 3-D weights, lora_B randomised so orientation errors are visible), the
reference takes the factors in the orientation `reference.layout.peft_swaps(peft.__version__, 3, is_transposed)`
predicts, independently of the live wrapper flag impl reads. Gradients: LoRA factor grads and dX match the reference's
autograd; every expert that received tokens has nonzero LoRA grads and the expert that got none has exactly zero.
GPU (marked gpu): the same quantized model with LoRA moved to CUDA gives the CPU logits and LoRA grads (bf16 bound).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from impl.backends import BACKENDS, register_backend  # noqa: E402
from impl.loading import quantize_experts  # noqa: E402
from impl.quant_experts import QuantizedExperts  # noqa: E402
from impl.storage import QuantizedExpertsError  # noqa: E402
from impl.torch_backend import LoopBackend  # noqa: E402
from reference.layout import Orientation, peft_swaps  # noqa: E402
from reference.lora import LoraFactors, convert_adapter  # noqa: E402
from tests.impl.moe_helpers import (  # noqa: E402
    F64,
    KINDS,
    REL_TOL,
    quant_config,
    reference_experts,
    rel_err,
    routing_inputs,
    tiny,
)
from tests.support import zoo  # noqa: E402

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


class Holder(nn.Module):
    """The smallest model PEFT can wrap around one experts module (target key ``experts.<param>``)."""

    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def forward(self, x, idx, w):
        return self.experts(x, idx, w)


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
    assert rel_err(gpu.logits.cpu(), cpu.logits) <= REL_TOL[BF16]
    for n, p in pm.named_parameters():
        if n in cpu_grads and "lora_" in n:
            assert rel_err(p.grad.cpu(), cpu_grads[n]) <= 4 * REL_TOL[BF16], n
