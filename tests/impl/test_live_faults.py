"""Fault cases of the live loaders (docs/FAULTS.md): `impl.peft_integration.load_adapter` and
`impl.loading.attach_fp8_experts`. Each test forces the situation and asserts the named error (or the correct
result), and that the adapter / checkpoint directory is byte-identical afterwards (sha256 of every file).

The model is the tiny fused-experts family of this transformers (`moe_helpers.FUSED_FAMILY`) with NF4 experts, fp32
compute; "correct" means the reloaded logits equal the live model's bit for bit (same storage, same factors).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from impl.checkpoint import FP8CheckpointError  # noqa: E402
from impl.errors import AdapterError, OrientationError  # noqa: E402
from impl.loading import attach_fp8_experts, quantize_experts  # noqa: E402
from impl.peft_integration import SIDECAR, describe_adapter_dir, load_adapter, save_adapter  # noqa: E402
from impl.storage import QuantizedExpertsError  # noqa: E402
from reference.layout import peft_swaps, transformers_may_force_swap  # noqa: E402
from tests.impl.moe_helpers import FUSED_FAMILY, quant_config, tiny  # noqa: E402
from tests.impl.test_loading import MODULE_LIST, _fp8_checkpoint  # noqa: E402
from tests.impl.test_merge_faults import ADAPTER_FILE, _header_edit, tree_digest  # noqa: E402

pytestmark = pytest.mark.upstream
IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
BOTH = ["experts.gate_up_proj", "experts.down_proj"]


def _base(variant: str = "2i_ne_h"):
    m = tiny(FUSED_FAMILY, variant)
    quantize_experts(m, quant_config("nf4", torch.float32))
    return m


def _saved(path: Path, variant: str = "2i_ne_h", targets=BOTH, sidecar: bool = True) -> torch.Tensor:
    """A LoRA with random nonzero factors on ``targets`` saved to ``path`` (with impl's sidecar, or plain PEFT);
    returns the live logits."""
    pm = peft.get_peft_model(_base(variant), peft.LoraConfig(r=2, lora_alpha=4, target_parameters=targets))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    (save_adapter if sidecar else type(pm).save_pretrained)(pm, str(path))
    return pm(IDS).logits


def _edit_json(path: Path, **changes) -> None:
    obj = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            obj.pop(k, None)
        else:
            obj[k] = v
    path.write_text(json.dumps(obj))


def _refused(adapter_dir: Path, exc, match: str, variant: str = "2i_ne_h") -> None:
    before = tree_digest(adapter_dir)
    with pytest.raises(exc, match=match):
        load_adapter(_base(variant), str(adapter_dir))
    assert tree_digest(adapter_dir) == before


# --- load_adapter -------------------------------------------------------------------------------------------------


def test_load_sidecar_not_json(tmp_path):
    _saved(tmp_path)
    (tmp_path / SIDECAR).write_text("{orientation: swapped")
    _refused(tmp_path, AdapterError, r"moe_compat.json: not valid JSON")


def test_load_sidecar_unknown_format(tmp_path):
    _saved(tmp_path)
    _edit_json(tmp_path / SIDECAR, format=2)
    _refused(tmp_path, AdapterError, r"unknown sidecar format 2")


def test_load_sidecar_and_config_name_different_peft_versions(tmp_path):
    _saved(tmp_path)
    other = "0.21.2" if peft.__version__ == "0.18.1" else "0.18.1"
    _edit_json(tmp_path / SIDECAR, peft_version=other)
    _refused(tmp_path, OrientationError, rf"adapter_config.json says peft_version {peft.__version__} but "
             rf"moe_compat.json says {other}")  # fmt: skip


def test_load_adapter_config_not_json(tmp_path):
    _saved(tmp_path, sidecar=False)
    (tmp_path / "adapter_config.json").write_text("{'r': 2}")
    _refused(tmp_path, AdapterError, r"adapter_config.json: not valid JSON")


def test_load_adapter_header_corrupt(tmp_path):
    """A header safetensors itself would reject fails before PEFT reads it, naming the file and the rule."""
    _saved(tmp_path, sidecar=False)
    _header_edit(lambda h, ks: None, lambda d: d + b"\0" * 8, shard=ADAPTER_FILE)(tmp_path, tmp_path, tmp_path)
    _refused(tmp_path, AdapterError, r"adapter_model.safetensors: .* \(leaves 8 trailing bytes\)")


def test_load_adapter_rank_contradicts_config(tmp_path):
    _saved(tmp_path, sidecar=False)
    _edit_json(tmp_path / "adapter_config.json", r=3)
    _refused(tmp_path, AdapterError, r"r·E = \d+ rows: with r = 3 \(adapter_config\)")


def test_load_square_target_alone_without_provenance_refused(tmp_path):
    """2I == H, LoRA on gate_up_proj only (no sibling), plain PEFT save with its peft_version removed: nothing can
    tell the orientation, so the load refuses instead of guessing (PEFT alone would load it either way)."""
    _saved(tmp_path, "2i_eq_h", ["experts.gate_up_proj"], sidecar=False)
    _edit_json(tmp_path / "adapter_config.json", peft_version=None)
    _refused(tmp_path, OrientationError, r"gate_up_proj: ambiguous: d1 == d2 .* no source decides", "2i_eq_h")


def test_load_square_target_alone_decided_by_peft_version(tmp_path):
    """The same plain save with its peft_version: an (E, out, in) layout fixes is_transposed (False), so the
    version's rule decides; the reload equals the live model bit for bit and the directory is untouched. For
    (E, in, out) experts (GPT-OSS, the only fused family of 4.57) the saver's is_transposed is not in a plain save:
    where the version's rule depends on it (PEFT 0.19.x on) the load refuses instead of guessing."""
    live = _saved(tmp_path, "2i_eq_h", ["experts.gate_up_proj"], sidecar=False)
    q = next(m for m in _base("2i_eq_h").modules() if hasattr(m, "is_transposed"))
    if q.is_transposed and peft_swaps(peft.__version__, 3, True) != peft_swaps(peft.__version__, 3, False):
        _refused(tmp_path, OrientationError, r"gate_up_proj: ambiguous: .*rule depends on is_transposed", "2i_eq_h")
        return
    before = tree_digest(tmp_path)
    got = load_adapter(_base("2i_eq_h"), str(tmp_path))(IDS).logits
    assert tree_digest(tmp_path) == before
    assert torch.equal(got, live)


def test_load_square_target_sidecar_contradicting_peft_version_refused(tmp_path):
    """The sidecar's recorded orientation for a square target flipped (shapes cannot tell): its own peft_version's
    rule contradicts it, so the load refuses naming both (issue 12: hints trusted over evidence)."""
    _saved(tmp_path, "2i_eq_h", ["experts.gate_up_proj"])
    side = json.loads((tmp_path / SIDECAR).read_text())
    for entry in side["adapters"]["default"].values():
        entry["orientation"] = "standard" if entry["orientation"] == "swapped" else "swapped"
    (tmp_path / SIDECAR).write_text(json.dumps(side))
    if transformers_may_force_swap(transformers.__version__):
        # the saver's transformers (recorded in the sidecar) patches load_adapter to swap whatever PEFT's rule says,
        # so the version rule is set aside and the sidecar alone decides: the flip cannot be detected; the
        # description says so (decided by the sidecar, nothing else)
        described = describe_adapter_dir(_base("2i_eq_h"), str(tmp_path))
        assert side["transformers_version"] == transformers.__version__
        assert {tuple(e["decided_by"]) for e in described["adapters"]["default"].values()} == {(SIDECAR,)}
        return
    _refused(tmp_path, OrientationError, r"gate_up_proj: orientation sources disagree: moe_compat.json says \w+; "
             rf"peft_version {peft.__version__}", "2i_eq_h")  # fmt: skip


def test_load_other_orientation_undeclared_converted_by_sibling(tmp_path):
    """2I == H: a plain save re-expressed in the other PEFT orientation with no provenance (peft_version removed):
    the non-square down_proj fixes the square gate_up_proj's orientation, the load converts both exactly."""
    from safetensors.torch import load_file, save_file

    from reference.lora import convert_adapter

    live = _saved(tmp_path / "a", "2i_eq_h", sidecar=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    sd = load_file(str(tmp_path / "a" / ADAPTER_FILE))
    q = next(m for m in _base("2i_eq_h").modules() if hasattr(m, "is_transposed"))
    cell = "swapped" if peft_swaps(peft.__version__, 3, q.is_transposed) else "standard"
    other = "standard" if cell == "swapped" else "swapped"
    for ka in [k for k in sd if k.endswith("lora_A.weight")]:
        kb = ka.replace("lora_A", "lora_B")
        sd[ka], sd[kb] = convert_adapter(sd[ka], sd[kb], q.num_experts, src_orientation=cell, dst_orientation=other)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "b" / ADAPTER_FILE))
    _edit_json(tmp_path / "b" / "adapter_config.json", peft_version=None)
    before = tree_digest(tmp_path / "b")
    got = load_adapter(_base("2i_eq_h"), str(tmp_path / "b"))(IDS).logits
    assert tree_digest(tmp_path / "b") == before
    assert torch.allclose(got, live, rtol=0, atol=1e-5)  # converted factors: same ΔW up to fp32 summation order


