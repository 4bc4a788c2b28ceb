"""impl.merge fault handling: every bad input fails with its own error naming key/shapes/rule; after any merge,
failed or not, the source checkpoint and adapter are byte-identical (sha256 of every file); a failure mid-write (a
shard that fails validation after earlier shards were written) or a killed process leaves no output directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")
from safetensors.torch import save_file  # noqa: E402

from impl.checkpoint import CheckpointError, FP8CheckpointError  # noqa: E402
from impl.merge import AdapterError, MergeError, merge_adapter  # noqa: E402
from impl.merge_cli import main as cli_main  # noqa: E402
from reference.fp8 import quantize_fp8_block  # noqa: E402
from scripts.measure_merge_memory import build_synthetic  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(shards=3, E=4, H=64, I=32, r=2)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def load_tensors(root: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_tensors_file(f))
    return out


def _rewrite(path: Path, mutate) -> None:
    """Apply ``mutate(dict)`` to the tensors of one safetensors file and write it back (test setup only)."""
    ts = load_tensors_file(path)
    mutate(ts)
    save_file(ts, str(path), metadata={"format": "pt"})


def load_tensors_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _shard_of(base: Path, key: str) -> Path:
    wm = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    return base / wm[key]


def _assert_failed_cleanly(tmp_path: Path, before: dict, out: Path) -> None:
    assert {d: tree_digest(tmp_path / d) for d in ("base", "adapter")} == before
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _run_failing(tmp_path, base, adapter, exc, match, **kw):
    before = {d: tree_digest(tmp_path / d) for d in ("base", "adapter")}
    with pytest.raises(exc, match=match):
        merge_adapter(base, adapter, tmp_path / "out", **kw)
    _assert_failed_cleanly(tmp_path, before, tmp_path / "out")


# --- FP8 checkpoint faults -------------------------------------------------------------------------------------

K0 = "model.layers.0.mlp.experts.0.gate_proj.weight"


def _fp8_bad(tmp_path, mutate):
    base, adapter = build_synthetic(tmp_path, fp8=True, **SMALL)
    _rewrite(_shard_of(base, K0), mutate)
    return base, adapter


def test_missing_scale(tmp_path):
    base, adapter = _fp8_bad(tmp_path, lambda ts: ts.pop(K0 + "_scale_inv"))
    wm_path = base / "model.safetensors.index.json"
    index = json.loads(wm_path.read_text())
    del index["weight_map"][K0 + "_scale_inv"]
    wm_path.write_text(json.dumps(index))
    _run_failing(tmp_path, base, adapter, FP8CheckpointError, rf"{K0}: FP8 weight \[32, 64\] has no scale tensor")


def test_scale_grid_matches_no_block(tmp_path):
    base, adapter = _fp8_bad(tmp_path, lambda ts: ts.update({K0 + "_scale_inv": torch.ones(2, 2)}))
    _run_failing(
        tmp_path, base, adapter, FP8CheckpointError, r"scale grid \[2, 2\] for weight .*\[32, 64\] matches no rule"
    )


def test_e5m2_refused(tmp_path):
    base, adapter = _fp8_bad(tmp_path, lambda ts: ts.update({K0: ts[K0].float().to(torch.float8_e5m2)}))
    _run_failing(tmp_path, base, adapter, FP8CheckpointError, rf"{K0}: dtype F8_E5M2 \[32, 64\]")


def test_expert_shape_mismatch(tmp_path):
    q, s = quantize_fp8_block(torch.randn(32, 48))
    base, adapter = _fp8_bad(tmp_path, lambda ts: ts.update({K0: q, K0 + "_scale_inv": s}))
    _run_failing(tmp_path, base, adapter, CheckpointError, r"per-expert shapes disagree")


# --- adapter / argument faults ---------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path):
    return build_synthetic(tmp_path, **SMALL)


def _edit_config(adapter: Path, **changes) -> None:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))


def test_dora_refused(tmp_path, small):
    base, adapter = small
    _edit_config(adapter, use_dora=True)
    _run_failing(tmp_path, base, adapter, AdapterError, r"use_dora=True")


def test_unknown_adapter_tensor_refused(tmp_path, small):
    base, adapter = small
    key = "base_model.model.model.layers.0.mlp.experts.lora_magnitude_vector"
    _rewrite(adapter / "adapter_model.safetensors", lambda ts: ts.update({key: torch.ones(3)}))
    _run_failing(tmp_path, base, adapter, AdapterError, r"not LoRA A/B weights .*lora_magnitude_vector")


def test_rank_disagrees_with_config(tmp_path, small):
    base, adapter = small
    _edit_config(adapter, r=3)
    _run_failing(
        tmp_path, base, adapter, AdapterError, r"r·E = 8 rows: with r = 3 \(adapter_config\) that is no whole number"
    )


def test_adapter_module_missing_in_base(tmp_path, small):
    base, adapter = small
    a, b = torch.zeros(2, 64), torch.zeros(64, 2)
    extra = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b,
    }
    _rewrite(adapter / "adapter_model.safetensors", lambda ts: ts.update(extra))
    _run_failing(
        tmp_path, base, adapter, AdapterError, r"no base tensor for LoRA module 'model.layers.0.self_attn.q_proj'"
    )


def test_factors_fit_no_expert_param(tmp_path, small):
    base, adapter = small
    key = "base_model.model.model.layers.1.mlp.experts.lora_A.weight"  # down: [r·E, I] -> wrong width
    _rewrite(adapter / "adapter_model.safetensors", lambda ts: ts.update({key: torch.zeros(8, 40)}))
    _run_failing(tmp_path, base, adapter, AdapterError, r"fit no expert param of model.layers.1.mlp.experts")


def test_sidecar_contradicting_the_shapes_refused(tmp_path, small):
    """The synthetic down adapter is swapped (lora_A [r·E, I] on down [E, H, I], H != I); a sidecar saying
    "standard" for it is an error, not a hint to follow (it only decides square params)."""
    base, adapter = small
    (adapter / "moe_compat.json").write_text(json.dumps({"orientation": {"down_proj": "standard"}}))
    _run_failing(tmp_path, base, adapter, AdapterError, r"the shapes say swapped; moe_compat.json says standard")


def test_sidecar_with_unknown_format_refused(tmp_path, small):
    base, adapter = small
    (adapter / "moe_compat.json").write_text(json.dumps({"format": 7, "adapters": {}}))
    _run_failing(tmp_path, base, adapter, AdapterError, r"unknown sidecar format 7")


def test_bnb_serialized_base_refused(tmp_path, small):
    base, adapter = small
    _rewrite(_shard_of(base, K0), lambda ts: ts.update({K0 + ".absmax": torch.ones(4)}))
    index = json.loads((base / "model.safetensors.index.json").read_text())
    index["weight_map"][K0 + ".absmax"] = _shard_of(base, K0).name
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    _run_failing(tmp_path, base, adapter, MergeError, r"bitsandbytes-serialized .* merge onto the 16-bit base")


def test_mxfp4_base_refused(tmp_path, small):
    base, adapter = small
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "mxfp4"}}))
    _run_failing(tmp_path, base, adapter, MergeError, r"quant_method 'mxfp4' .* not supported")


def test_fp8_method_needs_fp8_base(tmp_path, small):
    base, adapter = small
    _run_failing(tmp_path, base, adapter, MergeError, r"method 'fp8' needs an FP8 base", method="fp8")


def test_output_dir_rules(tmp_path, small):
    base, adapter = small
    with pytest.raises(MergeError, match="must not be, contain or be inside the source"):
        merge_adapter(base, adapter, base / "merged")
    (tmp_path / "out").mkdir()
    with pytest.raises(MergeError, match="exists; pass overwrite=True"):
        merge_adapter(base, adapter, tmp_path / "out")
    (tmp_path / "out" / "stale.txt").write_text("x")
    merge_adapter(base, adapter, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "stale.txt").exists() and (tmp_path / "out" / "config.json").is_file()


def test_cli_reports_errors_with_exit_2(tmp_path, small, capsys):
    base, adapter = small
    _edit_config(adapter, use_dora=True)
    assert cli_main([str(base), str(adapter), str(tmp_path / "out"), "--quiet"]) == 2
    assert "AdapterError" in capsys.readouterr().err and not (tmp_path / "out").exists()
    _edit_config(adapter, use_dora=False)
    assert cli_main([str(base), str(adapter), str(tmp_path / "out"), "--dtype", "float16"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["expert_deltas"] == 3 * 3 * SMALL["E"]
    assert "[moe-compat-merge] shard 3/3" in captured.err


# --- interrupted writes ----------------------------------------------------------------------------------------


def test_failure_in_a_later_shard_leaves_nothing(tmp_path, small, capsys):
    """A NaN in the last layer's adapter passes planning (shapes only) and fails the finiteness check while the
    last shard is written, after shards 1 and 2 were written to the temporary directory."""
    base, adapter = small
    key = "base_model.model.model.layers.2.mlp.experts.lora_B.weight"

    def poison(ts):
        ts[key][0, 0] = float("nan")

    _rewrite(adapter / "adapter_model.safetensors", poison)
    _run_failing(
        tmp_path,
        base,
        adapter,
        MergeError,
        r"'model.layers.2.mlp.experts.0.down_proj.weight' \[64, 32\] has \d+ non-finite",
        progress=True,
    )
    err = capsys.readouterr().err
    assert "shard 1/3" in err and "shard 2/3" in err and "shard 3/3" not in err


def test_killed_process_leaves_no_output_dir(tmp_path):
    """SIGKILL right after the CLI reports its first shard: ``out`` never appears (the rename is the last step); the
    temporary ``.out.partial-<pid>-<hex>`` is all that can remain after a kill (no handler runs on SIGKILL), and the
    next merge into ``out`` removes it."""
    base, adapter = build_synthetic(tmp_path, shards=8, E=8, H=512, I=256, r=4)
    before = {d: tree_digest(tmp_path / d) for d in ("base", "adapter")}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "impl.merge_cli", str(base), str(adapter), str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        if "shard 1/8" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL  # killed mid-merge, not finished
    assert not (tmp_path / "out").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("base", "adapter")]
    assert all(name.startswith(".out.partial-") for name in leftovers), leftovers
    assert {d: tree_digest(tmp_path / d) for d in ("base", "adapter")} == before
    merge_adapter(base, adapter, tmp_path / "out")  # the next merge removes the dead process's partial dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]


def test_successful_merge_counts_and_keeps_source(tmp_path, small):
    base, adapter = small
    before = {d: tree_digest(tmp_path / d) for d in ("base", "adapter")}
    report = merge_adapter(base, adapter, tmp_path / "out")
    assert {d: tree_digest(tmp_path / d) for d in ("base", "adapter")} == before
    assert report.expert_deltas == 3 * 3 * SMALL["E"] and report.linear_deltas == 0
    src, out = load_tensors(base), load_tensors(tmp_path / "out")
    assert src.keys() == out.keys() and all(not torch.equal(src[k], out[k]) for k in src)


# --- bytes against reference.merge (no transformers needed) ----------------------------------------------------


@pytest.mark.parametrize("method", ["merged_16bit", "fp8"])
def test_fp8_merge_equals_reference_merge(tmp_path, method):
    """Every merged expert tensor equals reference.merge (merge_fp8_to_bf16 / merge_into_fp8) on the same q, scale,
    block and ΔW from reference.lora (PEFT 0.21 on fused_linear: swapped, stride-E), bit for bit. H=64, I=32 with
    128×128 blocks: every scale grid is a partial [1, 1] ceil grid."""
    from reference.merge import merge_fp8_to_bf16, merge_into_fp8

    base, adapter = build_synthetic(tmp_path, fp8=True, **SMALL)
    merge_adapter(base, adapter, tmp_path / "out", method=method)
    src, out, lora = load_tensors(base), load_tensors(tmp_path / "out"), load_tensors(adapter)
    E, I = SMALL["E"], SMALL["I"]
    for layer in range(SMALL["shards"]):
        p = f"model.layers.{layer}.mlp.experts"
        deltas = _ref_deltas(lora, p)
        for e in range(E):
            for proj, d in (("gate_proj", deltas["gate_up"][e, :I]), ("up_proj", deltas["gate_up"][e, I:])):
                _check_one(src, out, f"{p}.{e}.{proj}.weight", d, method, merge_fp8_to_bf16, merge_into_fp8)
            _check_one(
                src, out, f"{p}.{e}.down_proj.weight", deltas["down"][e], method, merge_fp8_to_bf16, merge_into_fp8
            )


def _check_one(src, out, key, delta, method, to_bf16, into_fp8):
    q, s = src[key], src[key + "_scale_inv"]
    if method == "merged_16bit":
        assert torch.equal(out[key], to_bf16(q, s, delta, (128, 128))), key
        assert key + "_scale_inv" not in out
    else:
        q2, s2 = into_fp8(q, s, delta, (128, 128))
        assert torch.equal(out[key].view(torch.uint8), q2.view(torch.uint8)), key
        assert torch.equal(out[key + "_scale_inv"], s2), key


def test_per_row_and_per_tensor_scales_merge(tmp_path):
    """compressed-tensors channel scales ``[R, 1]`` and per-tensor scalars ``[]`` dequantize as blocks (1, C) and
    (R, C): the merged bf16 tensor equals reference.merge.merge_fp8_to_bf16 with that block and ΔW, bit for bit."""
    from reference.merge import merge_fp8_to_bf16

    base, adapter = build_synthetic(tmp_path, fp8=True, **SMALL)
    k_row, k_tensor = K0, K0.replace("gate_proj", "down_proj")  # gate [I=32, H=64], down [H=64, I=32] of expert 0
    blocks = {k_row: (1, 64), k_tensor: (64, 32)}

    def requant(ts):
        for key, block in blocks.items():
            ts[key], s = quantize_fp8_block(ts[key].float(), block)
            ts[key + "_scale_inv"] = s if key == k_row else s.reshape(())

    _rewrite(_shard_of(base, K0), requant)
    merge_adapter(base, adapter, tmp_path / "out", method="merged_16bit")
    src, out = load_tensors(base), load_tensors(tmp_path / "out")
    deltas = _ref_deltas(load_tensors(adapter), "model.layers.0.mlp.experts")
    expected_delta = {k_row: deltas["gate_up"][0, : SMALL["I"]], k_tensor: deltas["down"][0]}
    for key, block in blocks.items():
        q, s = src[key], src[key + "_scale_inv"]
        assert s.shape == ((32, 1) if key == k_row else ())
        grid = s.reshape(1, 1) if s.ndim == 0 else s  # the reference takes a scalar only without an explicit block
        assert torch.equal(out[key], merge_fp8_to_bf16(q, grid, expected_delta[key], block)), key


def _ref_deltas(lora: dict, p: str) -> dict[str, torch.Tensor]:
    """ΔW of one synthetic layer from reference.lora: PEFT 0.21 on fused_linear (swapped), stride-E, s = 2r/r."""
    from reference.layout import Orientation
    from reference.lora import LoraFactors
    from reference.merge import factors_delta

    out = {}
    for name, infix in (("gate_up", "base_layer."), ("down", "")):
        a, b = (lora[f"base_model.model.{p}.{infix}lora_{x}.weight"] for x in "AB")
        out[name] = factors_delta(LoraFactors(a, b, 2.0, Orientation.SWAPPED), SMALL["E"], torch.float32)
    return out


@pytest.mark.parametrize("method", ["merged_16bit", "fp8"])
def test_fused_3d_fp8_merge_equals_reference_merge(tmp_path, method):
    """Fused FP8 experts on disk (``experts.gate_up_proj`` e4m3 [E, H, 2I], gpt_oss layout, with a stacked
    ``gate_up_proj_scale_inv``; 16×16 blocks, partial at the I = 24 edge): equal to reference.merge on the 3-D tensors."""
    from reference.layout import Orientation
    from reference.lora import LoraFactors
    from reference.merge import factors_delta, merge_fp8_to_bf16, merge_into_fp8

    E, H, I, r, block = 4, 32, 24, 2, (16, 16)
    gen = torch.Generator().manual_seed(3)
    p = "model.layers.0.mlp.experts"
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    ts, lora = {}, {}
    for name, shape, infix in (("gate_up_proj", (E, H, 2 * I), "base_layer."), ("down_proj", (E, I, H), "")):
        ts[f"{p}.{name}"], ts[f"{p}.{name}_scale_inv"] = quantize_fp8_block(torch.randn(shape, generator=gen), block)
        # PEFT 0.21 on gpt_oss (is_transposed=True): standard, lora_A [r·E, d1], lora_B [d2, r·E]
        lora[f"base_model.model.{p}.{infix}lora_A.weight"] = torch.randn(r * E, shape[1], generator=gen) * 0.1
        lora[f"base_model.model.{p}.{infix}lora_B.weight"] = torch.randn(shape[2], r * E, generator=gen) * 0.1
    save_file(ts, str(base / "model.safetensors"), metadata={"format": "pt"})
    qc = {"quant_method": "fp8", "weight_block_size": list(block)}
    (base / "config.json").write_text(json.dumps({"model_type": "gpt_oss", "quantization_config": qc}))
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "peft_version": "0.21.2", "target_parameters": []}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    report = merge_adapter(base, adapter, tmp_path / "out", method=method)
    assert report.expert_deltas == 2 * E
    out = load_tensors(tmp_path / "out")
    for name, infix in (("gate_up_proj", "base_layer."), ("down_proj", "")):
        a, b = (lora[f"base_model.model.{p}.{infix}lora_{x}.weight"] for x in "AB")
        delta = factors_delta(LoraFactors(a, b, 2.0, Orientation.STANDARD), E, torch.float32)
        q, s = ts[f"{p}.{name}"], ts[f"{p}.{name}_scale_inv"]
        if method == "merged_16bit":
            assert torch.equal(out[f"{p}.{name}"], merge_fp8_to_bf16(q, s, delta, block))
        else:
            q2, s2 = merge_into_fp8(q, s, delta, block)
            assert torch.equal(out[f"{p}.{name}"].view(torch.uint8), q2.view(torch.uint8))
            assert torch.equal(out[f"{p}.{name}_scale_inv"], s2)
