"""Fault cases of the harness (issue 12): every bad input ends in a named error (exit 2 for the CLI, no cell run),
an `error` cell or a failed gate, or a correct result; never a traceback, never a silent wrong result, and the
inputs (and the repository's sources) are byte-identical afterwards.

`CASES` is the table of docs/FAULTS.md's "## Harness" section (``test_faults_md_lists_every_case`` keeps the two in
step; print the rows with ``python -c "from tests.harness.test_faults import faults_table; print(faults_table())"``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
from pathlib import Path

import pytest

from harness import cli, report, runner
from harness.matrix import Known, MatrixError, Resolution, Retired, load_matrix, resolve_spec
from harness.records import RecordError, check_record, validate_cell
from harness.runner import Progress, RunOptions, read_results, run_cells, same_version
from tests.harness.conftest import cell, check, fake_source

ROOT = Path(__file__).resolve().parents[2]
MODULE = "tests/harness/test_faults.py"

# (id, test function, input / fault, expected outcome). One row per case; each id is a parametrized test below.
CASES: list[tuple[str, str, str, str]] = []


def case(cid: str, fault: str, outcome: str, test: str) -> str:
    """Register a case; ``test`` is a function of this module parametrized by ``cid``, or a full node id."""
    CASES.append((cid, test if "::" in test else f"{MODULE}::{test}[{cid}]", fault, outcome))
    return cid


def faults_table() -> str:
    rows = ["| id | input / fault | expected outcome | test |", "|---|---|---|---|"]
    rows += [f"| {cid} | {fault} | {outcome} | `{node}` |" for cid, node, fault, outcome in CASES]
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------- invariants


def _digest(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


def _sources() -> list[Path]:
    code = [p for p in sorted((ROOT / "harness").rglob("*")) if "__pycache__" not in p.parts]
    return [*code, *sorted((ROOT / "matrices").glob("*.toml"))]


class _Inputs:
    """A case's input directory; ``freeze`` snapshots it once written."""

    def __init__(self, path: Path):
        self.path = path
        self.state = {"sources": _digest(_sources())}

    def write(self, name: str, text: str | bytes) -> Path:
        p = self.path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return p

    def freeze(self) -> None:
        """Snapshot the inputs (call after writing them, before the action)."""
        self.state["inputs"] = _digest(sorted(self.path.rglob("*")))


@pytest.fixture
def inputs(tmp_path: Path):
    """The case's inputs; after the case, they and the repository's sources (harness/, matrices/) must be
    byte-identical to what they were before the action."""
    d = tmp_path / "in"
    d.mkdir()
    box = _Inputs(d)
    yield box
    assert "inputs" in box.state, "the case never froze its inputs"
    assert _digest(sorted(d.rglob("*"))) == box.state["inputs"]
    assert _digest(_sources()) == box.state["sources"]


def _exit2(argv: list[str], capsys, needle: str) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert needle in err, err
    return err


@pytest.fixture
def no_cells(monkeypatch):
    """Any cell run is a failure of the case: inputs must be refused before the first cell."""

    def refuse(*args, **kwargs):
        raise AssertionError("a cell ran although the inputs were invalid")

    monkeypatch.setattr(cli, "run_cells", refuse)


def _summary_json(cells: list[dict]) -> str:
    s = report.build_summary(cells, run_id="base", matrix={"name": "default"}, host=None)
    report.attach_gate(s)
    return json.dumps(s)


GOOD_CELL = cell("t5.x-platest", "pass", [check("impl_forward", "pass")])

# ----------------------------------------------------------------------------------------------- CLI `run` inputs

RUN_INPUTS = {
    case(
        "run-cells-empty",
        '`run --cells ""` (an unset CI variable)',
        "exit 2 naming --cells; no cell runs",
        "test_run_input_refused",
    ): (["--cells", ""], "--cells '' names no cell"),
    case("run-cells-separators-only", '`run --cells " , "`', "exit 2 naming --cells", "test_run_input_refused"): (
        ["--cells", " , "],
        "names no cell",
    ),
    case(
        "run-cells-unknown",
        "`run --cells t9.9-p0.0`",
        "exit 2 `unknown cell(s)` listing the cells",
        "test_run_input_refused",
    ): (["--cells", "t9.9-p0.0"], "unknown cell(s) ['t9.9-p0.0']"),
    case(
        "run-matrix-missing",
        "`run --matrix nosuch`",
        "exit 2 naming the file and the matrices that exist",
        "test_run_input_refused",
    ): (["--matrix", "nosuch"], "nosuch.toml does not exist"),
    case("run-timeout-zero", "`run --timeout 0`", "exit 2 naming --timeout", "test_run_input_refused"): (
        ["--timeout", "0"],
        "--timeout must be a finite number of seconds > 0",
    ),
    case("run-timeout-nan", "`run --timeout nan`", "exit 2 naming --timeout", "test_run_input_refused"): (
        ["--timeout", "nan"],
        "--timeout must be",
    ),
    case(
        "run-timeout-inf",
        "`run --timeout inf` (a cell that hangs would never end)",
        "exit 2 naming --timeout",
        "test_run_input_refused",
    ): (["--timeout", "inf"], "--timeout must be"),
    case(
        "run-install-timeout-negative",
        "`run --install-timeout -5`",
        "exit 2 naming --install-timeout",
        "test_run_input_refused",
    ): (["--install-timeout", "-5"], "--install-timeout must be"),
    case("run-jobs-zero", "`run --jobs 0`", "exit 2 naming --jobs", "test_run_input_refused"): (
        ["--jobs", "0"],
        "--jobs must be >= 1",
    ),
    case(
        "run-pytest-args-unbalanced",
        "`run --pytest-args '-k \"reload'` (unbalanced quote)",
        "exit 2 naming --pytest-args and the shlex error",
        "test_run_input_refused",
    ): (["--pytest-args", '-k "reload'], "No closing quotation"),
    case(
        "run-tests-missing",
        "`run --tests tests/nope` (a typo: pytest would exit 4 in every cell)",
        "exit 2 naming the missing path",
        "test_run_input_refused",
    ): (["--tests", "tests/nope"], "--tests: no such path(s) ['tests/nope']"),
    case(
        "run-run-id-path",
        "`run --run-id ../escape` (path-like run id)",
        "exit 2 naming --run-id",
        "test_run_input_refused",
    ): (["--run-id", "../escape"], "--run-id '../escape' may hold only"),
    case(
        "run-baseline-missing",
        "`run --baseline missing.json`",
        "exit 2 before any cell runs, naming the file",
        "test_run_input_refused",
    ): (["--baseline", "{in}/missing.json"], "cannot read it as JSON"),
}


