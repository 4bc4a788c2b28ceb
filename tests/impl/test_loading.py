"""Loading MoE models with quantized experts (impl/loading.py) in this environment's transformers.

- 5.x (fused experts): from a checkpoint directory, the loaded NF4 / FP8 storage is exactly the quantization of the
  checkpoint's expert weights (same packed bytes / codes and scales as quantizing the in-memory model), expert bytes
  drop >= 3.5x under NF4 (recorded), routers and everything else are untouched.
- 5.x, pre-quantized FP8 checkpoint: `attach_fp8_experts` uses the checkpoint's e4m3 codes and scales bit for bit.
- 4.57 (ModuleList experts): NF4 through transformers' BitsAndBytesConfig: every expert Linear is Linear4bit, the
  router gate / lm_head stay nn.Linear; the MoE block equals the float64 reference on the reference-dequantized
  weights (bf16 bound 2e-2, moe_helpers.REL_TOL); LoRA on the per-expert Linear4bit gets gradients exactly for routed
  experts; an in-memory ModuleList model is refused for NF4 (bitsandbytes quantizes at load: save it first).
- 4.57 (ModuleList experts), FP8: every routed expert Linear becomes an `impl.fp8_linear.FP8Linear` whose codes and
  scales are exactly ``reference.fp8.quantize_fp8_block`` of the checkpoint weight (128x128 blocks; 16x16 on the
  2I != H dims for partial ceil-grid edge blocks), routers / lm_head stay bf16 ``nn.Linear``; expert bytes are
  e4m3 + fp32 scales (bf16 / FP8 >= 1.99 at 128x128: 2 / (1 + 4/16384)), `storage_bytes` counts them and not the
  carrier's logical size; the MoE block equals the float64 reference on the dequantized weights (bf16 bound 2e-2,
  moe_helpers.REL_TOL: FP8 changes only the weights, which the reference shares); LoRA gets gradients exactly for
  routed experts; an in-memory ``merge_and_unload`` raises instead of writing into the carrier.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

from impl.loading import load_model, quantize_experts  # noqa: E402
from impl.quant_experts import QuantizedExperts  # noqa: E402
from impl.storage import FP8Config, NF4Config, QuantizedExpertsError  # noqa: E402
from reference import experts as ref_experts  # noqa: E402
from reference import nf4 as ref_nf4  # noqa: E402
from reference import routing as ref_routing  # noqa: E402
from tests.impl.moe_helpers import REL_TOL, rel_err, tiny  # noqa: E402
from tests.support import zoo  # noqa: E402

pytestmark = pytest.mark.upstream
V = zoo.installed_version()
MODULE_LIST = zoo.compat.expert_layout("qwen3_moe", V) == "module_list"
IDS = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
BF16 = torch.bfloat16


def _saved(tmp_path, family="qwen3_moe", variant="2i_ne_h"):
    m = tiny(family, variant, dtype=BF16)
    m.save_pretrained(str(tmp_path))
    return m


@pytest.mark.skipif(MODULE_LIST, reason=f"transformers {V} has ModuleList experts (see the 4.57 tests below)")
@pytest.mark.parametrize(
    "cfg", [NF4Config(double_quant=False), NF4Config(double_quant=True), FP8Config(block=(16, 16))]
)
def test_load_checkpoint_quantizes_checkpoint_weights(tmp_path, cfg, record_property):
    src = _saved(tmp_path)
    loaded, rep = load_model(str(tmp_path), cfg)
    ref = tiny("qwen3_moe", dtype=BF16)
    ref_rep = quantize_experts(ref, cfg)
    assert rep.modules == ref_rep.modules and len(rep.modules) == len(zoo.describe(src)["experts"])
    for a, b in zip(zoo.describe(loaded)["experts"], zoo.describe(ref)["experts"]):
        assert isinstance(a, QuantizedExperts)
        for n in ("gate_up_proj", "down_proj"):
            sa, sb = a.storage(n), b.storage(n)
            for (ka, ta), (kb, tb) in zip(sa.named_buffers(), sb.named_buffers()):
                assert ka == kb and torch.equal(ta.reshape(-1).view(torch.uint8), tb.reshape(-1).view(torch.uint8)), (
                    n,
                    ka,
                )
    assert torch.equal(loaded(IDS).logits, ref(IDS).logits)
    record_property(f"expert_bytes_bf16_{cfg.kind}", rep.bytes_before)
    record_property(f"expert_bytes_{cfg.kind}", rep.bytes_after)
    if cfg.kind == "nf4":
        assert rep.ratio >= 3.5, rep
    # routers untouched: same dtype and values as the checkpoint
    for r_src, r_new in zip(zoo.describe(src)["routers"], zoo.describe(loaded)["routers"]):
        for (n, p), (_, q) in zip(r_src.named_parameters(), r_new.named_parameters()):
            assert p.dtype == q.dtype and torch.equal(p, q), n


@pytest.mark.skipif(MODULE_LIST, reason=f"transformers {V} has ModuleList experts")
def test_in_memory_model_fp8():
    m = tiny("qwen3_moe", dtype=BF16)
    _, rep = load_model(m, FP8Config(block=(16, 16)))
    assert all(isinstance(e, QuantizedExperts) and e.kind == "fp8" for e in zoo.describe(m)["experts"])
    assert rep.bytes_after < rep.bytes_before / 1.5


def _fp8_checkpoint(tmp_path, block=(8, 8)):
    """The tiny model saved by transformers (per-expert keys), expert weights rewritten as e4m3 + weight_scale_inv."""
    import json

    from safetensors.torch import load_file, save_file

    from reference import fp8 as ref_fp8

    _saved(tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(str(f))
    for k in [k for k in sd if ".experts." in k and k.endswith("_proj.weight")]:
        sd[k], sd[k + "_scale_inv"] = ref_fp8.quantize_fp8_block(sd[k], block)
    save_file(sd, str(f), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(block)}
    (tmp_path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.skipif(MODULE_LIST, reason=f"transformers {V} has ModuleList experts")
def test_attach_fp8_experts_from_prequantized_checkpoint(tmp_path):
    """Per-expert e4m3 + weight_scale_inv keys (validated and fused by impl.checkpoint) become the storage bit for
    bit: identical to quantizing the fused bf16 weights with the same block (I % bm == 0, so blocks never straddle
    gate and up)."""
    from impl.loading import attach_fp8_experts

    _fp8_checkpoint(tmp_path)
    model = tiny("qwen3_moe", dtype=BF16)
    rep = attach_fp8_experts(model, str(tmp_path))
    twin = tiny("qwen3_moe", dtype=BF16)
    quantize_experts(twin, FP8Config(block=(8, 8)))
    assert rep.modules and rep.ratio > 1.5
    for a, b in zip(zoo.describe(model)["experts"], zoo.describe(twin)["experts"]):
        for n in ("gate_up_proj", "down_proj"):
            sa, sb = a.storage(n), b.storage(n)
            assert sa.block == (8, 8)
            assert torch.equal(sa.q.view(torch.uint8), sb.q.view(torch.uint8)) and torch.equal(
                sa.scale_inv, sb.scale_inv
            )
    assert torch.equal(model(IDS).logits, twin(IDS).logits)


# --- transformers 4.57: ModuleList experts ----------------------------------------------------------------------


def _module_list_nf4(tmp_path):
    src = _saved(tmp_path, variant="fp8")  # dims multiple of 64 (bnb CPU dequant needs it, see test_quant_experts)
    model, _ = load_model(str(tmp_path), NF4Config())
    return src, model


def _dequant(lin) -> torch.Tensor:
    """Reference dequantization (reference.nf4) of a bnb Linear4bit weight, fp32 [out, in]."""
    qs = lin.weight.quant_state
    assert not qs.nested and not getattr(qs, "packing_format_for_cpu", False), "repacked for the CPU kernel"
    state = ref_nf4.NF4State(absmax=qs.absmax.float(), blocksize=qs.blocksize, shape=qs.shape, dtype=qs.dtype)
    return ref_nf4.dequantize_nf4(lin.weight.data.reshape(-1), state, torch.float32)


@pytest.mark.skipif(not MODULE_LIST, reason=f"transformers {V} has fused experts")
def test_module_list_nf4_keeps_routers_and_quantizes_experts(tmp_path, record_property):
    import bitsandbytes as bnb

    _, model = _module_list_nf4(tmp_path)
    d = zoo.describe(model)
    assert type(model.lm_head) is torch.nn.Linear
    bf16_bytes = nf4_bytes = 0
    for layer in d["layers"]:
        assert type(layer.router) is torch.nn.Linear and layer.router.weight.dtype == BF16
        for expert in layer.experts:
            for lin in (expert.gate_proj, expert.up_proj, expert.down_proj):
                assert isinstance(lin, bnb.nn.Linear4bit), type(lin)
                qs = lin.weight.quant_state
                bf16_bytes += qs.shape.numel() * 2
                nf4_bytes += lin.weight.data.numel() + qs.absmax.numel() * qs.absmax.element_size()
    record_property("expert_bytes_bf16", bf16_bytes)
    record_property("expert_bytes_nf4", nf4_bytes)
    assert bf16_bytes / nf4_bytes >= 3.5


@pytest.mark.skipif(not MODULE_LIST, reason=f"transformers {V} has fused experts")
def test_module_list_nf4_block_matches_reference(tmp_path):
    _, model = _module_list_nf4(tmp_path)
    d = zoo.describe(model)
    layer = d["layers"][0]
    # dequantize BEFORE any forward: bitsandbytes >= 0.49 repacks Linear4bit data in place for its CPU kernel on the
    # first CPU forward (quant_state.packing_format_for_cpu), after which the packed bytes are no longer the nf4 format.
    gate = [_dequant(e.gate_proj) for e in layer.experts]
    up = [_dequant(e.up_proj) for e in layer.experts]
    down = [_dequant(e.down_proj) for e in layer.experts]
    x = torch.randn(1, 12, d["H"], generator=torch.Generator().manual_seed(4)).to(BF16)
    out, logits = layer.block(x)
    w, idx = ref_routing.softmax_topk(logits.to(torch.float64), d["k"], renormalize=d["router"]["renormalize"])
    ref = ref_experts.module_list_experts(
        x.reshape(-1, d["H"]).to(torch.float64), idx, w, gate, up, down, act=d["act"], compute_dtype=torch.float64
    )
    assert rel_err(out.reshape(-1, d["H"]), ref) <= REL_TOL[BF16]


def _routed_experts_after_backward(pm, layer) -> set[int]:
    """Run forward + backward of a random projection of the logits; return the experts layer 0's router picked (top-2)."""
    hits: set[int] = set()
    handle = layer.block.gate.register_forward_hook(
        lambda mod, args, out: hits.update(torch.topk(out.float().softmax(-1), 2, -1).indices.reshape(-1).tolist())
    )
    logits = pm(IDS).logits  # a random projection of all logits: every routed token influences the loss
    (logits.float() * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    handle.remove()
    return hits


@pytest.mark.skipif(not MODULE_LIST, reason=f"transformers {V} has fused experts")
def test_module_list_nf4_lora_grads_per_routed_expert(tmp_path):
    peft = pytest.importorskip("peft")
    _, model = _module_list_nf4(tmp_path)
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"])
    )
    layer = zoo.describe(pm.base_model.model)["layers"][0]
    hits = _routed_experts_after_backward(pm, layer)
    for e, expert in enumerate(layer.experts):
        g = expert.down_proj.lora_B["default"].weight.grad
        got = g is not None and bool(g.abs().sum() > 0)
        assert got == (e in hits), (e, sorted(hits))


