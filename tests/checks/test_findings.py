"""finding_*: known upstream bugs inside the matrix, reproduced on the cell's real packages.

Each check decides from the facts sheets (/work/shared/upstream/) whether the installed versions are *affected*,
measures whether the bug is *observed*, and records:

- affected and observed -> status ``finding`` with the explanation paragraph;
- not affected and not observed -> ``pass`` (clean), with a note of what was measured;
- affected but not observed -> failure: the knowledge is stale (the bug is gone or the version range is wrong);
- observed but not affected -> failure: the bug reaches further than the facts say.

The measured quantities are recorded as metrics (``expected_affected``, ``observed`` 0/1, plus the numbers behind).
"""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from impl import compat  # noqa: E402
from impl.storage import storage_bytes  # noqa: E402
from reference.layout import Orientation, detect_orientation, parse_version, peft_swaps  # noqa: E402
from tests.checks import helpers  # noqa: E402
from tests.support import zoo  # noqa: E402

pytestmark = [pytest.mark.check, pytest.mark.upstream]

PEFT = peft.__version__
TF = transformers.__version__
PEFT_RELEASE = parse_version(PEFT)[0]
TF_RELEASE = parse_version(TF)[0]


def verdict(moe_check, *, affected: bool, observed: bool, explanation: str, clean: str) -> None:
    """Record the finding / clean status, or fail when observation and expectation disagree."""
    moe_check.metric("expected_affected", float(affected))
    moe_check.metric("observed", float(observed))
    versions = f"transformers {TF}, PEFT {PEFT}"
    if affected and not observed:
        raise AssertionError(f"stale knowledge: expected this bug in {versions} but it was not reproduced. {clean}")
    if observed and not affected:
        raise AssertionError(f"bug observed outside its known range ({versions}): {explanation}")
    if observed:
        moe_check.finding(explanation)
    else:
        moe_check.note(f"clean in {versions}: {clean}")


# --- PEFT 0.19.0 vs 0.19.1 swap-rule inversion ------------------------------------------------------------------


class _Experts3D(nn.Module):
    """A bare 3-D expert parameter ``w [E, d1, d2]``, with ``is_transposed`` set only when given (absent otherwise)."""

    def __init__(self, E: int, d1: int, d2: int, is_transposed: bool | None):
        super().__init__()
        self.w = nn.Parameter(torch.randn(E, d1, d2) * 0.1)
        if is_transposed is not None:
            self.is_transposed = is_transposed

    def forward(self, x):
        return torch.einsum("ti,eio->to", x, self.w)


class _Holder(nn.Module):
    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts

    def forward(self, x):
        return self.experts(x)


def _wrapper_state(model, param: str, E: int, shape) -> tuple[bool, Orientation]:
    """``(live _did_swap_in_out_features, orientation read from the lora shapes alone)`` of the only ParamWrapper."""
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper) and m.parameter_name == param]
    if not wrappers:
        raise RuntimeError(f"PEFT {PEFT} created no ParamWrapper for {param!r}")
    w = wrappers[0]
    A, B = w.lora_A["default"].weight, w.lora_B["default"].weight
    shapes_say = detect_orientation(shape, A.shape, B.shape, E).orientation  # non-square: the shapes decide alone
    return bool(getattr(w, "_did_swap_in_out_features", False)), shapes_say


def _bare_case(is_transposed: bool | None) -> tuple[bool, Orientation]:
    E, d1, d2 = 4, 12, 8
    torch.manual_seed(0)
    model = _Holder(_Experts3D(E, d1, d2, is_transposed))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_parameters=["experts.w"]))
    return _wrapper_state(pm, "w", E, (E, d1, d2))


def _real_non_transposed_case(family: str) -> tuple[bool, Orientation, bool | None]:
    """gate_up_proj of a real zoo experts module that is not transposed in PEFT's sense (attribute False/absent)."""
    model = zoo.build_model(family, "2i_ne_h", seed=0)
    ex = zoo.describe(model)["experts"][0]
    is_t = getattr(ex, "is_transposed", None)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_parameters=["experts.gate_up_proj"]))
    did, shapes_say = _wrapper_state(pm, "gate_up_proj", ex.gate_up_proj.shape[0], tuple(ex.gate_up_proj.shape))
    return did, shapes_say, is_t


def _non_transposed_family() -> str:
    """qwen3_moe on 5.x (is_transposed=False); GPT-OSS on 4.57 (fused, no is_transposed attribute)."""
    return compat.QWEN3_MOE if compat.fused_experts(TF) else compat.GPT_OSS


