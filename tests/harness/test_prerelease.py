"""`prerelease` on synthetic upstream releases, offline: a PEFT pre-release and a local wheel, each the installed PEFT
re-packed with one line changed, against the installed PEFT re-packed as the newest release.

The injected regression is PEFT 0.19.0's ParamWrapper swap rule (swap iff ``is_transposed``, PR #3083) in place of
the current one (swap iff ``param_ndim == 3 and not is_transposed``, PR #3165). It flips
``_did_swap_in_out_features`` for every family (Qwen3-MoE / Mixtral experts are not transposed, GPT-OSS experts are),
so every ``test_swap_flag_shapes_and_detection`` case fails (it compares the flag with ``reference.layout.peft_swaps``
for the installed version); the other checks of the selection read the live flag and stay self-consistent, so they
must keep passing. Expected flagged set = the swap-flag cases of the selection, and nothing else.

Every package comes from a file:// index of wheels re-packed from this environment (``wheelkit``), reached through
``PIP_INDEX_URL`` only: resolution and the uv installs both honour it (uv runs offline).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest

from harness import prerelease
from harness.index import IndexConfig, IndexSource
from harness.matrix import AxisValue, load_matrix
from tests.harness.wheelkit import Patch, environment_wheels, isolated_index_env, repack, write_index

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # three cells (venv, import probe, tests): about a minute of CPU
NODE = "tests/oracles/test_peft_paramwrapper.py::{test}[{family}-E4H8I6]"
FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss")
SELECTION = {NODE.format(test=t, family=f) for f in FAMILIES for t in (
    "test_swap_flag_shapes_and_detection", "test_get_delta_weight_is_stride_e",
    "test_wrapped_forward_and_merge_match_reference")}
EXPECTED = {NODE.format(test="test_swap_flag_shapes_and_detection", family=f) for f in FAMILIES}
SWAP_RULE = Patch("peft/tuners/lora/layer.py",
                  "swap_in_out_features = (self._param_ndim == 3) and not is_transposed",
                  "swap_in_out_features = (self._param_ndim == 3) and is_transposed")

MATRIX = """
[matrix]
name = "synthetic"
tests = ["tests/oracles/test_peft_paramwrapper.py"]
pytest_args = ["-k", "E4H8I6"]
[packages]
accelerate = "latest"
safetensors = ">=0.4"
[[axis]]
package = "transformers"
prefix = "t"
values = [{ id = "5.x", spec = "==5.*" }]
[[axis]]
package = "peft"
prefix = "p"
values = [{ id = "latest", spec = "latest" }]
"""


def version_patch(version: str) -> Patch:
    """peft/__init__.py's ``__version__`` follows the (synthetic) distribution version, as in a real release."""
    return Patch("peft/__init__.py", f'__version__ = "{peft.__version__}"', f'__version__ = "{version}"')


