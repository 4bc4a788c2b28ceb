"""Find the release that broke a check: binary search over the released versions of one package.

    python -m harness.cli bisect --package transformers --good 5.0.0 --bad 5.25.0 --check NAME_OR_NODE_ID
        [--cell t5.x-platest] [--matrix default] [--pre] [--tests ...] [--pytest-args "..."] [--quick]

The versions are the releases of the package on the configured index from ``--good`` to ``--bad`` (pre-releases
with ``--pre``). Each tested version is one cell: the base cell (``--cell``, default each axis's last value) with
that version of the package, its own cached venv (``.envs/cells/<id>``), running only the check: a node id is passed
to pytest as is; a check name runs the matrix's tests with ``-k NAME`` (unless ``--tests``/``--pytest-args`` say
otherwise). A version is

* ``bad`` when a check matching ``--check`` (name, node id, or node id without parameters) fails (``fail``, or
  ``xfail`` through a known-broken entry);
* ``good`` when every matching check passes (``pass``, ``finding``, ``xpass``);
* ``skip`` when it cannot say: the cell cannot be installed or imported (``error``, declared ``skipped``), or no
  matching check ran (not collected, skipped by the test). Like ``git bisect skip``, the search goes on with the
  other untested versions (each step tests the median of those between the last good and the first bad).

The endpoints are trusted while searching and tested only when the answer depends on them (the first bad version is
``--bad`` itself, or the last good one is ``--good``), so with n versions the search takes at most
ceil(log2(n - 1)) + 1 cell runs, plus one per skipped version. It ends with the first bad version, its failure text
and the command to reproduce, or says why it cannot (a ``--good`` that fails, a ``--bad`` that passes, only skipped
versions left between the last good and the first bad). The log goes to ``reports/runs/<run-id>/bisect.md`` and
``bisect.json``.

Exit code: 0 first bad version found; 1 inconclusive; 2 bad invocation (unknown version, check or cell).
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from packaging.version import InvalidVersion, Version

from harness import report
from harness.index import IndexConfig, IndexSource
from harness.matrix import AxisValue, MatrixError, load_matrix, vary
from harness.prerelease import (
    add_cell_arguments,
    base_cell,
    cell_options,
    failure_text,
    reproduce_command,
    source_text,
    write_outputs,
)
from harness.runner import Progress, run_cells

GOOD, BAD, SKIP = "good", "bad", "skip"
PASSED = ("pass", "finding", "xpass")
FAILED = ("fail", "xfail")


@dataclass(frozen=True)
class Outcome:
    verdict: str                      # good | bad | skip
    reason: str = ""
    failures: tuple[dict[str, Any], ...] = ()   # the failing check records (bad)
    record: dict[str, Any] | None = field(default=None, compare=False, repr=False)


@dataclass
class Step:
    version: str
    verdict: str
    reason: str
    cell: str | None = None
    duration_s: float = 0.0


@dataclass
class Result:
    """``status``: ``found`` (first_bad, last_good), ``ambiguous`` (first bad is one of ``suspects``), or
    ``good_fails`` / ``bad_passes`` / ``good_untestable`` / ``bad_untestable`` (an endpoint contradicts its mark or
    cannot be tested)."""

    status: str
    first_bad: str | None = None
    last_good: str | None = None
    suspects: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    message: str = ""

    @property
    def runs(self) -> int:
        return len(self.steps)


def max_runs(n: int) -> int:
    """Cell runs the search needs at most for ``n`` versions (endpoints included) when nothing is skipped."""
    return math.ceil(math.log2(n - 1)) + 1 if n > 2 else n


def search(versions: list[str], test: Callable[[str], Outcome],
           log: Callable[[str], None] = lambda _msg: None) -> tuple[Result, dict[str, Outcome]]:
    """Binary search for the first bad version in ``versions`` (oldest first; ``versions[0]`` marked good,
    ``versions[-1]`` marked bad). ``test`` runs one version. Returns the result and every outcome by version."""
    if len(versions) < 2:
        raise ValueError(f"need at least a good and a bad version, got {versions}")
    outcomes: dict[str, Outcome] = {}
    steps: list[Step] = []

    def run(i: int) -> Outcome:
        t0 = time.monotonic()
        o = test(versions[i])
        outcomes[versions[i]] = o
        cell = o.record["id"] if o.record else None
        steps.append(Step(versions[i], o.verdict, o.reason, cell, round(time.monotonic() - t0, 1)))
        log(f"run {len(steps)}: {versions[i]} is {o.verdict.upper()}" + (f" ({o.reason})" if o.reason else ""))
        return o

    lo, hi, skipped = 0, len(versions) - 1, set()
    while True:
        open_ = [i for i in range(lo + 1, hi) if i not in skipped]
        if not open_:
            break
        i = open_[(len(open_) - 1) // 2]  # the median untested version: skipped ones do not unbalance the halves
        log(f"{len(open_)} untested version(s) between {versions[lo]} (good) and {versions[hi]} (bad); "
            f"testing {versions[i]}")
        o = run(i)
        if o.verdict == GOOD:
            lo = i
        elif o.verdict == BAD:
            hi = i
        else:
            skipped.add(i)

    def result(status: str, message: str, **kw: Any) -> tuple[Result, dict[str, Outcome]]:
        return Result(status, steps=steps, message=message, **kw), outcomes

    # The answer rests on an endpoint the search never ran (the first bad is --bad itself, the last good is --good):
    # run it, and stop if it contradicts its mark or cannot be tested.
    contradicted = {BAD: ("bad_passes", "the bad version {v} passes the check: no regression in this range"),
                    GOOD: ("good_fails", "the good version {v} fails the check too: the regression is older than "
                                         "this range")}
    for i, want, role in ((hi, BAD, "bad"), (lo, GOOD, "good")):
        if versions[i] in outcomes:
            continue
        o = run(i)
        if o.verdict == SKIP:
            return result(f"{role}_untestable", f"the {role} version {versions[i]} cannot be tested: {o.reason}")
        if o.verdict != want:
            status, text = contradicted[want]
            return result(status, text.format(v=versions[i]))
    between = [versions[j] for j in range(lo + 1, hi)]
    if between:
        return result("ambiguous", f"only skipped versions left between {versions[lo]} (good) and {versions[hi]} "
                                   f"(bad): the first bad version is one of {', '.join([*between, versions[hi]])}",
                      last_good=versions[lo], suspects=[*between, versions[hi]])
    return result("found", f"first bad version: {versions[hi]} (last good: {versions[lo]})",
                  first_bad=versions[hi], last_good=versions[lo])


# ----------------------------------------------------------------------------------------------- cells

def matches(check: dict[str, Any], pattern: str) -> bool:
    """A check record matches ``pattern`` by name or node id (globs allowed; a node id without ``[params]``
    matches every parametrization)."""
    node, name = check.get("node_id") or "", check.get("name", "")
    if pattern in (node, name, node.split("[", 1)[0]):  # exact first: `[...]` of a node id is a glob class
        return True
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(node, pattern)


def classify(rec: dict[str, Any], pattern: str) -> Outcome:
    """The verdict of one cell record for the check ``pattern`` (see the module docstring)."""
    if rec["status"] not in ("pass", "fail"):
        first = (rec.get("message") or "").strip().splitlines()
        return Outcome(SKIP, f"cell {rec['status']}: {first[0][:300] if first else 'no message'}", record=rec)
    hits = [c for c in rec.get("checks", []) if matches(c, pattern)]
    failed = tuple(c for c in hits if c["status"] in FAILED)
    if failed:
        first = (failed[0].get("message") or "").strip().splitlines()
        return Outcome(BAD, f"{len(failed)} of {len(hits)} matching check(s) fail: "
                            f"{first[0][:200] if first else failed[0]['node_id']}", failed, rec)
    passed = [c for c in hits if c["status"] in PASSED]
    if not hits:
        return Outcome(SKIP, "no check matching it ran (not collected in this version?)", record=rec)
    if not passed:
        return Outcome(SKIP, f"every matching check was skipped: {(hits[0].get('message') or '')[:200]}", record=rec)
    return Outcome(GOOD, f"{len(passed)} matching check(s) pass", record=rec)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--package", required=True)
    p.add_argument("--good", required=True, help="a version where the check passes")
    p.add_argument("--bad", required=True, help="a later version where it fails")
    p.add_argument("--check", required=True, help="check name or pytest node id (globs allowed)")
    p.add_argument("--pre", action="store_true", help="include pre-releases between good and bad")
    add_cell_arguments(p)


def versions_between(all_versions: list[str], good: str, bad: str, *, pre: bool) -> list[str]:
    """Versions from ``good`` to ``bad`` (both included, oldest first); pre-releases only with ``pre``."""
    try:
        g, b = Version(good), Version(bad)
    except InvalidVersion as exc:
        raise MatrixError(f"--good/--bad: {exc}") from exc
    if g >= b:
        raise MatrixError(f"--good {good} must be older than --bad {bad}")
    parsed = sorted({Version(v) for v in all_versions})
    for name, v in (("good", g), ("bad", b)):
        if v not in parsed:
            near = [str(x) for x in parsed if abs(x.release[0] - v.release[0]) == 0][-8:]
            raise MatrixError(f"--{name} {v}: no such version on the index (nearby: {', '.join(near) or 'none'})")
    inside = [v for v in parsed if g <= v <= b and (pre or not (v.is_prerelease or v.is_devrelease) or v in (g, b))]
    return [str(v) for v in inside]


def render_markdown(rep: dict[str, Any]) -> str:
    lines = [f"# Bisect {rep['package']} {rep['good']} .. {rep['bad']} for `{rep['check']}` ({rep['run_id']})", "",
             f"Base cell `{rep['base_cell']}` of matrix `{rep['matrix']}`; {len(rep['versions'])} versions: "
             f"{', '.join(rep['versions'])}",
             f"Result: **{rep['status']}** — {rep['message']} ({rep['runs']} cell run(s); at most {rep['max_runs']} "
             f"without skips)", "", "| run | version | verdict | cell | time | reason |", "|---|---|---|---|---|---|"]
    for i, s in enumerate(rep["steps"], 1):
        lines.append(f"| {i} | {s['version']} | {s['verdict']} | `{s['cell']}` | {s['duration_s']:.0f}s | "
                     f"{report.md_escape(s['reason'])} |")
    if rep.get("first_bad"):
        lines += ["", f"## First bad: {rep['package']} {rep['first_bad']} (last good: {rep['last_good']})", "",
                  f"- **first bad**: {rep['first_bad_source']}", f"- **last good**: {rep['last_good_source']}"]
        for f in rep["failures"]:
            lines += ["", f"`{f['node_id']}`:", "", "```", f["failure"] or "(no message)", "```"]
        lines += ["", "Reproduce:", "", "```bash", rep["reproduce"], "```"]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    matrix = load_matrix(args.matrix)
    base = base_cell(matrix, args.cell)
    source = IndexSource(IndexConfig.from_environment())
    versions = versions_between(source(args.package), args.good, args.bad, pre=args.pre)
    opts = cell_options(args, jobs=1)
    node_like = "::" in args.check
    if opts.tests is None and node_like:
        opts.tests = (args.check,)  # pytest takes a node id (with or without [params]) as a path
    elif not node_like and not opts.pytest_args and not any(ch in args.check for ch in "*?["):
        opts.pytest_args = ("-k", args.check)  # a check name is its test function's name minus test_
    run_id = args.run_id or report.new_run_id(f"bisect-{args.package}")
    run_dir = args.reports / "runs" / run_id
    progress = Progress(heartbeat_s=0)
    t_start = time.monotonic()

    def say(msg: str) -> None:
        print(f"[bisect {time.monotonic() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    say(f"bisect {args.package}: {len(versions)} versions {versions[0]} (good) .. {versions[-1]} (bad) in base cell "
        f"{base.id}; check {args.check!r}; tests {' '.join(opts.tests or matrix.tests)} "
        f"{' '.join(opts.pytest_args)}; at most {max_runs(len(versions))} cell runs without skips")

    def test(version: str) -> Outcome:
        v = Version(version)
        value = AxisValue(args.package, version, f"=={version}", pre=v.is_prerelease or v.is_devrelease)
        m = vary(matrix, base, args.package, [value])
        (rec,) = run_cells(m, m.cells(), source=source, run_dir=run_dir, opts=opts, progress=progress)
        return classify(rec, args.check)

    t0 = time.monotonic()
    res, outcomes = search(versions, test, log=say)
    rep: dict[str, Any] = {
        "schema": 1, "run_id": run_id, "matrix": matrix.name, "base_cell": base.id, "package": args.package,
        "good": args.good, "bad": args.bad, "check": args.check, "versions": versions, "tests": list(opts.tests or
        matrix.tests), "pytest_args": list(opts.pytest_args), "index": source.describe(), **asdict(res),
        "runs": res.runs, "max_runs": max_runs(len(versions)), "wall_s": round(time.monotonic() - t0, 1),
        "exit_code": 0 if res.status == "found" else 1}
    if res.first_bad:
        bad, good = outcomes[res.first_bad], outcomes[res.last_good]
        rep["failures"] = [{"node_id": c["node_id"], "status": c["status"], "failure": failure_text(c)}
                           for c in bad.failures]
        rep["first_bad_source"] = source_text(bad.record, args.package)
        rep["last_good_source"] = source_text(good.record, args.package)
        rep["reproduce"] = reproduce_command(bad.record, bad.failures[0]["node_id"], opts.host)
    write_outputs(run_dir, "bisect", rep, render_markdown(rep))
    return rep["exit_code"]
