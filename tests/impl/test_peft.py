"""PEFT LoRA on quantized experts, whole-model level, in this environment's PEFT (the matrix runs 0.18 / 0.19.0 /
0.19.1 / 0.21.2): training gradients per expert, save + reload with the ``moe_compat.json`` sidecar, real merge into
the quantized storage, exact unmerge, disabled adapters, and refusal of a sidecar that contradicts the live layout.

Bounds: reload / unmerge / disable are bit-exact (same storage, same factors, same arithmetic). The merged model's
expert storage equals `reference.merge.merge_into_nf4` / `merge_into_fp8` of the same delta exactly in fp32 (the
same quantizer runs on the same fp32 sum); its logits differ from the live-LoRA logits by one requantization, bounded
by twice the measured logits error of quantizing the base once (kind vs dense storage of the same weights).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from impl.loading import quantize_experts  # noqa: E402
from impl.peft_integration import (  # noqa: E402
    SIDECAR,
    load_adapter,
    quantized_wrappers,
    save_adapter,
    wrapper_orientation,
)
from impl.quant_experts import QuantizedExperts  # noqa: E402
from reference import merge as ref_merge  # noqa: E402
from reference import nf4 as ref_nf4  # noqa: E402
from reference.layout import LayoutError, Orientation, parse_version, peft_swaps  # noqa: E402
from tests.impl.moe_helpers import (  # noqa: E402
    FUSED_FAMILY,
    PEFT_RULES,
    contradicting_peft_versions,
    quant_config,
    rel_err,
    tiny,
)
from tests.impl.test_merge_faults import tree_digest  # noqa: E402

pytestmark = pytest.mark.upstream
FAMILY = FUSED_FAMILY
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]
IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
PROJ = torch.randn(2, 10, 128, generator=torch.Generator().manual_seed(1))
PEFT_VER = parse_version(peft.__version__)[0]
TF_VER = parse_version(transformers.__version__)[0]
# PEFT 0.19.x builds WeightConverter(distributed_operation=...), which transformers >= 5.6 rejects, for model types with
# a conversion mapping (qwen3_moe, mixtral, ...): PeftModel.from_pretrained raises TypeError (peft.md §5.2 item 4,
# fixed in PEFT 0.20). GPT-OSS has no mapping. impl.load_adapter works around it (see _skip_broken_v4_conversion).
RELOAD_BROKEN = (0, 19, 0) <= PEFT_VER < (0, 20, 0) and TF_VER >= (5, 6, 0) and FAMILY != "gpt_oss"


def _base(kind, dtype=torch.float32):
    m = tiny(FAMILY, dtype=dtype)
    quantize_experts(m, quant_config(kind, dtype))
    return m


def _peft(kind, dtype=torch.float32, randomize=True):
    pm = peft.get_peft_model(_base(kind, dtype), peft.LoraConfig(r=2, lora_alpha=4, target_parameters=TARGETS))
    if randomize:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pm


def _quant_err(kind) -> float:
    """Relative logits error of quantizing the experts once (kind vs dense storage of the same weights)."""
    with torch.no_grad():
        return rel_err(_base(kind)(IDS).logits, _base("dense")(IDS).logits)


def _record_routing(model):
    hits: dict[int, set] = {}
    handles = []
    for i, (_, m) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, QuantizedExperts)):

        def hook(mod, args, kwargs, i=i):
            idx = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
            hits.setdefault(i, set()).update(idx.reshape(-1).tolist())

        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    return hits, handles


@pytest.mark.parametrize("kind", ["nf4", "fp8"])
def test_training_grads_reach_every_routed_expert(kind):
    """From PEFT's init (lora_B = 0): lora_B grads nonzero exactly for routed experts; after one SGD step, lora_A too.

    The loss is a fixed random projection of all logits, so every routed token influences it."""
    pm = _peft(kind, torch.bfloat16, randomize=False)
    pm.train()
    hits, handles = _record_routing(pm)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    for step in range(2):
        opt.zero_grad()
        hits.clear()
        # every position contributes (a causal-LM loss ignores the last position, whose experts then get no grad)
        logits = pm(IDS).logits
        (logits.float() * PROJ).sum().backward()
        wrappers = [w for _, w in quantized_wrappers(pm)]
        qs = [m for _, m in pm.named_modules() if isinstance(m, QuantizedExperts)]
        for w in wrappers:
            E, r = w.num_experts, w.r["default"]
            hit = hits[qs.index(w.get_base_layer())]
            assert hit, "no routing recorded"
            A, B = w.lora_A["default"].weight.grad, w.lora_B["default"].weight.grad
            for e in range(E):
                b_nz = B[:, e::E].abs().sum() > 0
                a_nz = A[e * r : (e + 1) * r].abs().sum() > 0
                assert b_nz == (e in hit), (w.parameter_name, e, step)
                if step == 1:
                    assert a_nz == (e in hit), (w.parameter_name, e, step)
        opt.step()
    for h in handles:
        h.remove()


def test_orientation_follows_peft_version_and_adapter_placement():
    """Orientation per `peft_swaps`; PEFT read the carrier's logical shape (in/out features), placed the adapters on
    the storage's device and upcast them to fp32 (its autocast_adapter_dtype) from the bf16 compute dtype."""
    pm = _peft("nf4", torch.bfloat16)
    for _, w in quantized_wrappers(pm):
        q = w.get_base_layer()
        E, d1, d2 = q.storage(w.parameter_name).shape
        assert w.num_experts == E and {w.in_features, w.out_features} == {d1, d2}
        for lin in (w.lora_A["default"], w.lora_B["default"]):
            assert lin.weight.dtype == torch.float32 and lin.weight.device == q.storage(w.parameter_name).device
        want = Orientation.SWAPPED if peft_swaps(peft.__version__, 3, q.is_transposed) else Orientation.STANDARD
        assert wrapper_orientation(w, "default") is want


