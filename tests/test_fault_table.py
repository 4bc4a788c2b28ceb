"""docs/FAULTS.md lists only test node ids that exist: every id in its tables is collected by pytest (one
``--collect-only`` run over the files the table names), and the table keeps its size and unique row ids."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAULTS_MD = REPO / "docs" / "FAULTS.md"
_ROW = re.compile(r"^\| *(?P<id>[A-Za-z0-9-]+) *\|.*\| *`(?P<node>tests/[^`]+::[^`]+)` *\|\s*$")


def _rows() -> list[tuple[str, str]]:
    return [(m["id"], m["node"]) for line in FAULTS_MD.read_text().splitlines() if (m := _ROW.match(line))]


def _collected(files: list[str]) -> set[str]:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "harness.pytest_plugin", "--collect-only",
           "-q", *files]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {line.strip() for line in proc.stdout.splitlines() if "::" in line}


def test_every_fault_row_names_a_collected_test():
    rows = _rows()
    ids = [i for i, _ in rows]
    assert len(ids) == len(set(ids)), "duplicate row ids in docs/FAULTS.md"
    merge_rows = [i for i in ids if re.fullmatch(r"M\d+", i)]
    assert len(merge_rows) >= 45, f"the merge/loader section lists {len(merge_rows)} cases, issue 12 wants >= 45"
    nodes = {node for _, node in rows}
    collected = _collected(sorted({n.split("::")[0] for n in nodes}))
    missing = sorted(nodes - collected)
    assert not missing, f"docs/FAULTS.md names tests that do not exist: {missing}"


def test_row_parser_sees_every_table_line():
    """A row the parser skips (a typo in the backticks, say) would escape the check above: every table body line
    must parse."""
    body = [line for line in FAULTS_MD.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| id ") and not line.startswith("|---")]  # fmt: skip
    assert body and all(_ROW.match(line) for line in body), [line for line in body if not _ROW.match(line)][:3]