@pytest.mark.parametrize("cid", list(RUN_INPUTS))
def test_run_input_refused(cid, inputs, no_cells, capsys, tmp_path):
    argv, needle = RUN_INPUTS[cid]
    inputs.freeze()
    argv = [a.replace("{in}", str(inputs.path)) for a in argv]
    _exit2(["run", "--reports", str(tmp_path / "out"), *argv], capsys, needle)
    assert not (tmp_path / "out" / "runs").exists()


BASELINES = {
    case(
        "baseline-not-json",
        "`--baseline` file holding `{not json`",
        "exit 2 `cannot read it as JSON`, no cell runs",
        "test_run_baseline_refused_before_cells",
    ): (b"{not json", "cannot read it as JSON"),
    case(
        "baseline-not-a-summary",
        "`--baseline` file holding `[]`",
        "exit 2 `not a summary.json`",
        "test_run_baseline_refused_before_cells",
    ): (b"[]", "not a summary.json"),
    case(
        "baseline-bad-cell-status",
        'baseline cell with `status = "great"`',
        "exit 2 naming `cells[0].status`",
        "test_run_baseline_refused_before_cells",
    ): ({"status": "great"}, "cells[0].status: 'great' is not one of"),
    case(
        "baseline-check-without-status",
        "baseline check record without `status`",
        "exit 2 naming `cells[0]: checks[0]: missing key `status``",
        "test_run_baseline_refused_before_cells",
    ): ({"checks": [{"name": "x", "node_id": "n"}]}, "cells[0]: checks[0]: missing key `status`"),
    case(
        "baseline-checks-not-list",
        'baseline cell with `checks = "x"`',
        "exit 2 naming `cells[0].checks`",
        "test_run_baseline_refused_before_cells",
    ): ({"checks": "x"}, "cells[0].checks: expected list"),
    case(
        "baseline-duplicate-cell",
        "baseline listing one cell twice",
        "exit 2 `appears twice`",
        "test_run_baseline_refused_before_cells",
    ): ("dup", "appears twice"),
    case(
        "baseline-schema-unknown",
        "baseline with `schema = 99`",
        "exit 2 naming the schema",
        "test_run_baseline_refused_before_cells",
    ): ({"schema": 99}, "schema 99 is not readable"),
    case(
        "baseline-truncated-gz",
        "`--baseline summary.json.gz` cut short",
        "exit 2 `cannot read it as JSON`",
        "test_run_baseline_refused_before_cells",
    ): ("gz", "cannot read it as JSON"),
}


@pytest.mark.parametrize("cid", list(BASELINES))
def test_run_baseline_refused_before_cells(cid, inputs, no_cells, capsys, tmp_path):
    spec, needle = BASELINES[cid]
    name = "base.json"
    if isinstance(spec, bytes):
        data = spec
    elif spec == "dup":
        data = _summary_json([GOOD_CELL, GOOD_CELL]).encode()
    elif spec == "gz":
        name, data = "base.json.gz", gzip.compress(_summary_json([GOOD_CELL]).encode())[:40]
    elif "schema" in spec:
        data = json.dumps({**json.loads(_summary_json([GOOD_CELL])), **spec}).encode()
    else:
        data = json.dumps({"cells": [{**GOOD_CELL, **spec}]}).encode()
    base = inputs.write(name, data)
    inputs.freeze()
    _exit2(["run", "--reports", str(tmp_path / "out"), "--baseline", str(base)], capsys, needle)


case(
    "run-latest-is-dir",
    "`reports/latest` is a real directory",
    "exit 2 naming it, before any cell runs",
    "test_run_outputs_refused_before_cells_case",
)
case(
    "run-reports-is-file",
    "`run --reports FILE`",
    "exit 2 `exists and is not a directory`",
    "test_run_outputs_refused_before_cells_case",
)


@pytest.mark.parametrize("cid", ["run-latest-is-dir", "run-reports-is-file"])
def test_run_outputs_refused_before_cells_case(cid, inputs, no_cells, capsys, tmp_path):
    if cid == "run-latest-is-dir":
        (tmp_path / "out" / "latest").mkdir(parents=True)
        inputs.freeze()
        _exit2(["run", "--reports", str(tmp_path / "out")], capsys, "latest exists and is not a symlink")
    else:
        afile = inputs.write("reports-file", "x")
        inputs.freeze()
        _exit2(["run", "--reports", str(afile)], capsys, "exists and is not a directory")


# ----------------------------------------------------------------------------------------------- gate via `run`


def _fake_run(records: list[dict], side_effect=None):
    def run(matrix, cells, **kwargs):
        if side_effect is not None:
            side_effect()
        return records

    return run


def _unreleased(cid: str) -> dict:
    return cell(cid, "unreleased", [], message="no release of transformers matches '==4.58.*'")