@pytest.mark.parametrize("kind", ["nf4", "fp8"])
def test_save_reload_with_sidecar(kind, tmp_path):
    pm = _peft(kind)
    live = pm(IDS).logits
    info = save_adapter(pm, str(tmp_path))
    assert info["lora_B_convention"] == "stride_e" and info["adapters"]["default"]
    on_disk = json.loads((tmp_path / SIDECAR).read_text())
    assert on_disk == json.loads(json.dumps(info))
    if RELOAD_BROKEN:  # PEFT alone fails; impl.load_adapter skips the (identity) v4 conversion that breaks
        with pytest.raises(TypeError, match="distributed_operation"):
            peft.PeftModel.from_pretrained(_base(kind), str(tmp_path))
    reloaded = load_adapter(_base(kind), str(tmp_path))
    assert torch.equal(reloaded(IDS).logits, live)
    # a sidecar claiming the other orientation for non-square shapes must be refused (it does not describe the file)
    key = next(iter(on_disk["adapters"]["default"]))
    o = on_disk["adapters"]["default"][key]["orientation"]
    on_disk["adapters"]["default"][key]["orientation"] = "swapped" if o == "standard" else "standard"
    (tmp_path / SIDECAR).write_text(json.dumps(on_disk))
    before = tree_digest(tmp_path)
    with pytest.raises(LayoutError, match=r"orientation sources disagree: the shapes say .*moe_compat.json says"):
        load_adapter(_base(kind), str(tmp_path))
    assert tree_digest(tmp_path) == before


