"""layout: LoRA on 3-D experts with the cell's real PEFT for 2I == H, I == H, 2I < H and 2I > H.

Per case and fused family (`layout_families`: qwen3_moe, plus GPT-OSS in full mode; GPT-OSS alone on 4.57), in fp32 so
that equalities are tight:

1. ``layout_roundtrip_from_pretrained``: an adapter trained in the cell (a few steps, so lora_B != 0) is saved with
   PEFT and reloaded with ``PeftModel.from_pretrained`` onto a fresh base of the same seed: the logits must match the
   live model (max |Δ| <= 1e-5: identical weights, same code path; only the summation order may differ).
2. ``layout_foreign``: the same adapter re-expressed with `reference.lora.convert_adapter` in the *other* orientation,
   in the ``contiguous_r`` lora_B convention, and in the other orientation with no provenance at all (sidecar absent,
   ``peft_version`` removed), merged with `impl.merge.merge_adapter` (merged_16bit) and reloaded. Each outcome must be
   either *converted* (logits equal the merge of the original adapter, max |Δ| <= 1e-5) or *refused* with an error
   that names the cause; a merge that succeeds with other logits is the failure this check exists for (an adapter
   applied transposed). Expected: declared fixtures are converted; the undeclared other-orientation fixture is
   converted by its shapes, and a square parameter by its non-square sibling (PEFT orients both parameters of a module
   alike); a declared orientation next to a stale ``peft_version`` that contradicts it is refused.
   The merge of the cell's adapter (orientation declared in the sidecar, as impl's save writes it) is itself checked
   against the live model (rel. Frobenius <= 1e-5, fp32). The plain PEFT save (no sidecar) is merged too: impl.merge
   decides by its shapes, the sibling and ``peft_version`` (`reference.layout.decide_orientation`); recorded as
   ``plain_peft_adapter_*``.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from impl import compat, zoo  # noqa: E402
from impl import train as tr  # noqa: E402
from impl.merge import MERGED_16BIT, MergeError, merge_adapter  # noqa: E402
from reference.layout import LayoutError, Orientation, peft_swaps  # noqa: E402
from reference.lora import CONTIGUOUS_R, STRIDE_E, convert_adapter  # noqa: E402
from tests.checks import helpers  # noqa: E402

pytestmark = [pytest.mark.check, pytest.mark.upstream]

SMALL_I = 8  # 2I = 16 < H = 32
CASES = {  # case -> (zoo variant, config overrides)
    "2i_eq_h": ("2i_eq_h", {}),
    "i_eq_h": ("i_eq_h", {}),
    "2i_gt_h": ("2i_ne_h", {}),
    "2i_lt_h": ("2i_ne_h", {"small_i": SMALL_I}),
}
ATOL = 1e-5
TOKENS = torch.arange(3, 3 + 2 * 9).reshape(2, 9) % zoo.VOCAB


def layout_families(quick: bool) -> list[str]:
    """Fused families to check: qwen3_moe ((E, out, in), is_transposed=False) and, in full mode, GPT-OSS ((E, in, out),
    is_transposed=True on 5.x, attribute absent on 4.57: the case PEFT 0.19.0 and 0.19.1+ treat oppositely).
    transformers 4.57 has only GPT-OSS fused."""
    if not compat.fused_experts(zoo.installed_version()):
        return [compat.GPT_OSS]
    return [compat.QWEN3_MOE] if quick else [compat.QWEN3_MOE, compat.GPT_OSS]


def pytest_generate_tests(metafunc):
    if "layout_family" in metafunc.fixturenames:
        metafunc.parametrize("layout_family", layout_families(bool(metafunc.config.getoption("quick", default=False))))


def _build(family: str, case: str):
    variant, extra = CASES[case]
    overrides = {}
    if "small_i" in extra:
        overrides[compat.intermediate_attr(family)] = extra["small_i"]
    return zoo.build_model(family, variant, seed=helpers.SEED, dtype=torch.float32, initializer_range=0.3, **overrides)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits.to(torch.float64)


def _trained_adapter(family: str, case: str, root):
    """Base saved to root/base; a LoRA trained 5 steps (lr 5e-2) saved to root/adapter; returns (peft model, dims)."""
    base = _build(family, case)
    base.save_pretrained(root / "base")
    pm = helpers.add_lora(base, family, r=2, alpha=4)
    tr.train_lora(pm, helpers.make_task(), steps=5, lr=5e-2, seed=helpers.SEED)
    pm.save_pretrained(root / "adapter")
    return pm


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One trained adapter per case (shared by the round-trip and the foreign-adapter checks)."""
    cache = {}

    def get(family: str, case: str):
        if (family, case) not in cache:
            root = tmp_path_factory.mktemp(f"layout-{family}-{case}")
            with helpers.single_thread():
                pm = _trained_adapter(family, case, root)
                cache[family, case] = (root, pm, _logits(pm))
        return cache[family, case]

    return get


