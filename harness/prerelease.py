"""Pre-release regression reports: an upstream candidate against its newest release, before the candidate ships.

For each package (default: every axis package of the matrix) the *candidate* is the newest pre-release on the
configured index when it is newer than the newest final release, or what ``--candidate PKG=VALUE`` names:

* ``pre``: the newest pre-release (the default);
* a PEP 440 spec, pre-releases allowed (``==5.26.0rc1``, ``>=0.22.0rc0``);
* a local wheel, sdist or source tree (a path: relative to the repository root or absolute);
* a VCS reference ``git+https://host/repo@ref`` (resolved once to its commit, which the cell installs).

The release and each candidate run as cells of the matrix that differ only in that package: every other package
as in the base cell (``--cell``, default each axis's last value, e.g. ``t5.x-platest``), same tests, same known
entries. The report lists, per candidate, the checks that pass on the release and fail on the candidate (with the
failure text and the minimal command to reproduce), checks that ran on the release but not on the candidate, and
fixes; it goes to ``reports/runs/<run-id>/prerelease.md`` and ``prerelease.json``, next to the usual summary.json /
summary.md / index.html of the cells (summary.json carries each cell's resolved versions and exact sources).

Exit code: 0 when no candidate regresses (including "no pre-release newer than the newest release"), 1 when a
candidate regresses (a check fails that passed on the release, a new check fails, or a check that ran on the release
does not run on the candidate) or a cell of the comparison errors, 2 for a bad invocation or an unreachable index.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from packaging.version import Version

from harness import records, report
from harness.index import PYPI, IndexConfig, IndexSource
from harness.matrix import (
    AxisValue,
    CellSpec,
    Matrix,
    MatrixError,
    load_matrix,
    newest_cell,
    resolve_spec,
    resolve_value,
    vary,
)
from harness.runner import CELLS_ENVS_DIR, ROOT, Progress, RunOptions, host_info, run_cells

REPORTS = ROOT / "reports"
FAILURE_CHARS = 3000  # of a check's message + traceback tail in the report (a GitHub issue stays readable)


# ----------------------------------------------------------------------------------------------- shared with bisect

def cell_options(args: argparse.Namespace, *, jobs: int) -> RunOptions:
    """RunOptions from the common flags (--tests, --pytest-args, --quick, --timeout)."""
    return RunOptions(quick=args.quick, jobs=jobs, timeout_s=args.timeout, envs_dir=args.envs_dir,
                      pytest_args=tuple(shlex.split(args.pytest_args)),
                      tests=tuple(args.tests) if args.tests else None, host=host_info())


def add_cell_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--matrix", default="default")
    p.add_argument("--cell", help="base cell: every package not compared is as in this cell (default: each axis's "
                                  "last value)")
    p.add_argument("--tests", nargs="+", help="pytest paths or node ids instead of the matrix's `tests`")
    p.add_argument("--pytest-args", default="", help="extra pytest arguments, one shell-quoted string")
    p.add_argument("--quick", action="store_true", help="pass --quick to pytest")
    p.add_argument("--timeout", type=float, help="test-phase timeout per cell in seconds (default: the matrix's)")
    p.add_argument("--run-id")
    p.add_argument("--reports", type=Path, default=REPORTS, help="reports directory (default reports/)")
    p.add_argument("--envs-dir", type=Path, default=CELLS_ENVS_DIR, help="cell venvs (default .envs/cells)")


def base_cell(matrix: Matrix, cell_id: str | None) -> CellSpec:
    return matrix.cell(cell_id) if cell_id else newest_cell(matrix)


def failure_text(check: dict[str, Any], limit: int = FAILURE_CHARS) -> str:
    """The check's message and the end of its traceback, at most ``limit`` characters (the end is kept)."""
    text = "\n".join(t for t in (check.get("message", "").strip(), check.get("details", "").strip()) if t)
    return text if len(text) <= limit else "…" + text[-limit:]


