"""The cell runner: every failure mode of a cell becomes a status with its cause; other cells still run.

No network and no pip install: versions come from a fake source, and the "cell venv" is the running interpreter
(axis packages are pytest/hypothesis, which are installed there, plus a fake broken package on PYTHONPATH).
"""

from __future__ import annotations

import io
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import hypothesis
import pytest

from harness import envs
from harness.matrix import load_matrix
from harness.runner import Progress, RunOptions, run_cell, run_cells
from tests.harness.conftest import fake_source

TESTS = '''
import os, time
import pytest
if os.environ["MOE_COMPAT_CELL"].endswith("hempty"):
    pytest.skip("every test module of this cell skips at import", allow_module_level=True)
def test_ok(moe_check):
    moe_check.metric("x", 1.0)
    cell = os.environ["MOE_COMPAT_CELL"]
    if cell.endswith("hcrash"):
        os.kill(os.getpid(), 11)
    if cell.endswith("hhang"):
        time.sleep(60)
'''

MATRIX = '''
[matrix]
tests = ["{tests}"]
[[axis]]
package = "pytest"
prefix = "p"
values = [{{ id = "9", spec = "==9.*" }}]
[[axis]]
package = "hypothesis"
prefix = "h"
values = [{{ id = "ok", spec = "" }}, {{ id = "crash", spec = "" }}, {{ id = "hang", spec = "" }},
          {{ id = "future", spec = ">=99" }}, {{ id = "empty", spec = "" }}]
[[incompatible]]
cells = ["*-hok"]
reason = "declared incompatible but imports fine"
link = "https://example.invalid/stale"
'''


@dataclass(frozen=True)
class FakeEnv:
    """Stands in for envs.CellEnv: the running interpreter, an empty site-packages (so no torch dir)."""

    name: str
    path: Path

    @property
    def python(self) -> Path:
        return Path(sys.executable)

    @property
    def site_packages(self) -> Path:
        return self.path / "site-packages"


def fake_build(calls: list):
    def build(name, reqs, *, log, envs_dir, timeout):
        calls.append((name, list(reqs)))
        (envs_dir / name / "site-packages").mkdir(parents=True, exist_ok=True)
        return FakeEnv(name, envs_dir / name)
    return build