def _check_rule(moe_check, label: str, did: bool, shapes_say: Orientation, is_t: bool | None) -> None:
    rule = peft_swaps(PEFT, 3, is_t)
    moe_check.metric(f"did_swap_{label}", float(did))
    moe_check.metric(f"rule_swaps_{label}", float(rule))
    want = Orientation.SWAPPED if did else Orientation.STANDARD
    if shapes_say is not want:
        raise AssertionError(f"{label}: _did_swap_in_out_features={did} but the lora shapes say {shapes_say.value}")
    if did != rule:
        raise AssertionError(
            f"{label}: live PEFT {PEFT} swap flag {did} != reference.layout.peft_swaps rule {rule} "
            f"(is_transposed={is_t}); the project's swap rule is stale"
        )


@pytest.mark.skipif(PEFT_RELEASE < (0, 17, 0), reason=f"PEFT {PEFT} has no ParamWrapper")
def test_finding_peft_orientation_0190_vs_0191(moe_check):
    moe_check.set(name="finding_peft_orientation_0190_vs_0191")
    with helpers.single_thread():
        absent = _bare_case(None)
        transposed = _bare_case(True)
        fam = _non_transposed_family()
        real_did, real_shapes, real_is_t = _real_non_transposed_case(fam)
    _check_rule(moe_check, "is_transposed_absent", *absent, None)
    _check_rule(moe_check, "is_transposed_true", *transposed, True)
    _check_rule(moe_check, f"{fam}_gate_up", real_did, real_shapes, real_is_t)
    # 0.19.0's rule: swap iff is_transposed -> (absent: no swap, True: swap); 0.19.1+: the exact inverse.
    observed = (absent[0], transposed[0]) == (False, True)
    explanation = (
        f"PEFT {PEFT} swaps in/out of a 3-D target parameter iff the experts module has is_transposed=True (PR #3083). "
        "PEFT 0.19.1 (PR #3165) inverted this: it swaps iff the param is 3-D and NOT transposed. So for the same "
        f"model the two releases put lora_A on opposite sides: measured here on {fam} gate_up_proj "
        f"(is_transposed={real_is_t}): _did_swap_in_out_features={real_did}, i.e. lora_A spans "
        f"{'d2' if real_did else 'd1'} of [E, d1, d2]; 0.19.1+ does the opposite. Adapters saved with 0.19.0 fail to "
        "load in 0.19.1+ with a size mismatch when d1 != d2, and load silently with every expert's delta transposed "
        "when d1 == d2 (2I == H for gate_up, I == H for down); no migration exists upstream."
    )
    verdict(moe_check, affected=PEFT_RELEASE == (0, 19, 0), observed=observed, explanation=explanation,
            clean=f"swap flags (absent, True) = ({absent[0]}, {transposed[0]}) follow the "
                  f"{'0.17/0.18 never-swap' if PEFT_RELEASE < (0, 19, 0) else '0.19.1+'} rule")  # fmt: skip


# --- PEFT 0.21 drift on an already-parametrized 3-D expert tensor -----------------------------------------------


def _drift_model():
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    fam = _non_transposed_family()
    model = zoo.build_model(fam, "2i_ne_h", seed=0)
    layers = zoo.describe(model)["layers"]
    for layer in layers:
        replace_parameter_4bit(layer.experts, "gate_up_proj", quant_type="nf4")
    targets = [f"{layer.path}.experts.gate_up_proj" for layer in layers]  # parametrized: PEFT matches full names only
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_parameters=targets, init_lora_weights=False)
    return fam, peft.get_peft_model(model, cfg), [layer.experts for layer in layers]


def _leftover_proxies(experts: list[nn.Module]) -> int:
    return sum(
        type(p).__name__ in ("_LoraFactorsProxy", "_LoraParameterProxy")
        for ex in experts
        for p in ex.parametrizations["gate_up_proj"]
    )


@pytest.mark.skipif(PEFT_RELEASE < (0, 17, 1), reason=f"PEFT {PEFT} does not handle parametrized targets")
def test_finding_peft_021_parametrization_drift(moe_check):
    moe_check.set(name="finding_peft_021_parametrization_drift")
    x = torch.arange(3, 3 + 8).unsqueeze(0)
    with helpers.single_thread(), torch.no_grad():
        fam, pm, experts = _drift_model()
        ys = [pm(input_ids=x).logits for _ in range(3)]
        leftovers = _leftover_proxies(experts)
        with pm.disable_adapter():
            base = pm(input_ids=x).logits
    drift = float((ys[2] - ys[0]).abs().max())
    lora_effect = float((ys[0] - base).abs().max())
    moe_check.metric("drift_max_abs_logit_fwd3_vs_fwd1", drift)
    moe_check.metric("leftover_lora_proxies", leftovers)
    moe_check.require("lora_effect_max_abs_logit", lora_effect, 1e-4, op=">=", msg="the adapter changed nothing")
    observed = drift > 0.0 or leftovers > 0  # a correct stack gives bit-identical repeated forwards and no leftovers
    explanation = (
        f"PEFT {PEFT} folds the LoRA delta into torch.baddbmm through a `_LoraFactorsProxy` parametrization "
        "(PR #3577), but `_remove_parametrizations` still only looks for `_LoraParameterProxy`. When the targeted 3-D "
        f"expert tensor already carries a parametrization (here bitsandbytes `replace_parameter_4bit` NF4 on {fam} "
        f"gate_up_proj), each forward leaves its proxy behind ({leftovers} left after 3 forwards + 1 disabled) and "
        f"the output drifts: max |Δlogit| between forward 3 and forward 1 = {drift:.3g} on identical inputs. "
        "PEFT 0.20.0 and earlier remove their proxy and are stable. Anything that stacks LoRA on a parametrized "
        "(e.g. bnb-4bit) expert tensor under PEFT 0.21 trains and evaluates a different model each step."
    )
    verdict(moe_check, affected=PEFT_RELEASE >= (0, 21, 0), observed=observed, explanation=explanation,
            clean=f"3 forwards bit-identical, no leftover proxy, LoRA effect {lora_effect:.3g}")  # fmt: skip


