"""Command line of the matrix harness (the nox sessions call it; CI calls ``merge``).

    python -m harness.cli run   [--matrix default|extended|PATH] [--cells ID,ID] [--jobs 2] [--quick]
                                [--baseline summary.json] [--timeout S] [--install-timeout S] [--run-id ID]
                                [--reports DIR] [--tests PATH ...] [--pytest-args "..."] [--allow-empty]
    python -m harness.cli merge DIR_OR_CELL_JSON... [--out DIR] [--baseline summary.json] [--run-id ID]
                                [--matrix NAME] [--summary-to FILE]     (e.g. --summary-to "$GITHUB_STEP_SUMMARY")
    python -m harness.cli list  [--matrix NAME] [--resolve]

Exit codes: 0 gate passed; 1 gate failed (unexpected failure, error cell, nothing tested, or regression against the
baseline: a check that vanished counts unless a [[retired]] entry of the matrix declares it);
130 interrupted (Ctrl-C or SIGTERM: the running cells are killed);
2 bad invocation or unusable inputs (unknown or empty --cells, malformed matrix, unreadable baseline, bad
--timeout/--jobs/--run-id/--pytest-args/--tests, no cell files). Every input is checked before the first cell runs;
once cells ran, the report is written whatever happens after (a failure to write it is exit 2 naming the path).
"""

from __future__ import annotations

import argparse
import math
import shlex
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness import report
from harness.matrix import CachedSource, MatrixError, ResolveError, load_matrix, pypi_versions, resolve_cell
from harness.records import RecordError, id_problem
from harness.runner import ROOT, Progress, RunOptions, host_info, run_cells

REPORTS = ROOT / "reports"