# --- attach_fp8_experts ------------------------------------------------------------------------------------------

needs_fused = pytest.mark.skipif(MODULE_LIST, reason="attach_fp8_experts needs fused experts (transformers 5.x)")


def _poison_scale(ckpt: Path, value: float) -> str:
    from safetensors.torch import load_file, save_file

    f = ckpt / "model.safetensors"
    sd = load_file(str(f))
    key = sorted(k for k in sd if k.endswith("_scale_inv"))[0]
    sd[key] = torch.full_like(sd[key], value)
    save_file(sd, str(f), metadata={"format": "pt"})
    return key


def _attach_refused(ckpt: Path, exc, match: str) -> None:
    before = tree_digest(ckpt)
    with pytest.raises(exc, match=match):
        attach_fp8_experts(tiny("qwen3_moe", dtype=torch.bfloat16), str(ckpt))
    assert tree_digest(ckpt) == before


@needs_fused
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_attach_fp8_non_finite_scales_refused(tmp_path, value):
    """Issue 12: all-NaN scales were attached (NaN logits) while the merge refused them. Both now go through
    `discover_fp8`'s value check."""
    _fp8_checkpoint(tmp_path)
    key = _poison_scale(tmp_path, value)
    _attach_refused(tmp_path, FP8CheckpointError, rf"{key}: (\d+) of \1 scale values .* are NaN or inf")


@needs_fused
def test_attach_fp8_e5m2_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _fp8_checkpoint(tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(str(f))
    key = sorted(k for k in sd if sd[k].dtype == torch.float8_e4m3fn)[0]
    sd[key] = sd[key].float().to(torch.float8_e5m2)
    save_file(sd, str(f), metadata={"format": "pt"})
    _attach_refused(tmp_path, FP8CheckpointError, rf"{key}: dtype F8_E5M2")


@needs_fused
def test_attach_fp8_experts_absent_from_the_model_refused(tmp_path):
    _fp8_checkpoint(tmp_path)
    before = tree_digest(tmp_path)
    model = tiny("qwen3_moe", dtype=torch.bfloat16)
    model.model.layers = model.model.layers[:1]  # the checkpoint has 2 layers of experts, the model 1
    with pytest.raises(
        QuantizedExpertsError, match=r"checkpoint experts 'model.layers.1.mlp.experts' are not a module"
    ):
        attach_fp8_experts(model, str(tmp_path))
    assert tree_digest(tmp_path) == before