GATE_RUNS = {
    case(
        "gate-all-unreleased",
        "`run --cells t4.58-p0.18` (its only cell is unreleased)",
        "exit 1, gate reason `nothing was tested`",
        "test_run_gate",
    ): (["--cells", "t4.58-p0.18"], [_unreleased("t4.58-p0.18")], 1, "nothing was tested"),
    case(
        "gate-every-check-skipped",
        "every check of the run is `skip` (e.g. `-m slow` under --quick)",
        "exit 1, gate reason `nothing was tested`",
        "test_run_gate",
    ): (
        ["--cells", "t5.x-platest"],
        [cell("t5.x-platest", "pass", [check("a", "skip"), check("b", "skip")])],
        1,
        "nothing was tested: no check ran a test (2 check(s)",
    ),
    case(
        "gate-nomatch-error-cells",
        '`--pytest-args "-k nomatch"`: every cell collects nothing',
        "each cell `error` (no tests collected), exit 1",
        "test_run_gate",
    ): (
        ["--cells", "t5.x-platest"],
        [cell("t5.x-platest", "error", [], message="no tests collected (pytest exit 5)")],
        1,
        "1 cell(s) in error: t5.x-platest",
    ),
    case(
        "gate-allow-empty",
        "`run --allow-empty` whose only cell is unreleased (a one-cell CI job)",
        "exit 0, `gate.notes` says nothing was tested (allowed)",
        "test_run_gate",
    ): (["--cells", "t4.58-p0.18", "--allow-empty"], [_unreleased("t4.58-p0.18")], 0, "allowed by --allow-empty"),
}


@pytest.mark.parametrize("cid", list(GATE_RUNS))
def test_run_gate(cid, inputs, monkeypatch, capsys, tmp_path):
    argv, records, code, needle = GATE_RUNS[cid]
    monkeypatch.setattr(cli, "run_cells", _fake_run(records))
    inputs.freeze()
    assert cli.main(["run", "--reports", str(tmp_path / "out"), "--run-id", "r", *argv]) == code
    out = capsys.readouterr().out
    assert needle in out and "Traceback" not in out
    s = json.loads((tmp_path / "out" / "runs" / "r" / "summary.json").read_text())
    assert s["gate"]["exit_code"] == code
    assert any(needle in r for r in s["gate"]["reasons"] + s["gate"]["notes"])
    assert needle in (tmp_path / "out" / "runs" / "r" / "summary.md").read_text()


case(
    "report-write-fails-after-cells",
    "`reports/latest` turns into a directory while the cells run",
    "exit 2 naming both paths; summary.json/md/html of the run are written",
    "test_report_written_after_cells",
)


@pytest.mark.parametrize("cid", ["report-write-fails-after-cells"])
def test_report_written_after_cells(cid, inputs, monkeypatch, capsys, tmp_path):
    out = tmp_path / "out"
    monkeypatch.setattr(cli, "run_cells", _fake_run([GOOD_CELL], lambda: (out / "latest").mkdir(parents=True)))
    inputs.freeze()
    err = _exit2(
        ["run", "--reports", str(out), "--run-id", "r", "--cells", "t5.x-platest"], capsys, "could not point at it"
    )
    assert str(out / "runs" / "r") in err
    assert {p.name for p in (out / "runs" / "r").iterdir()} >= {"summary.json", "summary.md", "index.html"}


# ----------------------------------------------------------------------------------------------- baseline comparison


def _diff(now_cells, base_cells, **kw):
    base = json.loads(_summary_json(base_cells))
    now = report.build_summary(now_cells, run_id="now", matrix={"name": "default"}, host=None)
    code = report.attach_gate(now, base, "base.json", **kw)
    return code, now


TWO = [check("a", "pass"), check("b", "pass")]

COMPARISONS = {
    case(
        "baseline-vanished-check",
        "a check of the baseline is absent now (test deleted or renamed)",
        "exit 1: regression `b: pass → absent`",
        "test_baseline_comparison",
    ): ([cell("c1", "pass", TWO[:1])], [cell("c1", "pass", TWO)], {}, 1, ("regressions", "b", "absent")),
    case(
        "baseline-vanished-failing-check",
        "a *failing* check of the baseline is absent now (deleted to go green)",
        "exit 1: regression `b: fail → absent`",
        "test_baseline_comparison",
    ): (
        [cell("c1", "pass", TWO[:1])],
        [cell("c1", "fail", [TWO[0], check("b", "fail")])],
        {},
        1,
        ("regressions", "b", "absent"),
    ),
    case(
        "baseline-vanished-retired",
        "the vanished check matches a `[[retired]]` entry",
        "exit 0: listed under `removed` with the reason",
        "test_baseline_comparison",
    ): (
        [cell("c1", "pass", TWO[:1])],
        [cell("c1", "pass", TWO)],
        {"retired": [Retired(checks=("b",), reason="merged into a")]},
        0,
        ("removed", "b", "absent"),
    ),
    case(
        "baseline-missing-cell",
        "the baseline has a cell this run did not select (`--cells` narrowed it)",
        "exit 0: `missing_cells`, its checks not counted as vanished",
        "test_baseline_comparison",
    ): (
        [cell("c1", "pass", TWO)],
        [cell("c1", "pass", TWO), cell("c2", "pass", TWO)],
        {},
        0,
        ("missing_cells", "c2", None),
    ),
    case(
        "baseline-cell-now-unreleased",
        "a cell that ran in the baseline is `unreleased` now (release yanked)",
        "exit 1: regression `(cell): pass → unreleased`",
        "test_baseline_comparison",
    ): (
        [cell("c1", "pass", TWO), _unreleased("c2")],
        [cell("c1", "pass", TWO), cell("c2", "pass", TWO)],
        {},
        1,
        ("regressions", "(cell)", "unreleased"),
    ),
    case(
        "baseline-cell-now-declared-skipped",
        "a cell that ran is `skipped` now by a declared [[incompatible]]",
        "exit 0: `removed` `(cell)` with the cell's reason",
        "test_baseline_comparison",
    ): (
        [cell("c1", "pass", TWO), cell("c2", "skipped", [], message="known incompatible")],
        [cell("c1", "pass", TWO), cell("c2", "pass", TWO)],
        {},
        0,
        ("removed", "(cell)", "skipped"),
    ),
    case(
        "baseline-error-cell-hides-no-checks",
        "a cell errors now (its checks are gone)",
        "exit 1: one `(cell)` regression, its checks not double-counted",
        "test_baseline_comparison",
    ): (
        [cell("c1", "error", [], message="crashed")],
        [cell("c1", "pass", TWO)],
        {},
        1,
        ("regressions", "(cell)", "error"),
    ),
    case(
        "baseline-added-check",
        "a check that is new in this run and passes",
        "exit 0: listed under `added`",
        "test_baseline_comparison",
    ): ([cell("c1", "pass", [*TWO, check("c", "pass")])], [cell("c1", "pass", TWO)], {}, 0, ("added", "c", "pass")),
    case(
        "baseline-retired-unused",
        "a `[[retired]]` entry that matches no vanished check",
        "exit 0: listed under `retired_unused` (stale)",
        "test_baseline_comparison",
    ): (
        [cell("c1", "pass", TWO)],
        [cell("c1", "pass", TWO)],
        {"retired": [Retired(checks=("zzz",), reason="stale")]},
        0,
        ("retired_unused", None, None),
    ),
}