def _dims(family: str, case: str) -> dict:
    d = zoo.describe(_build(family, case))
    return {"E": d["E"], "H": d["H"], "I": d["I"]}


@pytest.mark.parametrize("case", list(CASES))
def test_layout_roundtrip_from_pretrained(moe_check, layout_family, case, trained):
    family = layout_family
    moe_check.set(name="layout", family=family, variant=f"{case}:roundtrip")
    root, pm, live = trained(family, case)
    for k, v in _dims(family, case).items():
        moe_check.metric(k, v)
    with helpers.single_thread():
        fresh = _build(family, case)
        reloaded = peft.PeftModel.from_pretrained(fresh, str(root / "adapter"))
        got = _logits(reloaded)
        with pm.disable_adapter():
            base = _logits(pm)
    # the adapter must matter, else the round trip proves nothing (trained 5 steps: |Δlogit| ~0.1–1)
    moe_check.require("lora_effect_max_abs_dlogit", (live - base).abs().max(), 1e-3, op=">=")
    moe_check.require("reload_max_abs_dlogit", (got - live).abs().max(), ATOL)


# --- foreign adapters -------------------------------------------------------------------------------------------


def _is_transposed(family: str) -> bool | None:
    return True if family == compat.GPT_OSS and compat.fused_experts(zoo.installed_version()) else None


def _pairs(tensors: dict) -> list[tuple[str, str]]:
    return sorted((k, k.replace("lora_A", "lora_B")) for k in tensors if k.endswith("lora_A.weight"))


def _foreign(root, name: str, *, orientation: Orientation | None, convention: str, declare: bool, E: int, src,
             keep_version: bool = False):  # fmt: skip
    """Write root/name: the trained adapter re-expressed (orientation / convention), with or without provenance.
    A re-expressed orientation is no longer what the cell's PEFT saved, so its peft_version is dropped unless
    ``keep_version`` (a stale version that contradicts the file)."""
    tensors = load_file(str(root / "adapter" / "adapter_model.safetensors"))
    out = dict(tensors)
    dst_o = orientation or src
    for ka, kb in _pairs(tensors):
        out[ka], out[kb] = convert_adapter(
            tensors[ka], tensors[kb], E, src_orientation=src, dst_orientation=dst_o,
            src_convention=STRIDE_E, dst_convention=convention,
        )  # fmt: skip
    d = root / name
    d.mkdir()
    save_file({k: v.contiguous() for k, v in out.items()}, str(d / "adapter_model.safetensors"))
    cfg = json.loads((root / "adapter" / "adapter_config.json").read_text())
    if declare:
        sidecar = {"orientation": dst_o.value, "lora_B_convention": convention}
        (d / "moe_compat.json").write_text(json.dumps(sidecar))
    if not declare or (dst_o is not src and not keep_version):
        cfg.pop("peft_version", None)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


def _merge_logits(root, adapter_dir, name: str):
    out = root / f"merged-{name}"
    merge_adapter(root / "base", adapter_dir, out, method=MERGED_16BIT, dtype=torch.float32)
    return _logits(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval())


