"""The pytest plugin: check records, moe_check API, --quick, known-broken entries as strict xfails."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from harness.pytest_plugin import MoeCheck
from harness.runner import ROOT, read_results

SAMPLE = '''
import pytest

@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_oracle_peft_reload(moe_check, family):
    moe_check.require("max_abs_diff", 1e-4, 1e-3)
    if family == "qwen3_moe":
        raise TypeError("__init__() got an unexpected keyword argument 'distributed_operation'")

def test_other_failure_is_not_hidden(moe_check):
    moe_check.set(name="oracle_peft_load_adapter")
    raise RuntimeError("a different bug")

def test_stale(moe_check):
    moe_check.set(name="oracle_transformers_adapter_api")

def test_finding_and_plot(moe_check):
    moe_check.set(name="loss_parity", family="mixtral", variant="nf4")
    moe_check.metric("sqnr_db", 31.5, threshold=25, op=">=")
    moe_check.plot("loss", {"bf16": [3.0, 2.0, 1.5], "nf4": [3.1, 2.1, float("nan")]})
    moe_check.finding("NF4 tracks bf16 within 3%.")

def test_threshold_violation(moe_check):
    moe_check.require("rel_err", 0.5, 0.01, msg="NF4 drift")

@pytest.mark.slow
def test_slow_one():
    pass

def test_quick_fixture(quick, record_property):
    record_property("tokens", 128)
    assert quick

def test_known_skip():
    raise AssertionError("must not run")
'''

MATRIX = '''
[[axis]]
package = "transformers"
values = [{ id = "a", spec = "" }]
[[known]]
cells = ["ta"]
checks = ["oracle_peft_*reload*", "oracle_peft_*load_adapter*"]
families = ["qwen3_moe"]
match = "distributed_operation"
reason = "r-dist"
link = "https://example.invalid/1"
[[known]]
cells = ["ta"]
checks = ["oracle_peft_load_adapter"]
match = "distributed_operation"
reason = "r-mismatch"
link = "https://example.invalid/2"
[[known]]
cells = ["ta"]
checks = ["oracle_transformers_adapter*"]
reason = "r-stale"
link = "https://example.invalid/3"
[[known]]
cells = ["ta"]
checks = ["known_skip"]
expect = "skip"
reason = "r-skip"
link = "https://example.invalid/4"
[[known]]
cells = ["other-cell"]
checks = ["*"]
reason = "never applies here"
link = "https://example.invalid/5"
'''


def _pytest(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    # no:hypothesispytest: the sample needs no hypothesis, whose plugin would import (and re-compile) it
    return subprocess.Popen([sys.executable, "-m", "pytest", "-p", "harness.pytest_plugin", "-p", "no:cacheprovider",
                             "-p", "no:hypothesispytest", "-q", "-c", os.devnull, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, object]:
    """Two pytest runs in parallel: the sample with a cell and results file, and a bare one (no cell, no file)."""
    tmp = tmp_path_factory.mktemp("plugin")
    (tmp / "test_sample.py").write_text(SAMPLE)
    (tmp / "m.toml").write_text(MATRIX)
    bare = tmp / "bare"
    bare.mkdir()
    (bare / "test_one.py").write_text("def test_a(moe_check):\n    moe_check.metric('m', 1)\n")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_COMPAT_")}
    env = {**base_env, "MOE_COMPAT_CELL": "ta", "MOE_COMPAT_MATRIX": str(tmp / "m.toml")}
    out = tmp / "out.jsonl"
    p1 = _pytest(["--moe-results", str(out), "--quick", "--rootdir", str(tmp), str(tmp / "test_sample.py")], env)
    p2 = _pytest(["--rootdir", str(bare), str(bare / "test_one.py")], base_env)
    out1, _ = p1.communicate(timeout=120)
    out2, _ = p2.communicate(timeout=120)
    return {"sample": (p1.returncode, out1, out), "bare": (p2.returncode, out2, bare)}


@pytest.fixture(scope="module")
def results(runs) -> dict[str, dict]:
    rc, text, out = runs["sample"]
    assert rc == 1, text                                        # failures exist: exit 1, not a crash
    checks, session, running, finish = read_results(out)
    assert session["cell"] == "ta" and running is None and finish["exitstatus"] == 1
    by = {c["node_id"].split("::")[-1]: c for c in checks}
    by["_finish"] = finish
    return by


def test_known_xfail_applies_with_family_and_match(results):
    assert results["test_oracle_peft_reload[qwen3_moe]"]["status"] == "xfail"
    assert "r-dist" in results["test_oracle_peft_reload[qwen3_moe]"]["message"]
    assert results["test_oracle_peft_reload[gpt_oss]"]["status"] == "pass"     # family not listed


def test_known_entry_does_not_hide_a_different_failure(results):
    rec = results["test_other_failure_is_not_hidden"]
    assert rec["status"] == "fail" and "a different bug" in rec["message"]


def test_stale_known_entry_is_strict_xpass(results):
    rec = results["test_stale"]
    assert rec["status"] == "xpass" and "stale" in rec["message"] and "r-stale" in rec["message"]


def test_finding_metrics_thresholds_and_plots(results):
    rec = results["test_finding_and_plot"]
    assert (rec["name"], rec["family"], rec["variant"], rec["status"]) == ("loss_parity", "mixtral", "nf4", "finding")
    assert rec["message"] == "NF4 tracks bf16 within 3%."
    assert rec["metrics"] == {"sqnr_db": 31.5} and rec["threshold"] == {"sqnr_db": {"op": ">=", "value": 25.0}}
    assert rec["plots"][0]["series"]["nf4"][2] == "NaN"                         # JSON-safe non-finite


def test_threshold_violation_names_value_and_threshold(results):
    rec = results["test_threshold_violation"]
    assert rec["status"] == "fail" and rec["name"] == "threshold_violation"
    assert "rel_err = 0.5 violates threshold <= 0.01: NF4 drift" in rec["message"]


def test_quick_skips_slow_and_sets_fixture(results):
    assert results["test_slow_one"]["status"] == "skip" and "--quick" in results["test_slow_one"]["message"]
    assert results["test_quick_fixture"]["status"] == "pass"
    assert results["test_quick_fixture"]["metrics"] == {"tokens": 128.0}        # record_property numbers


def test_known_skip_and_unused_entries(results):
    assert results["test_known_skip"]["status"] == "skip" and "r-skip" in results["test_known_skip"]["message"]
    assert [u["reason"] for u in results["_finish"]["known_unused"]] == []      # other-cell entry not in force


def test_default_name_and_params():
    chk = MoeCheck(cell=None, quick=False, versions={})
    with pytest.raises(TypeError, match="real number"):
        chk.metric("x", "1.0")
    with pytest.raises(ValueError, match="op"):
        chk.metric("x", 1.0, threshold=2, op="=<")
    with pytest.raises(ValueError, match="differ in length"):
        chk.plot("p", {"a": [1, 2]}, x=[0, 1, 2])


def test_plugin_loads_without_results_or_cell(runs):
    rc, text, bare = runs["bare"]
    assert rc == 0, text
    assert not list(bare.glob("*.jsonl"))