@pytest.mark.parametrize("cid", list(COMPARISONS))
def test_baseline_comparison(cid, inputs):
    inputs.freeze()
    now_cells, base_cells, kw, code, (bucket, what, now) = COMPARISONS[cid]
    got, summary = _diff(now_cells, base_cells, **kw)
    assert got == code, summary["gate"]
    items = summary["baseline"][bucket]
    assert len(items) == 1, summary["baseline"]
    if bucket == "missing_cells":
        assert items[0]["cell"] == what and any(what in n for n in summary["gate"]["notes"])
    elif what is not None:
        assert (items[0]["check"], items[0]["now"]) == (what, now)
    others = {k: v for k, v in summary["baseline"].items() if k not in (bucket, "path", "run_id") and v}
    assert not others, others
    md = report.render_markdown(summary)
    assert "Traceback" not in md and (code == 0) == ("**Gate: PASS**" in md)


case(
    "baseline-different-selection",
    "`--baseline` of a full run compared with a `-k` run",
    "exit 1 (vanished checks) with a hint naming both selections",
    "test_baseline_selection_hint",
)


@pytest.mark.parametrize("cid", ["baseline-different-selection"])
def test_baseline_selection_hint(cid, inputs):
    inputs.freeze()
    base = json.loads(_summary_json([cell("c1", "pass", TWO)]))
    now = report.build_summary(
        [cell("c1", "pass", TWO[:1])],
        run_id="now",
        matrix={"name": "default"},
        host=None,
        options={"pytest_args": ["-k", "a"]},
    )
    assert report.attach_gate(now, base) == 1
    assert "the baseline ran" in now["gate"]["reasons"][0] and "'-k', 'a'" in now["gate"]["reasons"][0]


case(
    "gate-no-cells",
    "a summary with no cells at all",
    "exit 1: `nothing was tested: the run has no cells`",
    "test_gate_without_cells",
)


@pytest.mark.parametrize("cid", ["gate-no-cells"])
def test_gate_without_cells(cid, inputs):
    inputs.freeze()
    s = report.build_summary([], run_id="r", matrix={"name": "m"}, host=None)
    assert report.attach_gate(s) == 1 and s["gate"]["reasons"] == ["nothing was tested: the run has no cells"]


# ----------------------------------------------------------------------------------------------- `merge` inputs

MERGES = {
    case(
        "merge-cell-checks-not-list",
        'cell file with `checks = "x"`',
        "exit 2 naming the file and `.checks`",
        "test_merge_input_refused",
    ): ({"checks": "x"}, ".checks: expected list"),
    case(
        "merge-cell-path-id",
        'cell file with `id = "../x"`',
        "exit 2 naming the file and `.id`",
        "test_merge_input_refused",
    ): ({"id": "../x"}, ".id: '../x' may hold only"),
    case(
        "merge-check-unknown-status",
        'check record with `status = "ok"`',
        "exit 2 naming `checks[0].status`",
        "test_merge_input_refused",
    ): ({"checks": [{**check("a", "pass"), "status": "ok"}]}, "checks[0].status: 'ok' is not one of"),
    case(
        "merge-cell-unknown-key",
        "cell file with a misspelt key `stauts`",
        "exit 2 `unknown key(s) ['stauts']`",
        "test_merge_input_refused",
    ): ({"stauts": "pass"}, "unknown key(s) ['stauts']"),
    case(
        "merge-check-bad-threshold",
        'check threshold `{op: "=<"}`',
        "exit 2 naming `threshold.x`",
        "test_merge_input_refused",
    ): ({"checks": [check("a", "pass", threshold={"x": {"op": "=<", "value": 1}})]}, "threshold.x"),
    case(
        "merge-cell-not-json", "cell file cut mid-write", "exit 2 `cannot read it as JSON`", "test_merge_input_refused"
    ): ("cut", "cannot read it as JSON"),
    case(
        "merge-summary-to-missing-dir",
        "`merge --summary-to /no/such/dir/f`",
        "exit 2 naming --summary-to; nothing written",
        "test_merge_input_refused",
    ): ("summary-to", "--summary-to"),
    case(
        "merge-out-is-file", "`merge --out FILE`", "exit 2 `exists and is not a directory`", "test_merge_input_refused"
    ): ("out-file", "exists and is not a directory"),
    case(
        "merge-baseline-malformed",
        "`merge --baseline` of a non-summary",
        "exit 2 `not a summary.json`",
        "test_merge_input_refused",
    ): ("baseline", "not a summary.json"),
    case("merge-run-id-path", "`merge --run-id a/b`", "exit 2 naming --run-id", "test_merge_input_refused"): (
        "run-id",
        "--run-id 'a/b'",
    ),
}