def _outcome(moe_check, root, adapter_dir, name: str, ref) -> str:
    """'converted' (logits == ref), 'refused' (a merge/layout error naming the cause); raises if applied wrongly."""
    try:
        got = _merge_logits(root, adapter_dir, name)
    except (MergeError, LayoutError) as exc:
        moe_check.note(f"{name}: refused: {exc}")
        return "refused"
    diff = float((got - ref).abs().max())
    moe_check.metric(f"{name}_max_abs_dlogit", diff, threshold=ATOL)
    if diff > ATOL:
        raise AssertionError(f"{name}: merged without error but logits differ by {diff:.3g} (adapter misapplied)")
    return "converted"


@pytest.mark.parametrize("case", list(CASES))
def test_layout_foreign(moe_check, layout_family, case, trained):
    family = layout_family
    moe_check.set(name="layout", family=family, variant=f"{case}:foreign")
    root, pm, live = trained(family, case)
    dims = _dims(family, case)
    E = dims["E"]
    cell = Orientation.SWAPPED if peft_swaps(peft.__version__, 3, _is_transposed(family)) else Orientation.STANDARD
    other = Orientation.STANDARD if cell is Orientation.SWAPPED else Orientation.SWAPPED
    with helpers.single_thread():
        # the cell's adapter with its orientation declared (what impl.peft_integration.save_adapter writes)
        declared = _foreign(root, "cell_declared", orientation=None, convention=STRIDE_E, declare=True, E=E, src=cell)
        ref = _merge_logits(root, declared, "cell_declared")
        rel = float((ref - live).norm() / live.norm())
        moe_check.require("merge_vs_live_rel_err", rel, ATOL)
        # the plain PEFT save (no sidecar): merged by its peft_version, or refused where that does not decide
        plain = _outcome(moe_check, root, root / "adapter", "plain_peft_adapter", ref)
        moe_check.metric("plain_peft_adapter_converted", float(plain == "converted"))
        fixtures = {
            "other_orientation_declared": dict(orientation=other, convention=STRIDE_E, declare=True),
            "contiguous_r_declared": dict(orientation=None, convention=CONTIGUOUS_R, declare=True),
            "other_orientation_undeclared": dict(orientation=other, convention=STRIDE_E, declare=False),
            "other_orientation_declared_stale_version": dict(
                orientation=other, convention=STRIDE_E, declare=True, keep_version=True
            ),
        }
        outcomes = {}
        for name, spec in fixtures.items():
            d = _foreign(root, name, E=E, src=cell, **spec)
            outcomes[name] = _outcome(moe_check, root, d, name, ref)
    for name, o in outcomes.items():
        moe_check.metric(f"{name}_converted", float(o == "converted"))
    square = dims["H"] in (2 * dims["I"], dims["I"])
    moe_check.metric("square_expert_matrix", float(square))
    assert outcomes["other_orientation_declared"] == "converted", outcomes
    assert outcomes["contiguous_r_declared"] == "converted", outcomes
    # undeclared: the shapes decide a non-square parameter, and the non-square sibling (both are targeted; 2I == H
    # and I == H never hold together) decides a square one
    assert outcomes["other_orientation_undeclared"] == "converted", outcomes
    # a sidecar that contradicts the adapter's own peft_version is refused, never followed; the version speaks unless
    # its rule depends on is_transposed, which a checkpoint of (E, in, out) experts does not record (GPT-OSS, PEFT
    # >= 0.19): then the declared orientation and the shapes decide (correctly: "converted")
    candidates = (True, False) if family == compat.GPT_OSS else (False,)
    version_speaks = len({peft_swaps(peft.__version__, 3, t) for t in candidates}) == 1
    want_stale = "refused" if version_speaks else "converted"
    assert outcomes["other_orientation_declared_stale_version"] == want_stale, (outcomes, want_stale)


# --- the live path: NF4 experts, impl.peft_integration.save_adapter / load_adapter ---------------------------------


def _nf4_model(family: str, case: str):
    from impl import loading

    model = _build(family, case).to(helpers.DTYPE)
    loading.quantize_experts(model, helpers.quant_config("nf4"))
    return model