def _as_other_peft_version(src, dst):
    """Rewrite a saved adapter as the other orientation's PEFT would have saved it (0.18 <-> 0.19.1+: the same
    per-expert ΔW with the factors' roles exchanged, peft.md Addendum), sidecar included."""
    from safetensors.torch import load_file, save_file

    from reference.lora import convert_adapter

    info = json.loads((src / SIDECAR).read_text())
    sd = load_file(str(src / "adapter_model.safetensors"))
    for target, e in info["adapters"]["default"].items():
        path = target.rsplit(":", 1)[0]
        kA, kB = f"{path}.lora_A.weight", f"{path}.lora_B.weight"
        other = "swapped" if e["orientation"] == "standard" else "standard"
        sd[kA], sd[kB] = convert_adapter(
            sd[kA], sd[kB], e["num_experts"], src_orientation=e["orientation"], dst_orientation=other
        )
        e.update(orientation=other, lora_A_shape=list(sd[kA].shape), lora_B_shape=list(sd[kB].shape))
    # the version that saves that orientation (every target of the tiny model has the same is_transposed)
    (t,) = {e["is_transposed"] for e in info["adapters"]["default"].values()}
    (other,) = {e["orientation"] for e in info["adapters"]["default"].values()}
    # 0.19.0 included: GPT-OSS (is_transposed) swaps only under 0.19.0 (4.57, whose only fused family it is)
    info["peft_version"] = next(v for v in PEFT_RULES if peft_swaps(v, 3, t) == (other == "swapped"))
    dst.mkdir()
    save_file(sd, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, "peft_version": info["peft_version"]}))
    (dst / SIDECAR).write_text(json.dumps(info))


def test_reload_adapter_from_other_orientation_converts_exactly(tmp_path):
    """An adapter in the other PEFT orientation (non-square experts: PEFT alone raises a size mismatch) is converted
    exactly on load: same logits bit for bit; with convert=False it is refused."""
    pm = _peft("nf4")
    live = pm(IDS).logits
    save_adapter(pm, str(tmp_path / "a"))
    _as_other_peft_version(tmp_path / "a", tmp_path / "b")
    before = tree_digest(tmp_path / "b")
    with pytest.raises(LayoutError, match="another orientation"):
        load_adapter(_base("nf4"), str(tmp_path / "b"), convert=False)
    reloaded = load_adapter(_base("nf4"), str(tmp_path / "b"))
    assert torch.equal(reloaded(IDS).logits, live)
    assert tree_digest(tmp_path / "b") == before  # converted in a temporary copy