def write_outputs(run_dir: Path, stem: str, rep: dict[str, Any], md: str) -> None:
    """``run_dir/<stem>.json`` and ``.md``; the markdown also goes to stdout."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"{stem}.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
    (run_dir / f"{stem}.md").write_text(md)
    sys.stdout.write(md)
    print(f"report: {run_dir / f'{stem}.md'}\n        {run_dir / f'{stem}.json'}", flush=True)


def install_lines(rec: dict[str, Any], host: dict[str, Any]) -> list[str]:
    """Shell lines installing what the cell ran with: the shared base (torch, bitsandbytes) and the cell's packages
    (exact pins, or the direct reference of a path / VCS package)."""
    torch = host.get("torch") or ""
    lines = []
    if torch:
        cpu = "+cpu" in torch
        lines.append(f"pip install 'torch=={torch.split('+')[0]}'"
                     + (" --index-url https://download.pytorch.org/whl/cpu" if cpu else ""))
    base = ["pytest", "hypothesis"] + ([f"bitsandbytes=={host['bitsandbytes']}"] if host.get("bitsandbytes") else [])
    pins, indexes = [], []
    for pkg, version in sorted(rec.get("resolved", {}).items()):
        src = rec.get("sources", {}).get(pkg, {})
        if src.get("kind") == "vcs":
            pins.append(f"{pkg} @ git+{src['url']}@{src['commit']}")
        elif src.get("kind") in ("wheel", "sdist", "tree"):
            pins.append(src["path"])
        else:
            pins.append(f"{pkg}=={version}")
            if PYPI not in src.get("sources", [PYPI]):  # only on a mirror / local index: say which
                indexes += [u for u in src["sources"][:1] if u not in indexes]
    extra = [a for u in indexes for a in ("--extra-index-url", u)]
    lines.append("pip install " + " ".join(shlex.quote(x) for x in base + pins + extra))
    return lines


def reproduce_command(rec: dict[str, Any], node_id: str, host: dict[str, Any]) -> str:
    """Minimal shell commands that rerun one check with the cell's versions, in a moe-compat checkout."""
    return "\n".join([
        f"# in a moe-compat checkout, Python {host.get('python', '3.11')}",
        "python -m venv /tmp/repro && . /tmp/repro/bin/activate",
        *install_lines(rec, host),
        f"python -m pytest -p harness.pytest_plugin {shlex.quote(node_id)}",
    ])


def source_text(rec: dict[str, Any], package: str) -> str:
    """``0.22.0rc1 (index https://pypi.org/simple, sha256 ab12…)`` / ``0.21.2+x (wheel /p/x.whl, sha256 …)``."""
    src = rec.get("sources", {}).get(package, {})
    version = rec.get("resolved", {}).get(package) or src.get("version") or "?"
    kind = src.get("kind")
    if kind == "vcs":
        return f"{version} (git {src['url']} {src['ref']} = commit {src['commit']})"
    if kind in ("wheel", "sdist"):
        return f"{version} ({kind} {src['path']}, sha256 {src['sha256']})"
    if kind == "tree":
        git = f", git {src['git_commit']}{' dirty' if src.get('git_dirty') else ''}" if src.get("git_commit") else ""
        return f"{version} (source tree {src['path']}, tree sha256 {src['tree_sha256']}{git})"
    files = src.get("files") or {}
    sha = next((f"{name} sha256 {h}" for name, h in files.items() if h and name.endswith(".whl")), None) or next(
        (f"{name} sha256 {h}" for name, h in files.items() if h), None)
    where = ", ".join(src.get("sources", []))
    return f"{version} (index {where}{', ' + sha if sha else ''})" if where else version


# ----------------------------------------------------------------------------------------------- candidates

@dataclass
class Plan:
    """What to compare for one package: its release, its candidates, or a note why nothing runs."""

    package: str
    release: AxisValue | None = None
    candidates: list[tuple[str, AxisValue]] = field(default_factory=list)  # (label, value)
    notes: list[str] = field(default_factory=list)