@pytest.mark.parametrize("cid", list(MERGES))
def test_merge_input_refused(cid, inputs, capsys, tmp_path):
    spec, needle = MERGES[cid]
    out = tmp_path / "out"
    extra: list[str] = []
    if isinstance(spec, dict):
        inputs.write("cells/x.json", json.dumps({**GOOD_CELL, **spec}))
    else:
        good = inputs.write("cells/t5.x-platest.json", json.dumps(GOOD_CELL))
        if spec == "cut":
            inputs.write("cells/y.json", json.dumps(GOOD_CELL)[:50])
        elif spec == "summary-to":
            extra = ["--summary-to", str(tmp_path / "no" / "such" / "f.md")]
        elif spec == "out-file":
            out = good
        elif spec == "baseline":
            extra = ["--baseline", str(inputs.write("b.json", "{}"))]
        elif spec == "run-id":
            extra = ["--run-id", "a/b"]
    inputs.freeze()
    _exit2(["merge", str(inputs.path), "--out", str(out), *extra], capsys, needle)
    assert not (tmp_path / "out" / "summary.json").exists()


# ----------------------------------------------------------------------------------------------- matrix files

AXIS = '[[axis]]\npackage = "transformers"\nprefix = "t"\nvalues = [{ id = "a", spec = "" }]\n'

