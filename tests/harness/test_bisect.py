"""`bisect`: the search itself (every first-bad position, skips, contradicting endpoints; no cells) and one real bisect
over 8 synthetic PEFT releases on a file:// index (offline, through ``UV_INDEX_URL``).

The synthetic releases are the installed PEFT re-packed as 0.21.3 … 0.21.10: from 0.21.8 on with PEFT 0.19.0's
ParamWrapper swap rule (the regression; see test_prerelease.py for why it fails exactly the swap-flag checks), and
0.21.6 cannot be imported (its ``peft/__init__.py`` raises), which the search must skip like ``git bisect skip``.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from packaging.version import Version

from harness import bisect
from harness.matrix import MatrixError
from tests.harness.conftest import cell, check


def oracle(first_bad: int, skipped: frozenset[int] = frozenset(), versions: int = 0):
    """A ``test`` callable for ``search``: version i is bad from ``first_bad`` on, ``skipped`` cannot be tested."""

    calls: list[str] = []

    def test(version: str) -> bisect.Outcome:
        i = int(version)
        calls.append(version)
        if i in skipped:
            return bisect.Outcome(bisect.SKIP, "cannot import")
        return bisect.Outcome(bisect.BAD if i >= first_bad else bisect.GOOD)

    return test, calls


def names(n: int) -> list[str]:
    return [str(i) for i in range(n)]


@pytest.mark.parametrize("n", range(2, 40))
def test_every_first_bad_position_within_the_run_bound(n):
    """No skips: the answer is exact and takes at most ceil(log2(n - 1)) + 1 <= ceil(log2 n) + 1 runs."""
    for k in range(1, n):
        test, calls = oracle(k)
        res, _ = bisect.search(names(n), test)
        assert (res.status, res.first_bad, res.last_good) == ("found", str(k), str(k - 1))
        assert res.runs == len(calls) == len(set(calls)) <= bisect.max_runs(n) <= math.ceil(math.log2(n)) + 1


@given(n=st.integers(3, 40), data=st.data())
@example(n=8, data=None)  # the shape of the real bisect below: skip at the first midpoint
def test_skipped_versions(n, data):
    """With untestable versions the search still never names a wrong version: it is exact, or lists the suspects
    (which contain the true first bad version); each skip costs at most one extra run."""
    if data is None:
        k, skipped = 5, frozenset({3})
    else:
        k = data.draw(st.integers(1, n - 1), label="first_bad")
        skipped = frozenset(data.draw(st.sets(st.integers(1, n - 2), max_size=n // 2), label="skipped"))
    test, calls = oracle(k, skipped)
    res, outcomes = bisect.search(names(n), test)
    assert res.runs <= bisect.max_runs(n) + len(skipped & set(map(int, calls)))
    if res.status == "found":
        assert res.first_bad == str(k)
        assert outcomes[res.first_bad].verdict == bisect.BAD and outcomes[res.last_good].verdict == bisect.GOOD
    else:
        assert res.status == "ambiguous" and str(k) in res.suspects
        assert all(int(s) in skipped for s in res.suspects[:-1])         # only untestable versions are suspects


@pytest.mark.parametrize(("first_bad", "skipped", "status"), [
    (0, frozenset(), "good_fails"),           # the regression is older than --good
    (99, frozenset(), "bad_passes"),          # --bad does not fail
    (1, frozenset({0}), "good_untestable"),   # (every interior version bad: the answer rests on --good)
    (3, frozenset({3}), "bad_untestable"),    # (every interior version good: the answer rests on --bad)
])
def test_contradicting_or_untestable_endpoints_are_reported(first_bad, skipped, status):
    n = 4 if status != "good_untestable" else 3
    test, _calls = oracle(first_bad, skipped)
    res, _ = bisect.search(names(n), test)
    assert res.status == status and res.first_bad is None


def test_classify_cell_records():
    node = "tests/x.py::test_swap[qwen]"
    ok = cell("c", "pass", [check("swap", "pass", node_id=node), check("other", "fail", node_id="tests/x.py::test_o")])
    assert bisect.classify(ok, "swap").verdict == bisect.GOOD
    assert bisect.classify(ok, "tests/x.py::test_swap").verdict == bisect.GOOD      # node id without [params]
    assert bisect.classify(ok, node).verdict == bisect.GOOD                         # exact node id ([...] literal)
    assert bisect.classify(ok, "sw*").verdict == bisect.GOOD                        # name glob
    assert bisect.classify(ok, "tests/x.py::test_o").verdict == bisect.BAD
    xfail = cell("c", "pass", [check("swap", "xfail", node_id=node, message="known")])
    assert bisect.classify(xfail, "swap").verdict == bisect.BAD
    skipped = cell("c", "pass", [check("swap", "skip", node_id=node, message="needs transformers >= 5")])
    out = bisect.classify(skipped, "swap")
    assert out.verdict == bisect.SKIP and "needs transformers" in out.reason
    out = bisect.classify(ok, "nonexistent")
    assert out.verdict == bisect.SKIP and "no check matching it ran" in out.reason
    err = cell("c", "error", [], message="incompatible packages: import peft failed: ImportError: x")
    out = bisect.classify(err, "swap")
    assert out.verdict == bisect.SKIP and "import peft failed" in out.reason


def test_versions_between():
    versions = ["0.21.1", "0.21.2", "0.21.3rc1", "0.21.3", "0.21.4.dev0", "0.21.4", "0.22.0"]
    assert bisect.versions_between(versions, "0.21.2", "0.21.4", pre=False) == ["0.21.2", "0.21.3", "0.21.4"]
    assert bisect.versions_between(versions, "0.21.2", "0.21.4", pre=True) == [
        "0.21.2", "0.21.3rc1", "0.21.3", "0.21.4.dev0", "0.21.4"]
    with pytest.raises(MatrixError, match="--good 0.21.0: no such version"):
        bisect.versions_between(versions, "0.21.0", "0.21.4", pre=False)
    with pytest.raises(MatrixError, match="must be older"):
        bisect.versions_between(versions, "0.21.4", "0.21.2", pre=False)


# ----------------------------------------------------------------------------------------------- real cells

CHECK = "tests/oracles/test_peft_paramwrapper.py::test_swap_flag_shapes_and_detection[qwen3_moe-E4H8I6]"
SEQUENCE = [f"0.21.{i}" for i in range(3, 11)]    # n = 8 synthetic releases
FIRST_BAD, UNIMPORTABLE = "0.21.8", "0.21.6"


@pytest.mark.slow  # three or four cells (venv, import probe, one test): about a minute of CPU
def test_bisect_finds_the_injected_regression(tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from tests.harness.test_prerelease import MATRIX, SWAP_RULE, version_patch
    from tests.harness.wheelkit import Patch, environment_wheels, isolated_index_env, repack, write_index

    wheels = [w for w in environment_wheels(tmp_path / "files") if not w.name.startswith("peft-")]
    for v in SEQUENCE:
        patches = [version_patch(v)]
        if Version(v) >= Version(FIRST_BAD):
            patches.append(SWAP_RULE)
        if v == UNIMPORTABLE:
            patches = [Patch("peft/__init__.py", f'__version__ = "{peft.__version__}"',
                             f'__version__ = "{v}"\nraise ImportError("synthetic {v}: cannot import name LoraConfig")')]
        wheels.append(repack("peft", tmp_path / "files", version=v, patches=tuple(patches)))
    isolated_index_env(monkeypatch, write_index(tmp_path / "index", wheels).as_uri(), var="UV_INDEX_URL")
    (tmp_path / "m.toml").write_text(MATRIX)

    p = argparse.ArgumentParser()
    bisect.add_arguments(p)
    args = p.parse_args(["--package", "peft", "--good", SEQUENCE[0], "--bad", SEQUENCE[-1], "--check", CHECK,
                         "--matrix", str(tmp_path / "m.toml"), "--reports", str(tmp_path / "reports"),
                         "--envs-dir", str(tmp_path / "envs"), "--run-id", "b"])
    assert bisect.main(args) == 0
    rep = json.loads((tmp_path / "reports" / "runs" / "b" / "bisect.json").read_text())
    assert rep["versions"] == SEQUENCE
    assert (rep["status"], rep["first_bad"], rep["last_good"]) == ("found", FIRST_BAD, "0.21.7")
    assert rep["runs"] == len(rep["steps"]) <= math.ceil(math.log2(len(SEQUENCE))) + 1
    verdicts = {s["version"]: s["verdict"] for s in rep["steps"]}
    assert verdicts[UNIMPORTABLE] == "skip" and verdicts[FIRST_BAD] == "bad" and verdicts["0.21.7"] == "good"
    skip = next(s for s in rep["steps"] if s["version"] == UNIMPORTABLE)
    assert "cannot import name LoraConfig" in skip["reason"]
    (failure,) = rep["failures"]
    assert failure["node_id"] == CHECK and "peft_swaps" in failure["failure"]
    assert f"peft=={FIRST_BAD}" in rep["reproduce"] and CHECK in rep["reproduce"]
    md = (tmp_path / "reports" / "runs" / "b" / "bisect.md").read_text()
    assert f"## First bad: peft {FIRST_BAD} (last good: 0.21.7)" in md