@pytest.mark.skipif(not MODULE_LIST, reason=f"transformers {V} has fused experts")
def test_module_list_nf4_in_memory_refused():
    with pytest.raises(QuantizedExpertsError, match="save it and pass the directory"):
        load_model(tiny("qwen3_moe", dtype=BF16), NF4Config())


# --- transformers 4.57: ModuleList experts, FP8 (impl.fp8_linear.FP8Linear) --------------------------------------

# (family, zoo variant, block): 128x128 on dims that are multiples of 128; 16x16 on H=32, I=24 (partial edge blocks)
FP8_CASES = [("qwen3_moe", "fp8", (128, 128)), ("mixtral", "2i_ne_h", (16, 16))]


def _module_list_fp8(tmp_path, family="qwen3_moe", variant="fp8", block=(128, 128)):
    src = _saved(tmp_path, family, variant)
    model, rep = load_model(str(tmp_path), FP8Config(block=block, compute_dtype=BF16))
    return src, model, rep


def _projs(expert) -> tuple:
    """(gate, up, down) of one ModuleList expert (Mixtral: w1, w3, w2)."""
    if hasattr(expert, "w1"):
        return expert.w1, expert.w3, expert.w2
    return expert.gate_proj, expert.up_proj, expert.down_proj


@pytest.mark.skipif(not MODULE_LIST, reason=f"transformers {V} has fused experts")
def test_module_list_fp8_codes_routers_and_bytes(tmp_path, record_property):
    from impl.fp8_linear import FP8Linear
    from impl.storage import storage_bytes
    from reference import fp8 as ref_fp8

    src, model, rep = _module_list_fp8(tmp_path)
    d_src, d = zoo.describe(src), zoo.describe(model)
    assert type(model.lm_head) is torch.nn.Linear
    bf16_bytes = fp8_bytes = 0
    for layer_src, layer in zip(d_src["layers"], d["layers"]):
        assert type(layer.router) is torch.nn.Linear and layer.router.weight.dtype == BF16
        for ex_src, ex in zip(layer_src.experts, layer.experts):
            for lin_src, lin in zip(_projs(ex_src), _projs(ex)):
                assert isinstance(lin, FP8Linear), type(lin)
                q, s = ref_fp8.quantize_fp8_block(lin_src.weight.detach(), (128, 128))
                assert torch.equal(lin.q.view(torch.uint8), q.view(torch.uint8))
                assert torch.equal(lin.weight_scale_inv, s)
                assert lin.weight.shape == lin_src.weight.shape and lin.weight.untyped_storage().nbytes() == 2
                assert storage_bytes(lin) == lin.q.nbytes + lin.weight_scale_inv.nbytes + 2  # + the carrier's element
                assert "weight" not in lin.state_dict()
                bf16_bytes += lin_src.weight.nbytes
                fp8_bytes += lin.q.nbytes + lin.weight_scale_inv.nbytes
    assert (rep.weight_bytes_before, rep.weight_bytes_after) == (bf16_bytes, fp8_bytes)
    record_property("expert_bytes_bf16", bf16_bytes)
    record_property("expert_bytes_fp8", fp8_bytes)
    assert bf16_bytes / fp8_bytes >= 1.99