MATRICES = {
    case(
        "matrix-axis-empty", "`values = []`", "MatrixError `axis[0].values: must not be empty`", "test_matrix_refused"
    ): ('[[axis]]\npackage = "transformers"\nvalues = []\n', "axis[0].values: must not be empty"),
    case(
        "matrix-axis-values-string",
        '`values = "5.0"` (a string where a list is expected)',
        "MatrixError `axis[0].values: expected an array of tables`",
        "test_matrix_refused",
    ): ('[[axis]]\npackage = "transformers"\nvalues = "5.0"\n', "axis[0].values: expected an array of tables"),
    case(
        "matrix-axis-no-values",
        "an axis without `values`",
        "MatrixError `axis[0].values: required`",
        "test_matrix_refused",
    ): ('[[axis]]\npackage = "transformers"\n', "axis[0].values: required"),
    case("matrix-no-axis", "a file without [[axis]]", "MatrixError `no [[axis]]`", "test_matrix_refused"): (
        '[matrix]\nname = "x"\n',
        "no [[axis]]",
    ),
    case(
        "matrix-axis-as-table",
        "`[axis]` instead of `[[axis]]`",
        "MatrixError `axis: expected an array of [[tables]]`",
        "test_matrix_refused",
    ): ('[axis]\npackage = "transformers"\n', "axis: expected an array of [[tables]]"),
    case(
        "matrix-tests-string",
        '`tests = "tests/impl"`',
        "MatrixError `matrix.tests: expected a list of strings`",
        "test_matrix_refused",
    ): (AXIS + '[matrix]\ntests = "tests/impl"\n', "matrix.tests: expected a list of strings"),
    case(
        "matrix-tests-empty",
        "`tests = []` (pytest would run its default test paths)",
        "MatrixError `matrix.tests: must not be an empty list`",
        "test_matrix_refused",
    ): (AXIS + "[matrix]\ntests = []\n", "matrix.tests: must not be an empty list"),
    case(
        "matrix-unknown-key",
        "`timout_s = 5` in [matrix] (typo)",
        "MatrixError `matrix: unknown key(s) ['timout_s']`",
        "test_matrix_refused",
    ): (AXIS + "[matrix]\ntimout_s = 5\n", "matrix: unknown key(s) ['timout_s']"),
    case(
        "matrix-value-unknown-key",
        "axis value with `spce` (typo)",
        "MatrixError `axis[0].values[0]: unknown key(s) ['spce']`",
        "test_matrix_refused",
    ): (
        '[[axis]]\npackage = "transformers"\nvalues = [{ id = "a", spce = "" }]\n',
        "axis[0].values[0]: unknown key(s) ['spce']",
    ),
    case(
        "matrix-known-unknown-key",
        "[[known]] with `famlies` (typo: would apply to every family)",
        "MatrixError `known[0]: unknown key(s) ['famlies']`",
        "test_matrix_refused",
    ): (
        AXIS + '[[known]]\nchecks = ["x"]\nreason = "r"\nlink = "l"\ncells = ["*"]\nfamlies = ["q"]\n',
        "known[0]: unknown key(s) ['famlies']",
    ),
    case(
        "matrix-top-level-unknown",
        "a `[[subjects]]` table this harness does not know",
        "MatrixError `unknown top-level keys ['subjects']`",
        "test_matrix_refused",
    ): (AXIS + '[[subjects]]\nname = "x"\n', "unknown top-level keys ['subjects']"),
    case(
        "matrix-timeout-zero",
        "`timeout_s = 0`",
        "MatrixError `matrix.timeout_s: must be a finite number > 0`",
        "test_matrix_refused",
    ): (AXIS + "[matrix]\ntimeout_s = 0\n", "matrix.timeout_s: must be a finite number > 0"),
    case(
        "matrix-timeout-string",
        '`timeout_s = "30"`',
        "MatrixError `matrix.timeout_s: expected a number of seconds`",
        "test_matrix_refused",
    ): (AXIS + '[matrix]\ntimeout_s = "30"\n', "matrix.timeout_s: expected a number"),
    case(
        "matrix-install-timeout-negative",
        "`install_timeout_s = -1`",
        "MatrixError naming `matrix.install_timeout_s`",
        "test_matrix_refused",
    ): (AXIS + "[matrix]\ninstall_timeout_s = -1\n", "matrix.install_timeout_s: must be"),
    case(
        "matrix-duplicate-cell-ids",
        "axes whose cross product gives one id twice (`ta-pb-px`)",
        "MatrixError `two cells have the id 'ta-pb-px'`",
        "test_matrix_refused",
    ): (
        '[[axis]]\npackage = "transformers"\nprefix = "t"\nvalues = [{ id = "a", spec = "" }, { id = "a-pb", spec = "" }]\n'
        '[[axis]]\npackage = "peft"\nprefix = "p"\nvalues = [{ id = "b-px", spec = "" }, { id = "x", spec = "" }]\n',
        "two cells have the id 'ta-pb-px'",
    ),
    case(
        "matrix-duplicate-value-id",
        'one axis lists `id = "a"` twice',
        "MatrixError `duplicate id 'a'`",
        "test_matrix_refused",
    ): (
        '[[axis]]\npackage = "t"\nvalues = [{ id = "a", spec = "" }, { id = "a", spec = "" }]\n',
        "axis[0].values[1].id: duplicate id 'a'",
    ),
    case(
        "matrix-id-path-like", '`id = "a/b"`', "MatrixError `axis[0].values[0].id: ... no '/'`", "test_matrix_refused"
    ): (
        '[[axis]]\npackage = "transformers"\nvalues = [{ id = "a/b", spec = "" }]\n',
        "axis[0].values[0].id: 'a/b' may hold only",
    ),
    case("matrix-id-space", '`id = "5 x"`', "MatrixError naming `.id`", "test_matrix_refused"): (
        '[[axis]]\npackage = "transformers"\nvalues = [{ id = "5 x", spec = "" }]\n',
        "values[0].id: '5 x' may hold only",
    ),
    case("matrix-id-empty", '`id = ""`', "MatrixError `id: must not be empty`", "test_matrix_refused"): (
        '[[axis]]\npackage = "transformers"\nvalues = [{ id = "", spec = "" }]\n',
        "values[0].id: must not be empty",
    ),
    case(
        "matrix-id-number", "`id = 4.57` (a TOML float)", "MatrixError `id: expected a string`", "test_matrix_refused"
    ): ('[[axis]]\npackage = "transformers"\nvalues = [{ id = 4.57, spec = "" }]\n', "values[0].id: expected a string"),
    case(
        "matrix-spec-and-path",
        "axis value with both `spec` and `path`",
        "MatrixError `needs exactly one of spec, path, vcs`",
        "test_matrix_refused",
    ): (
        '[[axis]]\npackage = "transformers"\nvalues = [{ id = "a", spec = "", path = "x" }]\n',
        "needs exactly one of spec, path, vcs, got spec, path",
    ),
    case(
        "matrix-no-source",
        "axis value with only `id`",
        "MatrixError `needs exactly one of spec, path, vcs, got none`",
        "test_matrix_refused",
    ): ('[[axis]]\npackage = "transformers"\nvalues = [{ id = "a" }]\n', "got none"),
    case(
        "matrix-pre-with-path",
        "`pre = true` on a `path` value",
        "MatrixError `pre: only together with `spec``",
        "test_matrix_refused",
    ): (
        '[[axis]]\npackage = "transformers"\nvalues = [{ id = "a", path = "w.whl", pre = true }]\n',
        "values[0].pre: only together with `spec`",
    ),
    case("matrix-pre-not-bool", '`pre = "yes"`', "MatrixError `pre: expected true or false`", "test_matrix_refused"): (
        '[[axis]]\npackage = "transformers"\nvalues = [{ id = "a", spec = "", pre = "yes" }]\n',
        "values[0].pre: expected true or false",
    ),
    case(
        "matrix-vcs-not-git",
        '`vcs = "https://github.com/x/y"`',
        "MatrixError `vcs: expected git+https://...@ref`",
        "test_matrix_refused",
    ): (
        '[[axis]]\npackage = "transformers"\nvalues = [{ id = "a", vcs = "https://github.com/x/y" }]\n',
        "values[0].vcs: expected git+https://",
    ),
    case(
        "matrix-spec-invalid",
        '`spec = "5.0"` (not a specifier)',
        "MatrixError `invalid version spec '5.0'`",
        "test_matrix_refused",
    ): (
        '[[axis]]\npackage = "transformers"\nvalues = [{ id = "a", spec = "5.0" }]\n',
        "values[0].spec: invalid version spec '5.0'",
    ),
    case(
        "matrix-known-bad-regex",
        '[[known]] `match = "("` (would crash the plugin in every cell)',
        "MatrixError `known[0].match: invalid regular expression`",
        "test_matrix_refused",
    ): (
        AXIS + '[[known]]\nchecks = ["x"]\nreason = "r"\nlink = "l"\ncells = ["*"]\nmatch = "("\n',
        "known[0].match: invalid regular expression",
    ),
    case(
        "matrix-when-not-string",
        "`when = { peft = 19 }`",
        "MatrixError `known[0].when.peft: expected a version spec string`",
        "test_matrix_refused",
    ): (
        AXIS + '[[known]]\nchecks = ["x"]\nreason = "r"\nlink = "l"\nwhen = { peft = 19 }\n',
        "known[0].when.peft: expected a version spec string",
    ),
    case(
        "matrix-known-when-empty",
        "[[known]] with `when = {}` and no `cells`",
        "MatrixError `known[0].when: must not be an empty table`",
        "test_matrix_refused",
    ): (
        AXIS + '[[known]]\nchecks = ["x"]\nreason = "r"\nlink = "l"\nwhen = {}\n',
        "known[0].when: must not be an empty table",
    ),
    case(
        "matrix-torch-package",
        '`[packages] torch = "==2.9.*"`',
        "MatrixError `packages.torch: torch cannot be pinned per cell`",
        "test_matrix_refused",
    ): (AXIS + '[packages]\ntorch = "==2.9.*"\n', "packages.torch: torch cannot be pinned"),
    case(
        "matrix-torch-axis",
        '`[[axis]] package = "torch"`',
        "MatrixError `axis[0].package: torch cannot be pinned per cell`",
        "test_matrix_refused",
    ): ('[[axis]]\npackage = "torch"\nvalues = [{ id = "a", spec = "" }]\n', "axis[0].package: torch cannot be pinned"),
    case(
        "matrix-package-bad-name",
        '`[packages] "transformers[torch]" = ""`',
        "MatrixError `is not a package name`",
        "test_matrix_refused",
    ): (AXIS + '[packages]\n"transformers[torch]" = ""\n', "'transformers[torch]' is not a package name"),
    case(
        "matrix-duplicate-prefix",
        "two axes with prefix `t`",
        "MatrixError `axis[1].prefix: 't' is already the prefix`",
        "test_matrix_refused",
    ): (
        AXIS + '[[axis]]\npackage = "tokenizers"\nprefix = "t"\nvalues = [{ id = "b", spec = "" }]\n',
        "axis[1].prefix: 't' is already the prefix of the transformers axis",
    ),
    case(
        "matrix-pin-empty-cells",
        "[[pin]] with `cells = []` (pins nothing, silently)",
        "MatrixError `pin[0].cells: must not be an empty list`",
        "test_matrix_refused",
    ): (AXIS + '[[pin]]\ncells = []\npackages = { accelerate = "==1.0" }\n', "pin[0].cells: must not be an empty list"),
    case(
        "matrix-retired-no-reason",
        "[[retired]] without `reason`",
        "MatrixError `retired[0].reason: required`",
        "test_matrix_refused",
    ): (AXIS + '[[retired]]\nchecks = ["x"]\n', "retired[0].reason: required"),
    case(
        "matrix-extends-missing",
        '`extends = "nosuch"`',
        "MatrixError `matrix.extends = 'nosuch': ... does not exist`",
        "test_matrix_refused",
    ): (AXIS + '[matrix]\nextends = "nosuch"\n', "matrix.extends = 'nosuch'"),
    case(
        "matrix-toml-syntax",
        "a TOML syntax error",
        "MatrixError naming the file, line and column",
        "test_matrix_refused",
    ): ("[[axis]\n", "line 1"),
}