VERSIONS = {"pytest": ["8.4.0", pytest.__version__], "hypothesis": [hypothesis.__version__]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runner")
    (tmp / "test_cellwork.py").write_text(TESTS)
    (tmp / "m.toml").write_text(MATRIX.format(tests=tmp / "test_cellwork.py"))
    matrix = load_matrix(tmp / "m.toml")
    calls: list = []
    stream = io.StringIO()
    # hypothesis's pytest plugin would import (and, with PYTHONDONTWRITEBYTECODE, re-compile) hypothesis in every cell
    args = ("--rootdir", str(tmp), "-c", "/dev/null", "-p", "no:hypothesispytest")
    hang = [c for c in matrix.cells() if c.id.endswith("hhang")]
    rest = [c for c in matrix.cells() if not c.id.endswith("hhang")]

    def go(cells, timeout):
        return run_cells(matrix, cells, source=fake_source(VERSIONS), run_dir=tmp / "run",
                         opts=RunOptions(jobs=3, envs_dir=tmp / "envs", pytest_args=args, timeout_s=timeout),
                         build_env=fake_build(calls), progress=Progress(stream, heartbeat_s=0))

    # the hanging cell gets a short timeout, the others a generous one (a loaded 2-core box starts pytest slowly)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(go, hang, 12), pool.submit(go, rest, 300)]
        recs = [r for f in futures for r in f.result()]
    return {r["id"]: r for r in recs}, calls, stream.getvalue(), tmp


def test_crashing_cell_is_error_and_names_the_test(run):
    recs, _calls, _out, _tmp = run
    rec = recs["p9-hcrash"]
    assert rec["status"] == "error" and "SIGSEGV" in rec["message"] and "test_ok" in rec["message"]
    assert rec["log_tail"]                                              # the faulthandler dump / pytest output
    crashed = [c for c in rec["checks"] if c["status"] == "fail"]
    assert crashed and "SIGSEGV" in crashed[0]["message"]


def test_timed_out_cell_is_error(run):
    rec = run[0]["p9-hhang"]
    assert rec["status"] == "error" and "timed out after 12s" in rec["message"] and "test_ok" in rec["message"]


def test_other_cells_still_run_and_stale_incompatible_surfaces(run):
    rec = run[0]["p9-hok"]
    assert rec["status"] == "fail"                                      # only because of the stale entry
    stale = [c for c in rec["checks"] if c["name"] == "known_incompatible"]
    assert stale and stale[0]["status"] == "xpass"
    ok = [c for c in rec["checks"] if c["name"] == "ok"]
    assert ok[0]["status"] == "pass" and ok[0]["metrics"] == {"x": 1.0}
    assert rec["resolved"] == {"pytest": pytest.__version__, "hypothesis": hypothesis.__version__}
    assert rec["freeze"] and rec["venv_bytes"] is not None and rec["phases"].keys() >= {"resolve", "install", "test"}
    assert 0 < rec["phases"]["test_cpu"] < 60                          # CPU time of the pytest child alone
    assert (run[3] / "run" / "cells" / "p9-hok.json").exists()


def test_cell_that_collects_nothing_is_error(run):
    """A cell that tests nothing (pytest exit 5) is an `error`, not a silent `skipped` that passes the gate."""
    rec = run[0]["p9-hempty"]
    assert rec["status"] == "error" and rec["pytest_exit"] == 5
    assert rec["message"].startswith("no tests collected (pytest exit 5) in ") and "test_cellwork.py" in rec["message"]


def test_unreleased_cell_is_not_installed(run):
    recs, calls, out, _tmp = run
    rec = recs["p9-hfuture"]
    assert rec["status"] == "unreleased" and ">=99" in rec["message"]
    assert "p9-hfuture" not in [c[0] for c in calls]
    assert "p9-hfuture: UNRELEASED" in out and "p9-hcrash: test" in out        # progress lines


def test_install_failure_and_import_failure(tmp_path):
    pkg = tmp_path / "site"
    (pkg / "badpkg").mkdir(parents=True)
    (pkg / "badpkg" / "__init__.py").write_text("raise ImportError(\"cannot import name 'HybridCache'\")\n")
    (pkg / "badpkg-1.0.dist-info").mkdir()
    (pkg / "badpkg-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: badpkg\nVersion: 1.0\n")
    (tmp_path / "m.toml").write_text('[matrix]\ntests = ["nothing"]\n[[axis]]\npackage = "badpkg"\nprefix = "b"\n'
                                     'values = [{ id = "1", spec = "" }, { id = "2", spec = "" }]\n'
                                     '[[incompatible]]\ncells = ["b2"]\nreason = "HybridCache gone"\nlink = "L"\n')
    matrix = load_matrix(tmp_path / "m.toml")
    opts = RunOptions(envs_dir=tmp_path / "envs", env={"PYTHONPATH": str(pkg)})
    src = fake_source({"badpkg": ["1.0"]})
    quiet = Progress(io.StringIO(), heartbeat_s=0)
    undeclared, declared = run_cells(matrix, matrix.cells(), source=src, run_dir=tmp_path / "r", opts=opts,
                                     build_env=fake_build([]), progress=quiet)
    assert undeclared["status"] == "error" and "import badpkg failed" in undeclared["message"]
    assert "HybridCache" in undeclared["message"]
    assert declared["status"] == "skipped" and "known incompatible" in declared["message"]

    def broken(name, reqs, *, log, envs_dir, timeout):
        raise envs.EnvError("command failed (exit 1): pip install badpkg==1.0\nERROR: No matching distribution")

    rec = run_cell(matrix, matrix.cell("b1"), source=src, run_dir=tmp_path / "r", opts=opts, build_env=broken,
                   progress=quiet)
    assert rec["status"] == "error" and rec["message"].startswith("install failed") and "No matching" in rec["message"]