def args_for(tmp: Path, **kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    prerelease.add_arguments(p)
    argv = ["--matrix", str(tmp / "m.toml"), "--reports", str(tmp / "reports"), "--envs-dir", str(tmp / "envs"),
            "--run-id", "pre"]
    for key, values in kw.items():
        for v in values:
            argv += [f"--{key.replace('_', '-')}", v]
    return p.parse_args(argv)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prerelease")
    wheels = [w for w in environment_wheels(tmp / "files") if not w.name.startswith("peft-")]
    release = repack("peft", tmp / "files")                                   # the installed PEFT, as released
    rc = repack("peft", tmp / "files", version="0.99.0rc1", patches=(SWAP_RULE, version_patch("0.99.0rc1")))
    local = repack("peft", tmp / "local", version=f"{peft.__version__}+swaprule",
                   patches=(SWAP_RULE, version_patch(f"{peft.__version__}+swaprule")))
    simple = write_index(tmp / "index", [*wheels, release, rc])
    (tmp / "m.toml").write_text(MATRIX)
    return tmp, simple.as_uri(), local


@pytest.fixture(scope="module")
def run(synthetic):
    tmp, index_url, local = synthetic
    mp = pytest.MonkeyPatch()
    isolated_index_env(mp, index_url, var="PIP_INDEX_URL")
    try:
        args = args_for(tmp, package=["transformers"], candidate=["peft=pre", f"peft={local}"])
        code = prerelease.main(args)
    finally:
        mp.undo()
    run_dir = tmp / "reports" / "runs" / "pre"
    return code, json.loads((run_dir / "prerelease.json").read_text()), run_dir, local


def test_flags_exactly_the_checks_the_injected_line_breaks(run):
    code, rep, _run_dir, _local = run
    assert code == 1
    (pkg,) = [p for p in rep["packages"] if p["package"] == "peft"]
    rel = pkg["release"]
    assert rel["resolved"]["peft"] == peft.__version__ and rel["status"] == "pass"
    assert rel["counts"] == {"pass": len(SELECTION)}                    # the whole selection passes on the release
    labels = [c["label"] for c in pkg["candidates"]]
    assert labels[0] == "0.99.0rc1 (newest pre-release)" and "wheel" in labels[1]
    for cand in pkg["candidates"]:
        assert cand["status"] == "fail" and not cand.get("error")
        assert {r["node_id"] for r in cand["regressions"]} == EXPECTED, cand["label"]
        assert cand["new_failures"] == [] and cand["missing"] == [] and cand["fixes"] == []
        for r in cand["regressions"]:
            assert r["was"] == "pass" and r["now"] == "fail"
            assert "AssertionError" in r["failure"] and "peft_swaps" in r["failure"]


def test_no_newer_prerelease_is_said_plainly(run):
    _code, rep, _run_dir, _local = run
    (pkg,) = [p for p in rep["packages"] if p["package"] == "transformers"]
    assert pkg["candidates"] == [] and pkg["release"] is None
    (note,) = pkg["notes"]
    assert note.startswith("no pre-release of transformers is newer than the newest release 5.") and "file://" in note


def test_report_is_paste_ready(run):
    _code, rep, run_dir, local = run
    md = (run_dir / "prerelease.md").read_text()
    node = NODE.format(test="test_swap_flag_shapes_and_detection", family="qwen3_moe")
    heading = (f"### peft 0.99.0rc1: `swap_flag_shapes_and_detection [qwen3_moe] [qwen3_moe-E4H8I6]` pass on "
               f"{peft.__version__}, fail on 0.99.0rc1")
    assert heading in md
    assert f"- **check**: `{node}`" in md and "AssertionError" in md
    install = next(ln for ln in rep["packages"][1]["candidates"][0]["regressions"][0]["reproduce"].splitlines()
                   if "peft==" in ln)
    assert " peft==0.99.0rc1 " in install and " transformers==5.24.0 " in install
    assert install.endswith(f"--extra-index-url {rep['index']['index_url']}")       # not on PyPI: say where
    assert f"python -m pytest -p harness.pytest_plugin '{node}'" in md
    assert f"sha256 {hashlib.sha256(local.read_bytes()).hexdigest()}" in md      # the local wheel, exactly
    assert "no pre-release of transformers is newer" in md


def test_summary_records_versions_and_exact_sources(run):
    _code, _rep, run_dir, local = run
    summary = json.loads((run_dir / "summary.json").read_text())
    by_peft = {c["resolved"]["peft"]: c for c in summary["cells"]}
    assert set(by_peft) == {peft.__version__, "0.99.0rc1", f"{peft.__version__}+swaprule"}
    rc = by_peft["0.99.0rc1"]["sources"]["peft"]
    assert rc["kind"] == "index" and rc["pre"] is True and rc["sources"][0].startswith("file://")
    (wheel_sha,) = rc["files"].values()
    assert len(wheel_sha) == 64
    path = by_peft[f"{peft.__version__}+swaprule"]["sources"]["peft"]
    assert path == {"kind": "wheel", "path": str(local.resolve()), "version": f"{peft.__version__}+swaprule",
                    "sha256": hashlib.sha256(local.read_bytes()).hexdigest()}
    assert summary["options"]["index"]["index_url"].startswith("file://")
    assert summary["options"]["index"]["origin"]["index_url"] == "pip environment"


def test_candidate_values(synthetic, monkeypatch):
    """Spec candidates resolve with pre-releases allowed; the release itself or an unmatched spec is a note."""
    tmp, index_url, local = synthetic
    isolated_index_env(monkeypatch, index_url)
    src = IndexSource(IndexConfig.from_environment())
    versions = src("peft")
    release = peft.__version__
    label, value = prerelease.candidate_value("peft", ">=0.99.0rc0", versions, release, src)
    assert value == AxisValue("peft", "0.99.0rc1", ">=0.99.0rc0", pre=True) and label.startswith("0.99.0rc1")
    assert "no version of peft" in prerelease.candidate_value("peft", "==7.0", versions, release, src)
    label, value = prerelease.candidate_value("peft", str(local), versions, release, src)
    assert value.path == str(local) and value.id.startswith("path-")
    m = load_matrix(tmp / "m.toml")
    plans = prerelease.plan(m, ["peft"], {"peft": [f"=={release}", "pre", "pre"]}, src)
    assert [v.id for _l, v in plans[0].candidates] == ["0.99.0rc1"]
    assert any("is the newest release" in n for n in plans[0].notes)
    assert any("repeats an earlier candidate" in n for n in plans[0].notes)