class UsageError(ValueError):
    """A command-line value that cannot work (exit 2); the message names the flag."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _split(values: list[str] | None) -> list[str]:
    return [v for item in values or [] for v in item.replace(",", " ").split()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness.cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run matrix cells and write the merged report")
    run.add_argument("--matrix", default="default")
    run.add_argument("--cells", action="append", help="cell ids (comma separated or repeated); default: all")
    run.add_argument("--jobs", type=int, default=2, help="cells in parallel (default 2)")
    run.add_argument("--quick", action="store_true", help="pass --quick to pytest")
    run.add_argument("--baseline", type=Path, help="an earlier summary.json to diff against")
    run.add_argument("--timeout", type=float, help="test-phase timeout per cell in seconds (default: the matrix's)")
    run.add_argument("--install-timeout", type=float, help="install timeout per cell (default: the matrix's)")
    run.add_argument("--run-id")
    run.add_argument("--reports", type=Path, default=REPORTS, help="reports directory (default reports/)")
    run.add_argument("--tests", nargs="+", help="pytest paths instead of the matrix's `tests`")
    run.add_argument("--pytest-args", default="", help="extra pytest arguments, one shell-quoted string")
    run.add_argument("--allow-empty", action="store_true",
                     help="a run that tests nothing (e.g. its one cell is unreleased) passes the gate; for one-cell "
                          "CI jobs whose merge job gates the whole matrix")
    merge = sub.add_parser("merge", help="merge per-cell records (cells/<id>.json) into one report")
    merge.add_argument("inputs", nargs="+", type=Path)
    merge.add_argument("--out", type=Path, help="report directory (default reports/runs/<run-id>)")
    merge.add_argument("--baseline", type=Path)
    merge.add_argument("--run-id")
    merge.add_argument("--matrix", help="matrix name/path for cell order and [[retired]] (default: the cells' own)")
    merge.add_argument("--summary-to", type=Path, help="append summary.md to this file (e.g. $GITHUB_STEP_SUMMARY)")
    ls = sub.add_parser("list", help="list the cells of a matrix")
    ls.add_argument("--matrix", default="default")
    ls.add_argument("--resolve", action="store_true", help="also resolve the specs against PyPI")
    return p


# ----------------------------------------------------------------------------------------------- input checks

def _seconds(flag: str, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise UsageError(f"{flag} must be a finite number of seconds > 0, got {value}")
    return value


def _run_id(value: str | None) -> str | None:
    if value is not None and id_problem(value):
        raise UsageError(f"--run-id {id_problem(value)} (it names a directory under reports/runs/)")
    return value


def _pytest_args(text: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(text))
    except ValueError as exc:
        raise UsageError(f"--pytest-args {text!r}: {exc}") from exc


def _test_paths(paths: list[str] | None) -> tuple[str, ...] | None:
    """``--tests`` paths must exist (relative to the repository, where the cells run pytest)."""
    if paths is None:
        return None
    missing = [p for p in paths if not (ROOT / p.split("::", 1)[0]).exists()]
    if missing:
        raise UsageError(f"--tests: no such path(s) {missing} (relative to {ROOT})")
    return tuple(paths)


def _selected(all_ids: list[str], requested: list[str] | None, matrix_name: str) -> list[str] | None:
    """The ``--cells`` ids in matrix order; None when the flag was not given (every cell)."""
    if requested is None:
        return None
    wanted = _split(requested)
    if not wanted:
        raise UsageError(f"--cells {', '.join(map(repr, requested))} names no cell (an unset CI variable?); leave "
                         f"--cells out to run every cell of matrix {matrix_name}")
    missing = [w for w in wanted if w not in all_ids]
    if missing:
        raise MatrixError(f"unknown cell(s) {missing} in matrix {matrix_name}; cells: {', '.join(sorted(all_ids))}")
    return [c for c in all_ids if c in wanted]


def _summary_target(path: Path | None) -> Path | None:
    if path is not None and (path.is_dir() or not path.parent.is_dir()):
        raise UsageError(f"--summary-to {path}: not a file in an existing directory")
    return path


def _out_dir(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} exists and is not a directory; the report needs a directory")
    return path


# ----------------------------------------------------------------------------------------------- commands

def _finish(summary: dict, out_dir: Path, baseline: dict[str, Any] | None, baseline_path: Path | None,
            latest: Path | None, *, retired: tuple = (), allow_empty: bool = False,
            summary_to: Path | None = None) -> int:
    code = report.attach_gate(summary, baseline, str(baseline_path) if baseline_path else None, retired=retired,
                              allow_empty=allow_empty)
    paths = report.write_report(summary, out_dir, latest=latest)
    if summary_to is not None:
        with summary_to.open("a") as f:
            f.write(paths["md"].read_text())
    print_table(summary)
    print(f"report: {paths['md']}\n        {paths['html']}\n        {paths['json']}")
    gate = summary["gate"]
    print(f"gate: {'PASS' if code == 0 else 'FAIL'} (exit {code})" + "".join(f"\n  - {r}" for r in gate["reasons"])
          + "".join(f"\n  note: {n}" for n in gate["notes"]))
    return code


def print_table(summary: dict) -> None:
    """The final cells table for a person at a terminal."""
    rows = [("cell", "status", "checks", "time", "message")]
    for c in summary["cells"]:
        msg = (c.get("message") or "").strip().splitlines()
        rows.append((c["id"], c["status"], report.cell_counts(c), f"{c.get('duration_s', 0):.0f}s",
                     (msg[0][:90] if msg else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])


def cmd_run(args: argparse.Namespace) -> int:
    # Every input is checked here, before the first cell runs (a typo must not cost a whole matrix run).
    matrix = load_matrix(args.matrix)
    cells = matrix.cells()
    chosen = _selected([c.id for c in cells], args.cells, matrix.name)
    if chosen is not None:
        cells = [c for c in cells if c.id in chosen]
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    opts = RunOptions(quick=args.quick, jobs=args.jobs, timeout_s=_seconds("--timeout", args.timeout),
                      install_timeout_s=_seconds("--install-timeout", args.install_timeout),
                      pytest_args=_pytest_args(args.pytest_args), tests=_test_paths(args.tests))
    run_id = _run_id(args.run_id) or report.new_run_id(matrix.name)
    run_dir = _out_dir(_out_dir(args.reports) / "runs" / run_id)
    latest = args.reports / "latest"
    report.check_latest(latest)
    baseline = report.load_summary(args.baseline) if args.baseline else None

    opts.host = host_info()
    started = _now()
    print(f"matrix {matrix.name}: {len(cells)} cell(s), {opts.jobs} in parallel -> {run_dir}", flush=True)
    t0 = time.monotonic()
    records = run_cells(matrix, cells, source=CachedSource(pypi_versions), run_dir=run_dir, opts=opts,
                        progress=Progress())
    summary = report.build_summary(
        records, run_id=run_id, host=opts.host, started=started, finished=_now(),
        matrix={"name": matrix.name, "path": str(matrix.path), "description": matrix.description,
                "tests": list(opts.tests or matrix.tests)},
        options={"quick": opts.quick, "jobs": opts.jobs, "cells": [c.id for c in cells],
                 "tests": list(opts.tests) if opts.tests else None, "pytest_args": list(opts.pytest_args),
                 "allow_empty": args.allow_empty, "wall_s": round(time.monotonic() - t0, 1)})
    return _finish(summary, run_dir, baseline, args.baseline, latest, retired=matrix.retired,
                   allow_empty=args.allow_empty)


def cmd_merge(args: argparse.Namespace) -> int:
    summary_to = _summary_target(args.summary_to)
    run_id = _run_id(args.run_id)
    if args.out is not None:
        _out_dir(args.out)
    baseline = report.load_summary(args.baseline) if args.baseline else None
    cells = report.load_cells(args.inputs)
    names = {c.get("matrix") for c in cells}
    mname = args.matrix or (names.pop() if len(names) == 1 else None)
    order, meta, retired = None, {"name": mname or "mixed"}, ()
    if mname is not None:
        m = load_matrix(mname)
        order = [c.id for c in m.cells()]
        meta = {"name": m.name, "path": str(m.path), "description": m.description, "tests": list(m.tests)}
        retired = m.retired
    run_id = run_id or report.new_run_id(meta["name"]) + "-merged"
    out = args.out or REPORTS / "runs" / run_id
    latest = REPORTS / "latest" if args.out is None else None
    if latest is not None:
        report.check_latest(latest)
    summary = report.build_summary(report.order_cells(cells, order), run_id=run_id, matrix=meta, host=None,
                                   options={"merged_from": [str(p) for p in args.inputs],
                                            "cells": [c["id"] for c in cells]})
    return _finish(summary, out, baseline, args.baseline, latest, retired=retired, summary_to=summary_to)


def cmd_list(args: argparse.Namespace) -> int:
    matrix = load_matrix(args.matrix)
    source = CachedSource(pypi_versions)
    for cell in matrix.cells():
        sources = {p: (f"path {v.path}" if v.path else f"vcs {v.vcs}" if v.vcs else None)
                   for p, v in cell.axis_values.items()}
        line = f"{cell.id:20s} " + " ".join(f"{p}{s if s != 'latest' else ' latest'}" for p, s in cell.specs.items())
        line += "".join(f" {p} {text}" for p, text in sources.items() if text)
        if args.resolve:
            res = resolve_cell(cell, source)
            line += "  -> " + (" ".join(res.requirements()) if res.ok else "unreleased: "
                               + "; ".join(res.unreleased.values()))
        print(line)
    return 0


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # CI cancellation: clean up like Ctrl-C (runner.run_cells)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "run":
        signal.signal(signal.SIGTERM, _sigterm)
    try:
        return {"run": cmd_run, "merge": cmd_merge, "list": cmd_list}[args.cmd](args)
    except (MatrixError, report.ReportError, ResolveError, UsageError, RecordError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'Ctrl-C'}); no summary written for this run (the finished cells' records are "
              f"in the run directory's cells/: `python -m harness.cli merge` combines them)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
