"""bench/bench_moe.py without a GPU: argument parsing (--quick covers exactly the target rows), the target table from
given rows, and one CPU smoke run (TRITON_INTERPRET=1, the tiny model, untimed) that builds every kind of layer row
that is not a kernel test: the stock layer, the model entry (`impl.forward.experts_forward` through a
`QuantizedExperts` on the bench's weights) and the transformers + PEFT peer, forward and fwd_bwd with LoRA. (The same
run with ``--model-backend triton`` gives model_entry_* rel_err 0.0 against bf16_fused_lora / nf4_fused /
fp8_block_fused: the model runs the benchmarked kernels; too slow under the interpreter for CI.) Timings are never
asserted."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    """bench/bench_moe.py as a module (bench/ is a folder of scripts, not a package)."""
    name = "bench_moe_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "bench_moe.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules[name]


def test_quick_covers_exactly_the_cases_the_targets_read():
    bm = _bench()
    a = bm.parse_args(["--quick"])
    assert a.scopes == ["layer"] and a.tokens == [16, 64, 16384] and a.models == list(bm.DEFAULT_MODELS)
    assert set(a.cases) == {(16, "fwd", False), (64, "fwd", False), (16384, "fwd", False), (16384, "fwd_bwd", False),
                            (16384, "fwd_bwd", True)}  # fmt: skip
    needed = {v for vs in bm.TARGET_VARIANTS.values() for v in vs} | {bm.BASELINE}
    assert needed <= set(a.variants), needed - set(a.variants)
    assert {"model_entry_nf4", "model_entry_fp8", "model_entry_bf16", bm.PEER} <= set(a.variants)
    full = bm.parse_args([])
    assert full.cases is None and set(full.variants) == set(bm.VARIANTS) and full.scopes == ["layer", "gemm"]
    assert bm.parse_args(["--cases", "16:fwd:0,4:fwd_bwd:1"]).cases == ((16, "fwd", False), (4, "fwd_bwd", True))
    with pytest.raises(ValueError, match="TOKENS"):
        bm.parse_cases("16:backward:0")
    with pytest.raises(SystemExit):
        bm.parse_args(["--variants", "no_such_variant"])


def _row(v, T, mode, lora, t, graph=None, model="m"):
    r = dict(model=model, scope="layer", gemm="layer", tokens=T, mode=mode, lora=lora, variant=v, time_us=t)
    if graph is not None:
        r["time_us_graph"] = graph
    return r


def test_target_rows_compare_against_the_glue_baseline_of_the_same_run():
    bm = _bench()
    B = bm.BASELINE
    rows = [_row(B, 16384, "fwd_bwd", True, 1000.0), _row("model_entry_nf4", 16384, "fwd_bwd", True, 790.0),
            _row("nf4_fused", 16384, "fwd_bwd", True, 810.0), _row("model_entry_nf4", 16384, "fwd_bwd", False, 700.0),
            _row(B, 16384, "fwd", False, 500.0), _row("model_entry_fp8", 16384, "fwd", False, 300.0),
            _row(B, 16, "fwd", False, 900.0, graph=400.0), _row("model_entry_nf4", 16, "fwd", False, 800.0, graph=190.0),
            _row(bm.PEER, 16384, "fwd_bwd", True, 3000.0)]  # fmt: skip
    got = {(e["figure"], e["variant"]): e for e in bm.target_rows(rows)}
    e = got[("nf4_lora_fwd_bwd_16k", "model_entry_nf4")]
    assert e["value"] == pytest.approx(0.79) and e["met"] is True
    assert got[("nf4_lora_fwd_bwd_16k", "nf4_fused")]["met"] is False  # 0.81 > 0.80
    assert got[("nf4_lora_fwd_bwd_16k", bm.PEER)]["met"] is None  # context, not a target
    assert got[("fp8_fwd_16k", "model_entry_fp8")]["value"] == pytest.approx(0.6)
    d = got[("nf4_decode_16", "model_entry_nf4")]  # graph replay times: 400 / 190
    assert d["value"] == pytest.approx(400 / 190) and d["met"] is True
    ov = got[("lora_overhead_fwd_bwd_16k", "model_entry_nf4")]
    assert ov["value"] == pytest.approx(100 * (790 / 700 - 1)) and ov["met"] is False
    assert got[("nf4_decode_64", "model_entry_nf4")]["value"] is None  # no row: n/a, never a pass
    assert "| m | NF4+LoRA fwd_bwd @16384" in bm.targets(rows)


@pytest.mark.triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU interpreter smoke run")
def test_cpu_smoke_run_builds_every_kind_of_row(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    bm = _bench()
    variants = [bm.STOCK, "model_entry_bf16", "model_entry_nf4", bm.PEER]
    out = bm.main(["--device", "cpu", "--models", "tiny", "--tokens", "4", "--cases", "4:fwd:1,4:fwd_bwd:1",
                   "--scopes", "layer", "--variants", ",".join(variants), "--out", str(tmp_path), "--commit", "test"])  # fmt: skip
    data = json.loads(out.read_text())
    assert data["commit"] == "test" and data["torch"] and data["transformers"] and data["peft"]
    rows = data["rows"]
    errors = [r for r in rows if "error" in r]
    assert not errors, errors
    assert {(r["variant"], r["mode"]) for r in rows} == {(v, m) for v in variants for m in ("fwd", "fwd_bwd")}
    rel = {r["variant"]: r.get("rel_err") for r in rows if r["mode"] == "fwd"}
    # the same bf16 weights and LoRA factors as the stock layer: the model entry (grouped_mm on CPU) and transformers
    # + PEFT agree with it up to bf16 rounding (2^-8 relative per rounded step, a few steps: bound 5e-2)
    for v in ("model_entry_bf16", bm.PEER):
        assert rel[v] is not None and rel[v] < 5e-2, (v, rel)
    assert (tmp_path / out.name.replace(".json", ".md")).read_text().count("| tiny |") >= 2