@pytest.mark.parametrize("cid", list(MATRICES))
def test_matrix_refused(cid, inputs, capsys):
    body, needle = MATRICES[cid]
    path = inputs.write("m.toml", body)
    inputs.freeze()
    with pytest.raises(MatrixError) as exc:
        load_matrix(path)
    assert str(path) in str(exc.value) and needle in str(exc.value), str(exc.value)
    _exit2(["list", "--matrix", str(path)], capsys, needle)  # the CLI: exit 2, same message


case(
    "matrix-axis-value-grammar",
    "axis values using every key: id, spec + pre, path, vcs, note",
    "loads: `AxisValue` carries pre/path/vcs; specs hold only the `spec` values",
    "test_matrix_axis_value_grammar",
)


@pytest.mark.parametrize("cid", ["matrix-axis-value-grammar"])
def test_matrix_axis_value_grammar(cid, inputs):
    path = inputs.write(
        "m.toml",
        '[[axis]]\npackage = "transformers"\nprefix = "t"\nvalues = [\n'
        '  { id = "5.x+pre", spec = "==5.*", pre = true, note = "n" },\n'
        '  { id = "local", path = "/wheels/transformers-5.25.0-py3-none-any.whl" },\n'
        '  { id = "main", vcs = "git+https://github.com/huggingface/transformers@main" },\n]\n',
    )
    inputs.freeze()
    m = load_matrix(path)
    pre, local, main = m.axes[0][2]
    assert (pre.spec, pre.pre, pre.note, pre.path, pre.vcs) == ("==5.*", True, "n", None, None)
    assert (local.spec, local.path) == (None, "/wheels/transformers-5.25.0-py3-none-any.whl")
    assert main.vcs == "git+https://github.com/huggingface/transformers@main"
    cells = {c.id: c for c in m.cells()}
    assert cells["t5.x+pre"].specs == {"transformers": "==5.*"} and cells["tlocal"].specs == {}
    assert cells["tmain"].axis_values["transformers"] is main


# ----------------------------------------------------------------------------------------------- runner

case(
    "runner-collects-nothing",
    "a cell whose test modules all skip at import (or `-k nomatch`): pytest exit 5",
    "the cell is `error` `no tests collected` (was `skipped`, which passed the gate)",
    "tests/harness/test_runner.py::test_cell_that_collects_nothing_is_error",
)
case(
    "runner-malformed-check-line",
    "a results-stream line that is JSON but not a check record",
    "a `fail` check `malformed_check_record` naming the line and key",
    "test_runner_fault",
)
case(
    "runner-cut-line",
    "a results-stream line cut by a crash mid-write",
    "skipped; the finished checks are kept",
    "test_runner_fault",
)
case(
    "runner-corrupt-probe-cache",
    "a reused venv's `.moe-compat-probe.json` cut mid-write",
    "treated as a cache miss (the probe runs again)",
    "test_runner_fault",
)
case(
    "runner-version-spelling",
    "installed `5.0` for resolved `5.0.0`",
    "same version (no false `error`)",
    "test_runner_fault",
)
case(
    "runner-harness-exception",
    "an unforeseen exception in one cell (PermissionError building its venv)",
    "that cell `error` naming the exception; the other cells still run",
    "test_runner_fault",
)
case(
    "runner-axis-unresolved",
    "a resolution that leaves an axis package unpinned (e.g. a `path` value)",
    "the cell is `error` naming the package, nothing installed",
    "test_runner_fault",
)


