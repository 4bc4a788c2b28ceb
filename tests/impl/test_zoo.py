"""tests/support/zoo.py and impl/compat.py against the installed transformers: every available family builds in every
variant, `describe` reports what the real modules hold, and compat's class-name facts match the real classes.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from impl import compat
from tests.support import zoo

pytestmark = pytest.mark.upstream

VERSION = transformers.__version__
FAMILIES = zoo.families()


@pytest.fixture(autouse=True)
def _record_upstream(record_property):
    record_property("upstream", f"transformers=={VERSION}")


def test_families_match_installed_transformers():
    """Exactly the families whose config and model classes exist in the installed transformers."""
    have = [
        name
        for name, fam in compat.FAMILIES.items()
        if hasattr(transformers, fam.config_class) and hasattr(transformers, fam.causal_lm_class)
    ]
    assert FAMILIES == have


@pytest.mark.parametrize("variant", zoo.variants())
@pytest.mark.parametrize("family", FAMILIES)
def test_build_and_describe(family, variant):
    model = zoo.build_model(family, variant, seed=0)
    d = zoo.describe(model)
    assert d["family"] == family and d["layout"] == compat.expert_layout(family, VERSION)
    E, H, I = d["E"], d["H"], d["I"]
    shapes = {
        "2i_eq_h": 2 * I == H,
        "2i_ne_h": 2 * I != H and I != H,
        "i_eq_h": I == H,
        "fp8": all(n % 128 == 0 and n >= 256 for n in (H, I, 2 * I)),
    }
    assert shapes[variant], (variant, H, I)
    assert zoo.fp8_aligned(variant) == (variant == "fp8")
    assert d["layers"] and len(d["experts"]) == len(d["routers"]) == len(d["layers"])
    for layer in d["layers"]:
        assert model.get_submodule(layer.path) is layer.block
        ex = layer.experts
        if d["layout"] == "module_list":
            assert isinstance(ex, torch.nn.ModuleList) and len(ex) == E
            gate, up, down = zoo.module_list_weights(ex)
            assert [tuple(t.shape) for t in gate + up + down] == [(I, H)] * 2 * E + [(H, I)] * E
        else:
            assert type(ex).__name__ == compat.experts_class_name(family, VERSION)
            want = {"fused_linear": [(E, 2 * I, H), (E, H, I)], "gpt_oss": [(E, H, 2 * I), (E, I, H)]}[d["layout"]]
            assert [tuple(ex.gate_up_proj.shape), tuple(ex.down_proj.shape)] == want
    if d["layout"] == "gpt_oss":
        assert d["act"] is None and d["swiglu"] == (compat.GPT_OSS_DEFAULT_ALPHA, compat.GPT_OSS_DEFAULT_LIMIT)
    else:
        assert d["act"] in ("silu", "gelu_pytorch_tanh") and d["swiglu"] is None
    assert d["router_kind"] == compat.FAMILIES[family].router_kind and d["router"]["k"] == d["k"] == zoo.K


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_runs_and_is_seed_deterministic(family):
    def state(seed):
        return zoo.build_model(family, "2i_ne_h", seed=seed).state_dict()

    a, b, c = state(3), state(3), state(4)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    ids = torch.randint(0, zoo.VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = zoo.build_model(family, "2i_ne_h", seed=3)(ids).logits
    assert logits.shape == (1, 6, zoo.VOCAB) and bool(torch.isfinite(logits).all())


def test_build_dtype_and_overrides():
    family = FAMILIES[0]
    model = zoo.build_model(family, "2i_eq_h", dtype=torch.bfloat16, num_hidden_layers=1)
    d = zoo.describe(model)
    assert len(d["layers"]) == 1
    assert {p.dtype for p in d["experts"][0].parameters()} == {torch.bfloat16}


def test_unknown_family_and_variant_raise():
    with pytest.raises(ValueError, match="not available"):
        zoo.build_config("llama", "2i_eq_h")
    with pytest.raises(KeyError, match="unknown variant"):
        zoo.build_config(FAMILIES[0], "huge")


@pytest.mark.skipif(not compat.fused_experts(VERSION), reason="experts implementations exist from transformers 5.0")
def test_set_experts_implementation_reaches_every_experts_module():
    model = zoo.build_model(compat.QWEN3_MOE, "2i_eq_h")
    for impl in compat.experts_implementations(VERSION):
        zoo.set_experts_implementation(model, impl)
        assert {ex.config._experts_implementation for ex in zoo.describe(model)["experts"]} == {impl}
    with pytest.raises(ValueError, match="not available"):
        zoo.set_experts_implementation(model, "megablocks")


def test_family_availability_facts():
    """compat's version boundaries for the two late families agree with the installed release."""
    assert hasattr(transformers, "Qwen3_5MoeForCausalLM") == compat.family_available(compat.QWEN3_5_MOE, VERSION)
    assert hasattr(transformers, "Gemma4ForCausalLM") == compat.family_available(compat.GEMMA4, VERSION)


def test_describe_bnb_4bit_model(tmp_path):
    """describe() reads logical shapes of bitsandbytes 4-bit params (quant_state.shape), so it works on a model
    loaded with load_in_4bit (4.57: every expert Linear becomes Linear4bit with packed [n/2, 1] bytes)."""
    pytest.importorskip("bitsandbytes")
    zoo.build_model(compat.QWEN3_MOE, "2i_ne_h").save_pretrained(tmp_path)
    bnb = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["lm_head", "mlp.gate"]
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb, device_map="cpu")
    d = zoo.describe(model)
    assert (d["E"], d["H"], d["I"]) == (zoo.E, zoo.VARIANTS["2i_ne_h"].hidden, zoo.VARIANTS["2i_ne_h"].inter)
    if d["layout"] == "module_list":
        gate = zoo.module_list_weights(d["experts"][0])[0][0]
        assert gate.quant_state is not None and tuple(gate.shape) != tuple(gate.quant_state.shape)