def _write_other_orientation(src_dir, dst_dir, E: int, src: Orientation, other: Orientation) -> None:
    """The saved adapter with every expert pair converted to ``other`` and the sidecar saying so (honest label)."""
    import shutil

    shutil.copytree(src_dir, dst_dir)
    tensors = load_file(str(src_dir / "adapter_model.safetensors"))
    for ka, kb in _pairs(tensors):
        tensors[ka], tensors[kb] = convert_adapter(tensors[ka], tensors[kb], E, src_orientation=src,
                                                   dst_orientation=other)  # fmt: skip
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst_dir / "adapter_model.safetensors"))
    side = json.loads((src_dir / "moe_compat.json").read_text())
    for targets in side["adapters"].values():
        for t in targets.values():
            t["orientation"] = other.value
            t["lora_A_shape"], t["lora_B_shape"] = t["lora_B_shape"][::-1], t["lora_A_shape"][::-1]
    (dst_dir / "moe_compat.json").write_text(json.dumps(side))


@pytest.mark.parametrize("case", list(CASES))
def test_layout_live_foreign_roundtrip_from_pretrained(moe_check, layout_family, case, tmp_path):
    """NF4 experts: the cell's adapter round-trips through impl save/load; the same adapter re-expressed in the other
    orientation (sidecar declaring it) is converted on load (same logits) or refused with an error, never misapplied.
    Also recorded: what plain ``PeftModel.from_pretrained`` does with it (size mismatch, or silently wrong logits for
    square experts)."""
    from impl import peft_integration as pi

    family = layout_family
    moe_check.set(name="layout", family=family, variant=f"{case}:live_nf4")
    with helpers.single_thread():
        pm = helpers.add_lora(_nf4_model(family, case), family, r=2, alpha=4)
        tr.train_lora(pm, helpers.make_task(), steps=5, lr=5e-2, seed=helpers.SEED)
        live = _logits(pm)
        pi.save_adapter(pm, str(tmp_path / "adapter"))
        back = _logits(pi.load_adapter(_nf4_model(family, case), str(tmp_path / "adapter")))
        moe_check.require("impl_reload_max_abs_dlogit", (back - live).abs().max(), ATOL)
        E = _dims(family, case)["E"]
        cell = Orientation.SWAPPED if peft_swaps(peft.__version__, 3, _is_transposed(family)) else Orientation.STANDARD
        other = Orientation.STANDARD if cell is Orientation.SWAPPED else Orientation.SWAPPED
        _write_other_orientation(tmp_path / "adapter", tmp_path / "other", E, cell, other)
        outcome = _live_load_outcome(moe_check, family, case, tmp_path / "other", live)
        raw = _raw_peft_load(family, case, tmp_path / "other")
    moe_check.metric("raw_peft_size_mismatch", float(raw is None))
    if raw is not None:  # PEFT alone loaded it (every target square): how wrong would it have been?
        moe_check.metric("raw_peft_silent_max_abs_dlogit", (raw - live).abs().max())
    moe_check.metric("other_orientation_converted", float(outcome == "converted"))


def _live_load_outcome(moe_check, family: str, case: str, adapter_dir, live) -> str:
    """impl's load of an adapter in the other (declared) orientation: 'converted' (same logits) or 'refused'."""
    from impl import peft_integration as pi

    try:
        loaded = pi.load_adapter(_nf4_model(family, case), str(adapter_dir))
    except LayoutError as exc:
        moe_check.note(f"other orientation refused by impl: {exc}")
        return "refused"
    except RuntimeError as exc:  # PEFT's own size-mismatch error on non-square experts
        if "size mismatch" not in str(exc):
            raise
        moe_check.note(f"other orientation refused by PEFT (size mismatch): {str(exc)[:300]}")
        return "refused"
    diff = (_logits(loaded) - live).abs().max()
    moe_check.require(
        "other_orientation_max_abs_dlogit", diff, ATOL, msg="loaded in the other orientation and misapplied"
    )
    return "converted"


def _raw_peft_load(family: str, case: str, adapter_dir):
    """Plain ``PeftModel.from_pretrained`` (no sidecar check); logits, or None when PEFT refuses (size mismatch)."""
    try:
        model = peft.PeftModel.from_pretrained(_nf4_model(family, case), str(adapter_dir))
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        return None
    return _logits(model)