@pytest.mark.parametrize(
    "cid",
    [
        "runner-malformed-check-line",
        "runner-cut-line",
        "runner-corrupt-probe-cache",
        "runner-version-spelling",
        "runner-harness-exception",
        "runner-axis-unresolved",
    ],
)
def test_runner_fault(cid, inputs, tmp_path, monkeypatch):
    if cid in ("runner-malformed-check-line", "runner-cut-line"):
        good = json.dumps({"event": "check", **check_record(name="a", status="pass", node_id="t::a")})
        bad = (
            json.dumps({"event": "check", "name": "b", "status": "pass", "metrics": []})
            if cid == "runner-malformed-check-line"
            else good[:30]
        )
        stream = inputs.write(
            "r.jsonl", "\n".join([json.dumps({"event": "start", "node_id": "t::a"}), good, bad]) + "\n"
        )
        inputs.freeze()
        checks, _session, running, _fin = read_results(stream)
        assert running is None and checks[0]["name"] == "a"
        if cid == "runner-cut-line":
            assert len(checks) == 1
        else:
            assert checks[1]["status"] == "fail" and checks[1]["name"] == "malformed_check_record"
            assert "r.jsonl:3.metrics: expected dict" in checks[1]["message"]
    elif cid == "runner-corrupt-probe-cache":
        probe = inputs.write("probe.json", '{"key": "k", "probe": {"vers')
        inputs.freeze()
        assert runner._cached_probe(probe, "k") is None
        whole = inputs.write("probe2.json", json.dumps({"key": "k", "probe": {"versions": {}, "import_errors": {}}}))
        inputs.freeze()
        assert runner._cached_probe(whole, "k") == {"versions": {}, "import_errors": {}}
        assert runner._cached_probe(whole, "other") is None
    elif cid == "runner-version-spelling":
        inputs.freeze()
        assert same_version("5.0", "5.0.0") and same_version("1.0-1", "1.0.post1")
        assert not same_version("5.0.1", "5.0.0") and not same_version(None, "5.0.0")
    else:
        matrix_file = inputs.write(
            "m.toml",
            '[[axis]]\npackage = "pytest"\nprefix = "p"\nvalues = [{ id = "1", spec = "" },'
            ' { id = "2", spec = ">=999" }]\n',
        )
        inputs.freeze()
        matrix = load_matrix(matrix_file)

        def broken(name, reqs, *, log, envs_dir, timeout):
            raise PermissionError(13, "Permission denied", str(envs_dir / name))

        if cid == "runner-axis-unresolved":
            monkeypatch.setattr(runner, "resolve_cell", lambda c, s: Resolution({}, {}))
        recs = run_cells(
            matrix,
            matrix.cells(),
            source=fake_source({"pytest": [pytest.__version__]}),
            run_dir=tmp_path / "run",
            opts=RunOptions(envs_dir=tmp_path / "envs"),
            build_env=broken,
            progress=Progress(io.StringIO(), heartbeat_s=0),
        )
        by = {r["id"]: r for r in recs}
        if cid == "runner-harness-exception":
            assert by["p1"]["status"] == "error" and "PermissionError" in by["p1"]["message"]
            assert by["p2"]["status"] == "unreleased"  # the other cell still ran
            assert "Traceback" in (tmp_path / "run" / "logs" / "p1.log").read_text()
        else:
            assert (
                by["p1"]["status"] == "error" and "axis package(s) ['pytest'] were not resolved" in by["p1"]["message"]
            )
        for r in recs:
            validate_cell(json.loads((tmp_path / "run" / "cells" / f"{r['id']}.json").read_text()), r["id"])


# ----------------------------------------------------------------------------------------------- versions

case(
    "version-order-minor",
    "releases 5.9.0 and 5.24.0 for `==5.*`",
    "5.24.0 (ordered as versions, not strings)",
    "test_versions_are_ordered_as_versions",
)
case(
    "version-order-micro",
    "releases 4.57.9 and 4.57.10 for `==4.57.*`",
    "4.57.10",
    "test_versions_are_ordered_as_versions",
)
case(
    "version-known-when",
    '`when = {transformers = ">=4.57.10"}` with 4.57.9 and 4.57.10 installed',
    "applies to 4.57.10 only",
    "test_versions_are_ordered_as_versions",
)
case(
    "version-cell-order",
    "merge without a matrix of cells t5.24-*, t5.9-*, t4.57-*",
    "t4.57, t5.9, t5.24 (numbers in ids ordered as numbers)",
    "test_versions_are_ordered_as_versions",
)


@pytest.mark.parametrize(
    "cid", ["version-order-minor", "version-order-micro", "version-known-when", "version-cell-order"]
)
def test_versions_are_ordered_as_versions(cid, inputs):
    inputs.freeze()
    if cid == "version-order-minor":
        assert resolve_spec("==5.*", ["5.24.0", "5.9.0"]) == "5.24.0" == resolve_spec("==5.*", ["5.9.0", "5.24.0"])
        assert "5.9.0" > "5.24.0"  # what a string comparison would have picked
    elif cid == "version-order-micro":
        assert (
            resolve_spec("==4.57.*", ["4.57.10", "4.57.9"])
            == "4.57.10"
            == resolve_spec("==4.57.*", ["4.57.9", "4.57.10"])
        )
        assert resolve_spec("<4.57.10", ["4.57.9", "4.57.10"]) == "4.57.9"
    elif cid == "version-known-when":
        k = Known(checks=("x",), reason="r", link="l", when=(("transformers", ">=4.57.10"),))
        assert k.applies_to_cell("c", {"transformers": "4.57.10"}) and not k.applies_to_cell(
            "c", {"transformers": "4.57.9"}
        )
    else:
        ids = ["t5.24-p0.18", "t5.9-p0.18", "t4.57-p0.18", "t5.9-p0.9", "t5.9-p0.10"]
        ordered = [c["id"] for c in report.order_cells([cell(i, "pass", []) for i in ids], None)]
        assert ordered == ["t4.57-p0.18", "t5.9-p0.9", "t5.9-p0.10", "t5.9-p0.18", "t5.24-p0.18"]


# ----------------------------------------------------------------------------------------------- records

case(
    "record-unknown-status",
    '`check_record(status="passed")` in the plugin',
    "RecordError naming `status`",
    "test_record_construction_refused",
)
case(
    "record-mistyped-field",
    "`check_record(metrics=[1])`",
    "RecordError `check.metrics: expected dict`",
    "test_record_construction_refused",
)


@pytest.mark.parametrize("cid", ["record-unknown-status", "record-mistyped-field"])
def test_record_construction_refused(cid, inputs):
    inputs.freeze()
    kwargs = {"status": "passed"} if cid == "record-unknown-status" else {"status": "pass", "metrics": [1]}
    with pytest.raises(RecordError, match=r"check\.status: 'passed'|check\.metrics: expected dict"):
        check_record(name="a", **kwargs)


# ----------------------------------------------------------------------------------------------- the table


def test_faults_md_lists_every_case():
    """docs/FAULTS.md's Harness section is this module's table, row for row, and every case id is a test."""
    text = (ROOT / "docs" / "FAULTS.md").read_text()
    section = text.split("## Harness", 1)[1].split("\n## ", 1)[0]
    assert faults_table() in section, "regenerate the table: see this module's docstring"
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 20
    assert all(re.fullmatch(r"[a-z0-9-]+", i) for i in ids)