@pytest.mark.skipif(not MODULE_LIST, reason=f"transformers {V} has fused experts")
@pytest.mark.parametrize("family,variant,block", FP8_CASES)
def test_module_list_fp8_block_matches_reference(tmp_path, record_property, family, variant, block):
    _, model, _ = _module_list_fp8(tmp_path, family, variant, block)
    d = zoo.describe(model)
    layer = d["layers"][0]
    weights = [[lin.dequantize(torch.float32) for lin in _projs(e)] for e in layer.experts]
    gate, up, down = (list(w) for w in zip(*weights))
    x = torch.randn(1, 12, d["H"], generator=torch.Generator().manual_seed(4)).to(BF16)
    with torch.no_grad():
        out, logits = layer.block(x)
    w, idx = ref_routing.softmax_topk(logits.to(torch.float64), d["k"], renormalize=d["router"]["renormalize"])
    ref = ref_experts.module_list_experts(
        x.reshape(-1, d["H"]).to(torch.float64), idx, w, gate, up, down, act=d["act"], compute_dtype=torch.float64
    )
    err = rel_err(out.reshape(-1, d["H"]), ref)
    record_property("fp8_vs_reference_rel_err", err)
    assert err <= REL_TOL[BF16]


@pytest.mark.skipif(not MODULE_LIST, reason=f"transformers {V} has fused experts")
def test_module_list_fp8_lora_grads_per_routed_expert_and_merge_refused(tmp_path):
    peft = pytest.importorskip("peft")
    from impl.fp8_linear import FP8Linear

    _, model, _ = _module_list_fp8(tmp_path)
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=r".*\.experts\.\d+\.(gate_proj|up_proj|down_proj)")
    )
    layer = zoo.describe(pm.base_model.model)["layers"][0]
    assert all(isinstance(lin.base_layer, FP8Linear) for e in layer.experts for lin in _projs(e))
    hits = _routed_experts_after_backward(pm, layer)
    assert hits, "no expert was routed"
    for e, expert in enumerate(layer.experts):
        for lin in _projs(expert):
            g = lin.lora_B["default"].weight.grad
            got = g is not None and bool(g.abs().sum() > 0)
            assert got == (e in hits), (e, sorted(hits))
            assert lin.base_layer.q.grad is None and not lin.base_layer.weight.requires_grad
    with pytest.raises(QuantizedExpertsError, match="cannot merge LoRA into an FP8Linear base"):
        pm.merge_and_unload()


@pytest.mark.skipif(MODULE_LIST, reason=f"transformers {V} has ModuleList experts")
def test_base_save_pretrained_refused(tmp_path):
    """transformers would save the storage under unknown keys and re-initialise the experts on reload: refuse."""
    m = tiny("qwen3_moe", dtype=BF16)
    quantize_experts(m, NF4Config())
    with pytest.raises(QuantizedExpertsError, match="save the LoRA adapter|Save the LoRA adapter"):
        m.save_pretrained(str(tmp_path))