def _short(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._+" else "_" for c in text)


def parse_candidates(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        pkg, sep, value = item.partition("=")
        if not sep or not pkg.strip() or not value.strip():
            raise MatrixError(f"--candidate {item!r}: expected PACKAGE=VALUE (pre, a spec, a path or git+URL@ref)")
        out.setdefault(pkg.strip(), []).append(value.strip())
    return out


def candidate_value(package: str, value: str, versions: list[str], release: str,
                    source: IndexSource) -> tuple[str, AxisValue] | str:
    """(label, axis value) of one ``--candidate`` value, or a note saying why there is nothing to run."""
    if value == "pre":
        pres = [Version(v) for v in versions if Version(v).is_prerelease or Version(v).is_devrelease]
        newest = max(pres, default=None)
        if newest is None or newest <= Version(release):
            return (f"no pre-release of {package} is newer than the newest release {release}"
                    + (f" (newest pre-release: {newest})" if newest else " (none published)")
                    + f" on {', '.join(source.config.sources)}")
        return f"{newest} (newest pre-release)", AxisValue(package, _short(str(newest)), f"=={newest}", pre=True)
    if value.startswith("git+"):
        v = AxisValue(package, "vcs", vcs=value)
        _req, src = resolve_value(v, source)
        return (f"{value} (commit {src['commit']})",
                AxisValue(package, f"git-{src['commit'][:10]}", vcs=value))
    looks_like_path = "/" in value or value.endswith((".whl", ".tar.gz", ".zip")) or Path(value).exists()
    if looks_like_path:
        v = AxisValue(package, "path", path=value)
        _req, src = resolve_value(v, source)
        digest = src.get("sha256") or src.get("tree_sha256")
        return (f"{value} ({src['kind']}, version {src.get('version') or 'from the installed package'})",
                AxisValue(package, f"path-{digest[:10]}", path=value))
    got = resolve_spec(value, versions, pre=True)
    if got is None:
        return f"no version of {package} on the index matches {value!r}"
    return f"{got} (spec {value})", AxisValue(package, _short(got), value, pre=True)


def plan(matrix: Matrix, packages: list[str], candidates: dict[str, list[str]], source: IndexSource) -> list[Plan]:
    plans = []
    for pkg in packages:
        p = Plan(pkg)
        plans.append(p)
        versions = source(pkg)
        release = resolve_spec("", versions)
        if release is None:
            p.notes.append(f"no final release of {pkg} on {', '.join(source.config.sources)}: nothing to compare with")
            continue
        p.release = AxisValue(pkg, _short(release), f"=={release}", note="newest release")
        for value in candidates.get(pkg, ["pre"]):
            got = candidate_value(pkg, value, versions, release, source)
            if isinstance(got, str):
                p.notes.append(got)
            elif got[1].id == p.release.id:
                p.notes.append(f"candidate {value!r} of {pkg} is the newest release {release} itself: not compared")
            elif any(got[1].id == v.id for _label, v in p.candidates):
                p.notes.append(f"candidate {value!r} of {pkg} repeats an earlier candidate ({got[0]})")
            else:
                p.candidates.append(got)
    return plans


# ----------------------------------------------------------------------------------------------- comparison

def compare(release: dict[str, Any], candidate: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Checks of the candidate's cell against the release's (``harness.records.compare``, keys: node ids):
    ``regressions`` (pass/finding/xfail on the release, fail on the candidate), ``stale_known`` (a known-broken entry
    now xpass), ``fixes``, ``new_failures`` (checks only the candidate has, failing), ``missing`` (ran on the release,
    absent on the candidate)."""
    same = "cell"
    d = records.compare([{**candidate, "id": same}], [{**release, "id": same}])
    by_node = {k.get("node_id") or records.check_label(k): k for k in candidate.get("checks", [])}
    out: dict[str, list[dict[str, Any]]] = {"regressions": [], "stale_known": [], "missing": []}
    for item in d["regressions"]:
        if item["check"] == "(cell)":
            continue  # a candidate cell error is reported as such, with its cause
        bucket = {"fail": "regressions", records.ABSENT: "missing"}.get(item["now"], "stale_known")
        out[bucket].append({**item, "check_record": by_node.get(item["node_id"], {})})
    out["fixes"] = d["fixes"]
    out["new_failures"] = [{**i, "check_record": by_node.get(i["node_id"], {})} for i in d["new_failures"]]
    return out


def _cell_brief(rec: dict[str, Any]) -> dict[str, Any]:
    return {"cell": rec["id"], "status": rec["status"], "message": rec.get("message", ""),
            "resolved": rec.get("resolved", {}), "sources": rec.get("sources", {}),
            "counts": dict(report.status_counts(rec))}


def build_report(plans: list[Plan], cell_recs: dict[str, dict[str, Any]], cell_ids: dict[tuple[str, str], str],
                 *, base: CellSpec, host: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """prerelease.json: per package the release cell and, per candidate, its cell and the comparison."""
    out_pkgs, exit_code = [], 0
    for p in plans:
        entry: dict[str, Any] = {"package": p.package, "notes": list(p.notes), "release": None, "candidates": []}
        out_pkgs.append(entry)
        if p.release is None:
            continue
        rel = cell_recs.get(cell_ids.get((p.package, p.release.id), ""))
        if rel is None:
            continue
        entry["release"] = _cell_brief(rel)
        for label, value in p.candidates:
            cand = cell_recs[cell_ids[(p.package, value.id)]]
            c: dict[str, Any] = {"label": label, **_cell_brief(cand), "version": cand.get("resolved", {}).get(
                p.package), "source": source_text(cand, p.package)}
            if rel["status"] not in ("pass", "fail"):
                c["error"] = f"the release cell {rel['id']} is {rel['status']}: {rel.get('message', '')}"
            elif cand["status"] not in ("pass", "fail"):
                c["error"] = f"the candidate cell {cand['id']} is {cand['status']}: {cand.get('message', '')}"
            else:
                cmp = compare(rel, cand)
                for item in (*cmp["regressions"], *cmp["new_failures"]):
                    chk = item.pop("check_record")
                    item["failure"] = failure_text(chk)
                    item["reproduce"] = reproduce_command(cand, item["node_id"], host)
                    item["reproduce_release"] = install_lines(rel, host)[-1]
                c.update(cmp)
            if c.get("error") or c.get("regressions") or c.get("new_failures") or c.get("missing"):
                exit_code = 1
            entry["candidates"].append(c)
    return {"schema": 1, **meta, "base_cell": base.id, "host": host, "packages": out_pkgs, "exit_code": exit_code}


def render_markdown(rep: dict[str, Any]) -> str:
    """prerelease.md: one paste-ready section per regression (package, versions, check, failure, reproduce)."""
    host = rep["host"]
    lines = [f"# Pre-release regression report ({rep['run_id']})", "",
             f"Base cell `{rep['base_cell']}` of matrix `{rep['matrix']}` · python {host.get('python')} · torch "
             f"{host.get('torch')} · bitsandbytes {host.get('bitsandbytes')} · {host.get('device')} · tests "
             f"`{' '.join(rep['tests'])}`" + (f" `{' '.join(rep['pytest_args'])}`" if rep["pytest_args"] else ""),
             f"Result: {'REGRESSIONS FOUND' if rep['exit_code'] else 'no regression'} (exit {rep['exit_code']})", ""]
    for pkg in rep["packages"]:
        lines.append(f"## {pkg['package']}")
        lines += [f"- {n}" for n in pkg["notes"]]
        rel = pkg["release"]
        if rel is None:
            lines.append("")
            continue
        lines.append(f"- release: {pkg['package']} {rel['resolved'].get(pkg['package'])} — cell `{rel['cell']}` "
                     f"{rel['status']} {_fmt_counts(rel['counts'])}")
        for c in pkg["candidates"]:
            lines.append(f"- candidate: {c['source']} — cell `{c['cell']}` {c['status']} {_fmt_counts(c['counts'])}")
            if c.get("error"):
                lines.append(f"  - **not compared**: {c['error']}")
                continue
            lines.append(f"  - {len(c['regressions'])} regression(s), {len(c['new_failures'])} new failing check(s), "
                         f"{len(c['missing'])} check(s) not run on the candidate, {len(c['fixes'])} fix(es), "
                         f"{len(c['stale_known'])} stale known entr(y/ies)")
        lines.append("")
        for c in pkg["candidates"]:
            if c.get("error"):
                continue
            others = ", ".join(f"{p} {v}" for p, v in sorted(c["resolved"].items()) if p != pkg["package"])
            for item in (*c["regressions"], *c["new_failures"]):
                was = item["was"] or "absent"
                lines += [
                    f"### {pkg['package']} {c['version']}: `{item['check']}` {was} on {rel['resolved'].get(pkg['package'])}"
                    f", {item['now']} on {c['version']}", "",
                    f"- **package**: {pkg['package']}",
                    f"- **candidate**: {c['source']}",
                    f"- **release**: {source_text({'resolved': rel['resolved'], 'sources': rel['sources']}, pkg['package'])}",
                    f"- **same in both**: {others}; torch {host.get('torch')}, python {host.get('python')}",
                    f"- **check**: `{item['node_id']}`", "",
                    "Failure on the candidate:", "", "```", item["failure"] or "(no message)", "```", "",
                    "Reproduce:", "", "```bash", item["reproduce"], "```", "",
                    f"On the release (passes): `{item['reproduce_release']}`, same pytest command.", ""]
            if c["missing"]:
                lines.append(f"Checks that ran on the release but not on {pkg['package']} {c['version']}:")
                lines += [f"- `{m['node_id'] or m['check']}` ({m['was']} on the release)" for m in c["missing"]]
                lines.append("")
            if c["fixes"]:
                lines.append(f"Fixed on {pkg['package']} {c['version']}:")
                lines += [f"- `{m['node_id'] or m['check']}` ({m['was']} → {m['now']})" for m in c["fixes"]]
                lines.append("")
            if c["stale_known"]:
                lines.append("Known-broken entries that no longer fail on the candidate (update the matrix file):")
                lines += [f"- `{m['node_id']}`" for m in c["stale_known"]]
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _fmt_counts(counts: dict[str, int]) -> str:
    return " ".join(f"{report.ICON[s]}{n}" for s, n in counts.items())


# ----------------------------------------------------------------------------------------------- command

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--package", action="append", help="package(s) to check against their newest pre-release (comma "
                                                      "separated or repeated); default: every axis package unless "
                                                      "--candidate names some")
    p.add_argument("--candidate", action="append", default=[],
                   help="PACKAGE=VALUE, VALUE one of: pre (newest pre-release, the default), a spec (==0.22.0rc1), "
                        "a wheel / sdist / source tree path, git+URL@ref; repeat for several candidates")
    p.add_argument("--jobs", type=int, default=2, help="cells in parallel (default 2)")
    add_cell_arguments(p)


def main(args: argparse.Namespace) -> int:
    matrix = load_matrix(args.matrix)
    base = base_cell(matrix, args.cell)
    candidates = parse_candidates(args.candidate)
    axis_pkgs = [pkg for pkg, _prefix, _values in matrix.axes]
    named = [p for item in args.package or [] for p in item.replace(",", " ").split()]
    packages = list(dict.fromkeys([*named, *candidates])) or axis_pkgs
    source = IndexSource(IndexConfig.from_environment())
    run_id = args.run_id or report.new_run_id(f"prerelease-{matrix.name}")
    run_dir = args.reports / "runs" / run_id
    print(f"prerelease: base cell {base.id} of matrix {matrix.name}; package index {', '.join(source.config.sources)}",
          flush=True)
    plans = plan(matrix, packages, candidates, source)
    batches: list[tuple[Matrix, list[CellSpec]]] = []  # one derived matrix per package
    cell_ids: dict[tuple[str, str], str] = {}
    for p in plans:
        for note in p.notes:
            print(f"prerelease: {p.package}: {note}", flush=True)
        if p.release is None or not p.candidates:
            continue
        m = vary(matrix, base, p.package, [p.release, *(v for _label, v in p.candidates)])
        batches.append((m, m.cells()))
        for cell in batches[-1][1]:
            cell_ids[(p.package, cell.axis_ids[p.package])] = cell.id
        print(f"prerelease: {p.package}: release {p.release.id} vs " + "; ".join(lbl for lbl, _v in p.candidates),
              flush=True)
    opts = cell_options(args, jobs=args.jobs)
    started, t0 = datetime.now(UTC).isoformat(timespec="seconds"), time.monotonic()
    cell_recs: dict[str, dict[str, Any]] = {}
    progress = Progress()
    for m, cells in batches:
        for rec in run_cells(m, cells, source=source, run_dir=run_dir, opts=opts, progress=progress):
            cell_recs[rec["id"]] = rec
    meta = {"run_id": run_id, "matrix": matrix.name, "started": started,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"), "wall_s": round(time.monotonic() - t0, 1),
            "tests": list(opts.tests or matrix.tests), "pytest_args": list(opts.pytest_args), "quick": opts.quick,
            "index": source.describe()}
    rep = build_report(plans, cell_recs, cell_ids, base=base, host=opts.host, meta=meta)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cell_recs:
        summary = report.build_summary(list(cell_recs.values()), run_id=run_id, host=opts.host, started=started,
                                       finished=meta["finished"], matrix={"name": matrix.name, "path": str(
                                           matrix.path), "description": f"prerelease comparison, base {base.id}",
                                           "tests": meta["tests"]},
                                       options={"quick": opts.quick, "jobs": opts.jobs, "wall_s": meta["wall_s"],
                                                "cells": list(cell_recs), "index": meta["index"]})
        report.attach_gate(summary)
        report.write_report(summary, run_dir)
    write_outputs(run_dir, "prerelease", rep, render_markdown(rep))
    return rep["exit_code"]