@pytest.mark.parametrize("kind", ["nf4", "fp8"])
def test_merge_is_real_and_unmerge_exact(kind):
    pm = _peft(kind)
    with pm.disable_adapter():
        base_logits = pm(IDS).logits
    live = pm(IDS).logits
    assert rel_err(live, base_logits) > 1e-2  # the adapter matters
    wrappers = quantized_wrappers(pm)
    before = {(p, w.parameter_name): w.get_base_layer().storage(w.parameter_name) for p, w in wrappers}
    deltas = {(p, w.parameter_name): w.get_delta_weight("default").float() for p, w in wrappers}
    pm.merge_adapter()
    merged = pm(IDS).logits
    for p, w in wrappers:
        q = w.get_base_layer()
        old, new = before[(p, w.parameter_name)], q.storage(w.parameter_name)
        delta = deltas[(p, w.parameter_name)]
        if kind == "nf4":
            packed, state = ref_nf4.quantize_nf4(old.dequantize(torch.float32), old.blocksize, False)
            rp, rs = ref_merge.merge_into_nf4(packed, state, delta)
            assert torch.equal(new.dequantize(torch.float32), ref_nf4.dequantize_nf4(rp, rs))
        else:
            rq, rs = ref_merge.merge_into_fp8(old.q, old.scale_inv, delta, old.block)
            assert torch.equal(new.q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(new.scale_inv, rs)
    # merging costs one requantization: bound it by twice the error of quantizing the base once (measured here)
    assert rel_err(merged, live) <= 2 * _quant_err(kind), "requantization error beyond one quantization step"
    pm.unmerge_adapter()
    assert torch.equal(pm(IDS).logits, live)
    for p, w in wrappers:
        assert w.get_base_layer().storage(w.parameter_name) is before[(p, w.parameter_name)]


def test_merge_and_unload_returns_quantized_base():
    pm = _peft("fp8")
    pm.eval()
    with torch.no_grad():
        live = pm(IDS).logits
    merged = pm.merge_and_unload()
    qs = [m for m in merged.modules() if isinstance(m, QuantizedExperts)]
    assert qs and not any(hasattr(m, "lora_A") for m in merged.modules())
    assert rel_err(merged(IDS).logits, live) <= 2 * _quant_err("fp8")


def test_plain_peft_adapter_loads_and_can_write_its_sidecar(tmp_path):
    """A plain ``save_pretrained`` (no moe_compat.json) is decided as the merge decides it (shapes, the sibling,
    peft_version) and reloads bit for bit; ``write_sidecar_if_missing`` writes that decision, after which the
    directory reloads the same. A wrong peft_version (its rule contradicting the shapes) is refused."""
    pm = _peft("nf4")
    live = pm(IDS).logits
    pm.save_pretrained(str(tmp_path / "a"))
    assert not os.path.exists(tmp_path / "a" / SIDECAR)
    before = tree_digest(tmp_path / "a")
    assert torch.equal(load_adapter(_base("nf4"), str(tmp_path / "a"))(IDS).logits, live)
    assert tree_digest(tmp_path / "a") == before  # nothing written unless asked
    load_adapter(_base("nf4"), str(tmp_path / "a"), write_sidecar_if_missing=True)
    side = json.loads((tmp_path / "a" / SIDECAR).read_text())
    targets = side["adapters"]["default"]
    assert len(targets) == len(quantized_wrappers(pm))  # one per ParamWrapper (gate_up and down per layer)
    assert all("shapes" in t["decided_by"] for t in targets.values())  # tiny 2i_ne_h experts: non-square
    assert torch.equal(load_adapter(_base("nf4"), str(tmp_path / "a"))(IDS).logits, live)
    # a peft_version whose rule names the other orientation contradicts the (non-square) shapes; a plain save does
    # not record is_transposed, so for (E, in, out) experts the rule must name it for both values (none does where
    # the live PEFT does not swap: 4.57's GPT-OSS under 0.18 / 0.19.1+, checked by the assert)
    os.remove(tmp_path / "a" / SIDECAR)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    q = quantized_wrappers(pm)[0][1].get_base_layer()
    unknown = (True, False) if q.is_transposed else (False,)
    liars = contradicting_peft_versions(peft_swaps(peft.__version__, 3, q.is_transposed), unknown)
    assert liars or q.is_transposed
    for liar in liars:
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_version": liar}))
        before = tree_digest(tmp_path / "a")
        with pytest.raises(LayoutError, match=rf"orientation sources disagree: the shapes say .*peft_version {liar}"):
            load_adapter(_base("nf4"), str(tmp_path / "a"))
        assert tree_digest(tmp_path / "a") == before


def test_repeated_forward_is_stable_and_leaves_no_parametrization():
    """PEFT 0.21's parametrization leak (outputs drift on every call when the 3-D param is already parametrized,
    peft.md §1.4) cannot happen: impl never registers a parametrization on the experts."""
    pm = _peft("nf4")
    first = pm(IDS).logits
    for _ in range(2):
        assert torch.equal(pm(IDS).logits, first)
    for m in pm.modules():
        if isinstance(m, QuantizedExperts):
            assert not torch.nn.utils.parametrize.is_parametrized(m)


def test_gradient_checkpointing_gives_the_same_lora_grads():
    """transformers' gradient checkpointing re-runs the wrapped experts in backward: LoRA is attached again there, and
    the dequantized weights are rebuilt; the LoRA grads equal those without checkpointing (bit for bit)."""
    grads, calls = [], []
    for gc in (False, True):
        pm = _peft("fp8", torch.bfloat16)
        pm.train()
        if gc:
            pm.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        n_calls = [0]
        for m in pm.modules():
            if isinstance(m, QuantizedExperts):
                m.register_forward_pre_hook(lambda *a, c=n_calls: c.__setitem__(0, c[0] + 1))
        (pm(IDS).logits.float() * PROJ).sum().backward()
        grads.append({n: p.grad for n, p in pm.named_parameters() if "lora_" in n})
        calls.append(n_calls[0])
    assert calls[1] == 2 * calls[0], f"checkpointing did not recompute the experts: {calls}"
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n, g in grads[0].items():
        assert torch.equal(g, grads[1][n]), n
