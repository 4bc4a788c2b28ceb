"""Report: merge of per-cell files, baseline diff, gate exit codes, markdown content, HTML well-formedness."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness import cli, report
from harness.matrix import Retired
from tests.harness.conftest import cell, check

PLOT = {"title": "loss", "series": {"bf16": [3.0, 2.0, 1.0], "nf4": [3.1, 2.2, "NaN"]}, "x": None,
        "xlabel": "step", "ylabel": "loss"}


def _cells_dir(root: Path, *cells: dict) -> Path:
    (root / "cells").mkdir(parents=True)
    for c in cells:
        (root / "cells" / f"{c['id']}.json").write_text(json.dumps(c))
    return root


def _good():
    return [cell("t5.x-platest", "pass", [
        check("loss_parity", "finding", family="mixtral", variant="nf4", metrics={"rel": 0.02},
              threshold={"rel": {"op": "<=", "value": 0.05}}, plots=[PLOT], message="NF4 <within> 2% & fine"),
        check("oracle_peft_reload", "xfail", family="qwen3_moe", message="known broken: x"),
        check("impl_forward", "pass"),
    ]), cell("t4.58-platest", "unreleased", [], message="no release of transformers matches '==4.58.*'")]


def test_merge_from_separate_dirs_and_duplicates(tmp_path):
    a, b = _good()
    da = _cells_dir(tmp_path / "job-a", a)
    db = _cells_dir(tmp_path / "job-b", b)
    cells = report.load_cells([da, db])
    assert sorted(c["id"] for c in cells) == ["t4.58-platest", "t5.x-platest"]
    ordered = report.order_cells(cells, ["t4.58-platest", "t5.x-platest"])
    assert [c["id"] for c in ordered] == ["t4.58-platest", "t5.x-platest"]
    _cells_dir(tmp_path / "job-c", a)
    with pytest.raises(report.ReportError, match="appears twice"):
        report.load_cells([da, tmp_path / "job-c"])
    with pytest.raises(report.ReportError, match="no cell records"):
        report.load_cells([tmp_path / "empty"] if (tmp_path / "empty").mkdir() is None else [])


def test_gate_and_baseline_diff():
    base = report.build_summary(_good(), run_id="base", matrix={"name": "default"}, host=None)
    assert report.attach_gate(base) == 0 and base["gate"]["reasons"] == []
    now_cells = _good()
    now_cells[0]["checks"][2]["status"] = "fail"                 # pass -> fail: regression
    now_cells[0]["checks"].append(check("new_check", "fail"))     # new failure
    now = report.build_summary(now_cells, run_id="now", matrix={"name": "default"}, host=None)
    assert report.attach_gate(now, base, "b.json") == 1
    b = now["baseline"]
    assert [(d["check"], d["was"], d["now"]) for d in b["regressions"]] == [("impl_forward", "pass", "fail")]
    assert [d["check"] for d in b["new_failures"]] == ["new_check"]
    assert any("regression" in r for r in now["gate"]["reasons"])
    # the reverse direction is a fix; `new_check` vanished: a regression (issue 12) unless declared [[retired]]
    again = report.build_summary(_good(), run_id="again", matrix={"name": "default"}, host=None)
    assert report.attach_gate(again, now) == 1
    assert [(d["check"], d["was"], d["now"]) for d in again["baseline"]["regressions"]] == [("new_check", "fail",
                                                                                              "absent")]
    assert report.attach_gate(again, now, retired=[Retired(checks=("new_check",), reason="merged into x")]) == 0
    assert {d["check"] for d in again["baseline"]["fixes"]} == {"impl_forward"}
    assert [(d["check"], d["message"]) for d in again["baseline"]["removed"]] == [("new_check", "retired: merged into x")]


def test_error_cell_and_xpass_fail_the_gate():
    cells = _good()
    cells[0]["checks"][1]["status"] = "xpass"
    s = report.build_summary(cells, run_id="r", matrix={"name": "m"}, host=None)
    assert report.attach_gate(s) == 1
    base = report.build_summary(_good(), run_id="b", matrix={"name": "m"}, host=None)
    err = _good()
    err[0].update(status="error", checks=[], message="test phase crashed (SIGSEGV)", log_tail="Fatal Python error")
    s2 = report.build_summary(err, run_id="r2", matrix={"name": "m"}, host=None)
    assert report.attach_gate(s2, base) == 1
    assert [d["check"] for d in s2["baseline"]["regressions"]] == ["(cell)"]
    assert "SIGSEGV" in report.render_markdown(s2) and "Fatal Python error" in report.render_html(s2)


def test_markdown_prints_thresholds_next_to_values():
    s = report.build_summary(_good(), run_id="r", matrix={"name": "default"}, host={"python": "3.11"})
    report.attach_gate(s)
    md = report.render_markdown(s)
    assert "| loss_parity [mixtral] [nf4] | 🔎 finding<br>rel=0.02 (≤ 0.05) |" in md
    assert "## Findings (1)" in md and "NF4 <within> 2% & fine" in md
    assert "`t4.58-platest` **unreleased**" in md and "**Gate: PASS** (exit 0)" in md
    # notable rows (worst first) before the collapsed pass/skip-only rows
    assert md.index("oracle_peft_reload [qwen3_moe]") < md.index("<details><summary>1 checks") < md.index("impl_forward")
    assert md.index("loss_parity [mixtral]") < md.index("oracle_peft_reload [qwen3_moe]")   # finding before xfail


def test_headline_prefers_the_broken_threshold():
    k = check("x", "fail", metrics={"bytes": 7.0, "ratio": 3.2, "err": 0.1},
              threshold={"err": {"op": "<=", "value": 0.5}, "ratio": {"op": ">=", "value": 3.5}})
    assert report.headline(k) == "ratio=3.2 (≥ 3.5)"
    assert report.headline(check("y", "pass", metrics={"bytes": 7.0})) == "bytes=7"


def test_html_is_well_formed_self_contained_with_svg_plots():
    cells = _good()
    cells[0]["checks"].append(check("x<&>\"'", "fail", message="<script>alert(1)</script>"))
    s = report.build_summary(cells, run_id="r<1>", matrix={"name": "default"}, host=None)
    report.attach_gate(s)
    page = report.render_html(s)
    assert page.startswith("<!DOCTYPE html>")
    root = ET.fromstring(page.split("\n", 1)[1])                  # strict XML parse: every tag closed, escaped
    assert root.tag == "html"
    assert "<script" not in page and not re.search(r"(src|href)=\"https?:", page)
    svgs = root.findall(".//{http://www.w3.org/2000/svg}svg")
    assert len(svgs) == 1 and len(svgs[0].findall("{http://www.w3.org/2000/svg}polyline")) == 2


def test_cli_merge_exit_codes(tmp_path, capsys):
    d = _cells_dir(tmp_path / "in", *_good())
    out = tmp_path / "out"
    summary_md = tmp_path / "step_summary.md"
    assert cli.main(["merge", str(d), "--out", str(out), "--run-id", "m1", "--summary-to", str(summary_md)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["run_id"] == "m1" and [c["id"] for c in s["cells"]][0] == "t4.58-platest"   # default matrix order
    assert {"run_id", "started", "finished", "matrix", "host", "cells", "gate", "totals"} <= s.keys()
    assert (out / "index.html").exists() and "moe-compat matrix report" in summary_md.read_text()
    bad = _good()
    bad[0]["checks"][2]["status"] = "fail"
    d2 = _cells_dir(tmp_path / "in2", *bad)
    assert cli.main(["merge", str(d2), "--out", str(tmp_path / "o2"), "--baseline", str(out / "summary.json")]) == 1
    assert "regression" in capsys.readouterr().out
    assert cli.main(["merge", str(tmp_path / "missing")]) == 2