# --- transformers 5.x BitsAndBytesConfig leaves fused 3-D experts in bf16 --------------------------------------


def _expert_bytes(model) -> int:
    """Real bytes of the routed experts (fused module or ModuleList named ``experts``; shared experts excluded)."""
    mods = [m for n, m in model.named_modules() if n.endswith(".experts")]
    if not mods:
        raise RuntimeError(f"no `.experts` module in {type(model).__name__}")
    return sum(storage_bytes(m) for m in mods)


def _bnb_load(src: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(str(src), quantization_config=cfg, dtype=torch.bfloat16,
                                                device_map="cpu")  # fmt: skip


NOT_QUANTIZED_RATIO = 1.5  # bf16 -> NF4 is ~3.6x with absmax; anything below 1.5x means the experts stayed 16-bit


def test_finding_bnb_fused_experts_not_quantized(moe_check):
    moe_check.set(name="finding_bnb_fused_experts_not_quantized", family=compat.QWEN3_MOE)
    with helpers.single_thread(), tempfile.TemporaryDirectory() as d:
        model = zoo.build_model(compat.QWEN3_MOE, "2i_ne_h", seed=0, dtype=torch.bfloat16)
        bf16_bytes = _expert_bytes(model)
        model.save_pretrained(d)
        q = _bnb_load(Path(d))
        nf4_bytes = _expert_bytes(q)
        # grad mode on purpose: under no_grad in eval, bitsandbytes 0.50.2 on an AVX512-BF16 CPU repacks Linear4bit
        # weights and crashes when in_features < blocksize (H = 32 < 64); see finding_bnb_cpu_inference_repack.
        finite = bool(torch.isfinite(q(input_ids=torch.arange(3, 11).unsqueeze(0)).logits.detach()).all())
    ratio = bf16_bytes / nf4_bytes
    moe_check.metric("expert_bytes_bf16", bf16_bytes)
    moe_check.metric("expert_bytes_after_bnb_nf4", nf4_bytes)
    moe_check.metric("shrink_ratio", ratio)
    if not finite:
        raise AssertionError("the bnb-loaded model produced non-finite logits")
    explanation = (
        f"transformers {TF} `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, "
        "bnb_4bit_quant_type='nf4'))` quantizes only nn.Linear modules; the fused 3-D expert tensors "
        f"(gate_up_proj [E, 2I, H], down_proj [E, H, I]) are plain nn.Parameters and stay bf16: measured expert bytes "
        f"{bf16_bytes} -> {nf4_bytes} (x{ratio:.2f}) on tiny Qwen3-MoE, on CPU with bitsandbytes. On real MoE models "
        "the experts are >90 % of the weights, so 'QLoRA' on 5.x with stock bnb saves almost no memory; transformers "
        "4.57 (per-expert nn.Linear) did quantize them. impl.quant_experts provides NF4 expert storage instead."
    )
    verdict(moe_check, affected=compat.fused_experts(TF), observed=ratio < NOT_QUANTIZED_RATIO,
            explanation=explanation, clean=f"per-expert Linear4bit: expert bytes x{ratio:.2f} smaller")  # fmt: skip


# --- transformers 5.0-5.7 Fp8Quantize keeps only expert 0 of a fused tensor ------------------------------------


def _fp8_quantize_op():
    try:
        from transformers.integrations.finegrained_fp8 import Fp8Quantize
        from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer
    except ImportError as exc:
        pytest.skip(f"transformers {TF} has no Fp8Quantize conversion op ({exc}); FP8 there is per-expert FP8Linear")
    from transformers import FineGrainedFP8Config

    return Fp8Quantize(FineGrainedFP8HfQuantizer(FineGrainedFP8Config(weight_block_size=(128, 128))))


def _fp8_dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``q.float() * S`` broadcast over 128x128 tiles (exact grid)."""
    s = s.repeat_interleave(128, dim=-2).repeat_interleave(128, dim=-1)
    return q.float() * s


FP8_REL_ERR = 0.05  # e4m3 rounding: ≤ 2^-4 relative per value, RMS ~3.6 %; 5 % bounds a correct quantization


def test_finding_fp8_expert0_only(moe_check):
    moe_check.set(name="finding_fp8_expert0_only")
    op = _fp8_quantize_op()
    E, key = 4, "model.layers.0.mlp.experts.gate_up_proj"
    w = torch.randn(E, 256, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    out = op.convert({key: w}, source_patterns=None, target_patterns=None, full_layer_name=key, model=None,
                     config=None, missing_keys=set())  # fmt: skip
    q, s = out[key], out[key + "_scale_inv"]
    moe_check.metric("input_experts", E)
    moe_check.metric("output_ndim", q.ndim)
    observed = tuple(q.shape) != tuple(w.shape)
    if observed:  # confirm what it kept is expert 0
        err0 = float((_fp8_dequant(q, s) - w[0].float()).norm() / w[0].float().norm())
        moe_check.require("kept_is_expert0_rel_err", err0, FP8_REL_ERR, msg="the kept slice is not expert 0")
    else:
        err = float((_fp8_dequant(q, s) - w.float()).norm() / w.float().norm())
        moe_check.require("dequant_rel_err_all_experts", err, FP8_REL_ERR)
    explanation = (
        f"transformers {TF} `Fp8Quantize.convert` unpacks its input with `value = value[0]`, written for a list of "
        "one tensor; after the MoE WeightConverter the value is the fused [E, 2I, H] tensor itself, so it quantizes "
        f"and returns expert 0 only: measured {tuple(w.shape)} in -> {tuple(q.shape)} out (scale grid "
        f"{tuple(s.shape)}), through the real conversion op on CPU. Loading with quantization_config="
        "FineGrainedFP8Config therefore sets a 2-D tensor where the [E, ...] experts should be (the loader does not "
        "check shapes when a quantizer is active) and saving writes corrupted experts. Fixed in 5.8."
    )
    verdict(moe_check, affected=(5, 0, 0) <= TF_RELEASE < (5, 8, 0), observed=observed, explanation=explanation,
            clean=f"all {E} experts quantized: output {tuple(q.shape)}")  # fmt: skip


# --- bitsandbytes CPU inference repack crash when in_features < blocksize (found while building these checks) ----


def _linear4bit(k: int, n: int):
    import bitsandbytes as bnb

    gen = torch.Generator().manual_seed(0)
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    w = torch.randn(n, k, generator=gen) / k**0.5
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=64)._quantize("cpu")
    return layer.eval()


def test_finding_bnb_cpu_inference_repack(moe_check):
    """bnb 0.50.2 ``Linear4bit.forward`` on an AVX512-BF16 CPU, eval + no-grad input: repacks the weight for its CPU
    kernel; the repack reshapes absmax to ``[N, K // blocksize]``, which is 0 columns when K < blocksize."""
    from importlib import metadata

    bnb_version = metadata.version("bitsandbytes")
    layer = _linear4bit(32, 64)
    affected = bool(getattr(layer, "support_avx512bf16_for_cpu", False)) and bnb_version == "0.50.2"
    moe_check.metric("cpu_avx512bf16", float(bool(getattr(layer, "support_avx512bf16_for_cpu", False))))
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    error = None
    with torch.no_grad():
        try:
            y = layer(x)
        except RuntimeError as exc:  # the crash under test; anything else propagates
            if "is invalid for input of size" not in str(exc):
                raise
            error = str(exc)
    if error is None:
        moe_check.metric("output_rows", y.shape[0])
    explanation = (
        f"bitsandbytes {bnb_version} on a CPU with AVX512-BF16: `Linear4bit.forward` in eval mode with an input that "
        "does not require grad (i.e. any inference under torch.no_grad) converts the weight to a CPU packing format "
        "on first use (`_convert_weight_packed_for_cpu`), which reshapes absmax to [N, K // blocksize]; with "
        f"in_features K < blocksize (32 < 64 here) that is 0 columns and the forward raises: {error}. "
        "Tiny test models (hidden 32) hit it in every NF4 inference on such CPUs (transformers 4.57 NF4 experts are "
        "Linear4bit); training (grad mode) does not. The checks generate with the flag "
        "`support_avx512bf16_for_cpu` off on Linear4bit modules to keep running."
    )
    verdict(moe_check, affected=affected, observed=error is not None, explanation=explanation,
            clean=f"no-grad eval forward of Linear4bit(32 -> 64) works (avx512bf16={affected}, bnb {bnb_version})")  # fmt: skip
