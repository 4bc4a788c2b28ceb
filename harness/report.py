"""The merged report of a matrix run: ``summary.json``, ``summary.md``, ``index.html``; baseline diff; the gate.

Inputs are cell records (``cells/<id>.json`` written by ``harness.runner``, fields in ``harness.records.Cell``), from
one run or merged from many (one CI job per cell). The schema of ``summary.json`` is documented in
``reports/README.md``; ``summary.md`` and ``index.html`` are rendered from ``harness/templates/`` (jinja2; the HTML
autoescaped, self-contained: inline CSS and SVG, no scripts).

Gate (the exit code of ``harness.cli run`` / ``merge``): 1 when any check is ``fail`` or ``xpass``, any cell is
``error``, nothing was tested (no cell, or not one check whose test ran), or the baseline comparison finds a
regression (``harness.records.compare``: a vanished check is one unless a ``[[retired]]`` entry declares it);
0 otherwise (``unreleased`` and ``skipped`` cells pass).
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.records import (
    CELL_RAN,
    CHECK_STATUSES,
    OPS,
    TESTED,
    UNEXPECTED,
    RecordError,
    check_label,
    compare,
    tested_count,
    validate_cell,
)

SCHEMA_VERSION = 2
BASELINE_SCHEMAS = (1, 2)   # summary.json versions readable as --baseline (2 added `added`, `missing_cells`, ...)
TEMPLATES = Path(__file__).resolve().parent / "templates"
ICON = {"pass": "✅", "fail": "❌", "xfail": "🟡", "xpass": "🟣", "skip": "⏭️", "finding": "🔎",
        "error": "💥", "unreleased": "∅", "skipped": "⏭️"}
COLOR = {"pass": "#c8e6c9", "fail": "#ffab91", "xfail": "#fff59d", "xpass": "#e1bee7", "skip": "#eeeeee",
         "finding": "#b3e5fc", "error": "#ef5350", "unreleased": "#f5f5f5", "skipped": "#e0e0e0"}
OP_TEXT = {"<=": "≤", "<": "<", ">=": "≥", ">": ">", "==": "="}
MD_LIMIT = 900_000  # $GITHUB_STEP_SUMMARY takes at most 1024k per step
ADDED_SHOWN = 20    # new checks listed by name in summary.md / index.html (all of them are in summary.json)
BASELINE_SECTIONS = (("regressions", "Regressions"), ("fixes", "Fixes"), ("new_failures", "New failures"),
                     ("removed", "Removed checks"), ("added", "Added checks"))
STATUS_SECTIONS = (("fail", "Failures"), ("xpass", "Unexpected passes (stale known-broken entries)"),
                   ("finding", "Findings"), ("xfail", "Known broken (expected failures)"))


class ReportError(ValueError):
    """Inputs cannot be merged or compared (no cell files, duplicate cells, malformed JSON or records, an unusable
    baseline or output path); the message names the file and the key."""


# ----------------------------------------------------------------------------------------------- merge

def find_cell_files(paths: list[Path]) -> list[Path]:
    """Cell records under ``paths``: files themselves, or ``**/cells/*.json`` below directories."""
    out: list[Path] = []
    for p in paths:
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(p.rglob("cells/*.json")))
        else:
            raise ReportError(f"{p}: no such file or directory")
    if not out:
        raise ReportError(f"no cell records (cells/<id>.json) under {', '.join(map(str, paths))}")
    return out


def _read_json(path: Path, what: str) -> Any:
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        return json.loads(raw.decode())
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{what} {path}: cannot read it as JSON ({type(exc).__name__}: {exc})") from exc


def load_cells(paths: list[Path]) -> list[dict[str, Any]]:
    """Read and validate cell records, refusing duplicates (the same cell from two inputs is ambiguous)."""
    cells: dict[str, tuple[Path, dict[str, Any]]] = {}
    for f in find_cell_files(paths):
        try:
            rec = validate_cell(_read_json(f, "cell record"), str(f))
        except RecordError as exc:
            raise ReportError(f"not a valid cell record: {exc}") from exc
        if rec["id"] in cells:
            raise ReportError(f"cell {rec['id']} appears twice: {cells[rec['id']][0]} and {f}")
        cells[rec["id"]] = (f, rec)
    return [rec for _f, rec in cells.values()]


def _natural(text: str) -> list[tuple[int, int | str]]:
    """Sort key that orders the numbers inside ids as numbers: t5.9-p0.18 before t5.24-p0.18."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part]


def order_cells(cells: list[dict[str, Any]], order: list[str] | None) -> list[dict[str, Any]]:
    """Cells in ``order`` (the matrix's), the others after them in natural id order."""
    rank = {cid: i for i, cid in enumerate(order or [])}
    return sorted(cells, key=lambda c: (rank.get(c["id"], len(rank)), _natural(c["id"])))


def build_summary(cells: list[dict[str, Any]], *, run_id: str, matrix: dict[str, Any], host: dict[str, Any] | None,
                  started: str | None = None, finished: str | None = None,
                  options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary.json object (without baseline/gate, see ``attach_gate``)."""
    host = host or next((c.get("host") for c in cells if c.get("host")), {}) or {}
    return {
        "schema": SCHEMA_VERSION,
        "run_id": run_id,
        "started": started or min((c.get("started") or "" for c in cells), default=""),
        "finished": finished or max((c.get("finished") or "" for c in cells), default=""),
        "matrix": matrix,
        "host": host,
        "options": options or {},
        "totals": {
            "cells": dict(Counter(c["status"] for c in cells)),
            "checks": dict(Counter(k["status"] for c in cells for k in c.get("checks", []))),
        },
        "cells": cells,
    }


# ----------------------------------------------------------------------------------------------- diff + gate

def diff(current: dict[str, Any], baseline: dict[str, Any], retired: Iterable[Any] = ()) -> dict[str, Any]:
    """``harness.records.compare`` of two summaries (see there for each list)."""
    return compare(current["cells"], baseline["cells"], retired)


def _selection(summary: dict[str, Any]) -> dict[str, Any]:
    opts = summary.get("options") or {}
    return {"tests": opts.get("tests") or (summary.get("matrix") or {}).get("tests"),
            "pytest_args": opts.get("pytest_args") or []}


def _nothing_tested(cells: list[dict[str, Any]]) -> str | None:
    """Why this run tested nothing, or None when some check's test ran."""
    if not cells:
        return "nothing was tested: the run has no cells"
    if tested_count(cells):
        return None
    statuses = Counter(c["status"] for c in cells)
    checks = sum(len(c.get("checks", [])) for c in cells)
    return (f"nothing was tested: no check ran a test ({checks} check(s), none with a status in "
            f"{'/'.join(TESTED)}); cells: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())))


def attach_gate(summary: dict[str, Any], baseline: dict[str, Any] | None = None, baseline_path: str | None = None,
                *, retired: Iterable[Any] = (), allow_empty: bool = False) -> int:
    """Add ``baseline`` (the comparison) and ``gate`` to ``summary``; return the exit code.

    ``retired``: the matrix's ``[[retired]]`` entries; ``allow_empty``: a run that tests nothing passes (for one-cell
    CI jobs whose cell may be unreleased: the merge job's gate covers the whole matrix), recorded in ``gate.notes``.
    """
    reasons, notes = [], []
    cells = summary["cells"]
    unexpected = [(c["id"], k) for c in cells for k in c.get("checks", []) if k["status"] in UNEXPECTED]
    errors = [c["id"] for c in cells if c["status"] == "error"]
    if unexpected:
        reasons.append(f"{len(unexpected)} unexpected check result(s) (fail/xpass)")
    if errors:
        reasons.append(f"{len(errors)} cell(s) in error: {', '.join(errors)}")
    empty = _nothing_tested(cells)
    if empty and allow_empty:
        notes.append(f"{empty} (allowed by --allow-empty)")
    elif empty:
        reasons.append(empty)
    summary["baseline"] = None
    if baseline is not None:
        d = diff(summary, baseline, retired)
        summary["baseline"] = {"path": baseline_path, "run_id": baseline.get("run_id"), **d}
        if d["regressions"]:
            vanished = sum(1 for r in d["regressions"] if r["now"] == "absent")
            text = f"{len(d['regressions'])} regression(s) against baseline {baseline.get('run_id')}"
            if vanished:
                text += f" ({vanished} check(s) vanished: declare removals with [[retired]] in the matrix file)"
                if _selection(summary) != _selection(baseline):
                    text += (f"; the baseline ran {_selection(baseline)}, this run {_selection(summary)}: compare "
                             f"runs of the same tests")
            reasons.append(text)
        if d["missing_cells"]:
            notes.append(f"{len(d['missing_cells'])} baseline cell(s) not in this run, not compared: "
                         + ", ".join(m["cell"] for m in d["missing_cells"]))
    code = 1 if reasons else 0
    summary["gate"] = {"exit_code": code, "reasons": reasons, "notes": notes}
    return code


def load_summary(path: Path) -> dict[str, Any]:
    """Read and validate a summary.json (or .json.gz) for use as a baseline; ``ReportError`` names the key."""
    data = _read_json(Path(path), "baseline")
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        raise ReportError(f"baseline {path}: not a summary.json (needs a list `cells`)")
    schema = data.get("schema", 1)
    if schema not in BASELINE_SCHEMAS:
        raise ReportError(f"baseline {path}: schema {schema!r} is not readable by this harness "
                          f"(reads {', '.join(map(str, BASELINE_SCHEMAS))})")
    cells, seen = [], set()
    for i, c in enumerate(data["cells"]):
        try:
            rec = validate_cell(c, f"baseline {path}: cells[{i}]", strict=False)
        except RecordError as exc:
            raise ReportError(str(exc)) from exc
        if rec["id"] in seen:
            raise ReportError(f"baseline {path}: cell {rec['id']} appears twice")
        seen.add(rec["id"])
        cells.append(rec)
    return {**data, "cells": cells}


# ----------------------------------------------------------------------------------------------- formatting

def fmt_num(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e6):
        return str(int(v))
    return f"{v:.3g}"


def metric_text(check: dict[str, Any], key: str) -> str:
    value = check.get("metrics", {}).get(key)
    t = check.get("threshold", {}).get(key)
    text = f"{key}={fmt_num(value)}"
    if t:
        text += f" ({OP_TEXT.get(t['op'], t['op'])} {fmt_num(t['value'])})"
    return text


def violated(check: dict[str, Any], key: str) -> bool:
    """True when metric ``key`` breaks its threshold (a non-number value counts as broken)."""
    t = check.get("threshold", {}).get(key)
    v = check.get("metrics", {}).get(key)
    if not t:
        return False
    if not isinstance(v, int | float) or not isinstance(t["value"], int | float):
        return True
    return not OPS[t["op"]](v, t["value"])


def headline(check: dict[str, Any]) -> str:
    """For a table cell: the first metric that breaks its threshold, else the first thresholded metric, else the
    first metric — with its threshold."""
    broken = [k for k in check.get("threshold", {}) if violated(check, k)]
    keys = broken or list(check.get("threshold", {})) or list(check.get("metrics", {}))
    return metric_text(check, keys[0]) if keys else ""


def _rows(summary: dict[str, Any]) -> tuple[list[str], dict[str, dict[str, dict[str, Any]]]]:
    """Check labels (rows, first-seen order) and label -> cell id -> check."""
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for cell in summary["cells"]:
        labels = Counter(check_label(k) for k in cell.get("checks", []))
        for k in cell.get("checks", []):
            label = check_label(k)
            if labels[label] > 1:
                label = f"{label} ({k.get('node_id')})"
            rows.setdefault(label, {})[cell["id"]] = k
    return list(rows), rows


SEVERITY = {"fail": 0, "xpass": 0, "finding": 1, "xfail": 2, "pass": 3, "skip": 3}


def split_rows(labels: list[str], rows: dict[str, dict[str, dict[str, Any]]]) -> tuple[list[str], list[str]]:
    """(rows with a fail/xpass/finding/xfail in some cell, worst first; rows that only pass or skip)."""
    worst = {label: min(SEVERITY[k["status"]] for k in rows[label].values()) for label in labels}
    notable = sorted((label for label in labels if worst[label] < 3), key=lambda label: worst[label])  # stable
    return notable, [label for label in labels if worst[label] >= 3]


def md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def cell_counts(cell: dict[str, Any]) -> str:
    """``✅239 🟡6 ⏭️74``: the check statuses of a cell with their counts."""
    c = Counter(k["status"] for k in cell.get("checks", []))
    return " ".join(f"{ICON[s]}{c[s]}" for s in CHECK_STATUSES if c.get(s))


def status_counts(cell: dict[str, Any]) -> list[tuple[str, int]]:
    c = Counter(k["status"] for k in cell.get("checks", []))
    return [(s, c[s]) for s in CHECK_STATUSES if c.get(s)]


def versions_text(cell: dict[str, Any]) -> str:
    res = cell.get("resolved") or {}
    axis = cell.get("axis_ids") or {}
    return " · ".join(f"{p} {res.get(p, '—')}" for p in axis) or ""


def venv_text(cell: dict[str, Any]) -> str:
    return f"{cell['venv_bytes'] / 1e6:.0f} MB" if cell.get("venv_bytes") else ""


# ----------------------------------------------------------------------------------------------- SVG plots

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def plot_geometry(plot: dict[str, Any], width: int = 420, height: int = 220) -> dict[str, Any]:
    """What the ``svg_plot`` macro of index.html.j2 draws: the frame, axis labels and one polyline per series."""
    series = dict(plot["series"])
    finite = [v for vals in series.values() for v in vals if isinstance(v, int | float) and math.isfinite(v)]
    n = max((len(v) for v in series.values()), default=0)
    xs = plot.get("x") or list(range(n))
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    xlo, xhi = (min(xs), max(xs)) if xs else (0, 1)
    if xhi == xlo:
        xhi = xlo + 1
    left, right, top, bottom = 56, 10, 22, 34
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - xlo) / (xhi - xlo) * pw

    def py(y: float) -> float:
        return top + (hi - y) / (hi - lo) * ph

    lines = []
    for i, (label, vals) in enumerate(series.items()):
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, vals)
                       if isinstance(y, int | float) and math.isfinite(y))
        lines.append({"label": label[:14], "color": PALETTE[i % len(PALETTE)], "points": pts, "lx": left + 8 + i * 90})
    return {"width": width, "height": height, "left": left, "top": top, "pw": pw, "ph": ph,
            "hi": fmt_num(hi), "lo": fmt_num(lo), "xlo": fmt_num(xlo), "xhi": fmt_num(xhi),
            "title": plot["title"], "xlabel": plot.get("xlabel") or "", "ylabel": plot.get("ylabel") or "",
            "lines": lines}


# ----------------------------------------------------------------------------------------------- rendering

@functools.cache
def _env() -> Any:
    import jinja2  # only the report needs it (not the pytest plugin inside the cells)

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             autoescape=jinja2.select_autoescape(["html.j2"], default=False),
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(md=md_escape, num=fmt_num)
    env.globals.update(
        icon=ICON, color=COLOR, check_statuses=CHECK_STATUSES, cell_ran=CELL_RAN, label=check_label,
        headline=headline, metric_text=metric_text, cell_counts=cell_counts, status_counts=status_counts,
        versions=versions_text, venv=venv_text, plot_geometry=plot_geometry, added_shown=ADDED_SHOWN,
        baseline_sections=BASELINE_SECTIONS)
    return env


def _view(summary: dict[str, Any]) -> dict[str, Any]:
    """What both templates show: the summary plus the rows of the checks × cells table and the per-status lists."""
    h = summary.get("host") or {}
    gate = {"exit_code": None, "reasons": [], "notes": [], **(summary.get("gate") or {})}
    cells = summary["cells"]
    labels, rows = _rows(summary)
    notable, quiet = split_rows(labels, rows)
    unused = {json.dumps(u, sort_keys=True) for c in cells for u in c.get("known_unused", [])}
    plotted = [(c, k) for c in cells for k in c.get("checks", []) if k.get("plots")]
    figures = []
    for label in labels:
        figs = [(c, p) for c, k in plotted for p in k["plots"] if rows[label].get(c["id"]) is k]
        if figs:
            figures.append((label, figs))
    return {
        "s": summary, "run_id": summary["run_id"], "matrix_name": str((summary.get("matrix") or {}).get("name")),
        "host": {k: h.get(k) for k in ("python", "torch", "bitsandbytes", "device")},
        "gate": gate, "passed": gate["exit_code"] == 0, "cells": cells,
        "labels": labels, "rows": rows, "notable": notable, "quiet": quiet,
        "baseline": summary.get("baseline"),
        "incomplete": [c for c in cells if c["status"] in ("error", "unreleased", "skipped")],
        "sections": [(status, title, [(c, k) for c in cells for k in c.get("checks", []) if k["status"] == status])
                     for status, title in STATUS_SECTIONS],
        "unused": [json.loads(u) for u in sorted(unused)],
        "figures": figures,
    }


def render_markdown(summary: dict[str, Any]) -> str:
    """summary.md: gate, cells, the cells × checks table, baseline comparison, every failure and finding."""
    text = _env().get_template("summary.md.j2").render(_view(summary))
    if len(text.encode()) > MD_LIMIT:
        cut = text.encode()[:MD_LIMIT].decode(errors="ignore")
        text = cut + "\n\n… truncated (GitHub step summaries take 1024k); see summary.json / index.html\n"
    return text


def render_html(summary: dict[str, Any]) -> str:
    """index.html: self-contained (inline CSS and SVG, no scripts, no network), well-formed XML syntax."""
    return _env().get_template("index.html.j2").render(_view(summary))


# ----------------------------------------------------------------------------------------------- write

def new_run_id(matrix_name: str) -> str:
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{matrix_name}"


def check_latest(latest: Path) -> None:
    """``latest`` must be absent or a symlink (``write_report`` replaces it); checked before a run starts."""
    if latest.exists() and not latest.is_symlink():
        raise ReportError(f"{latest} exists and is not a symlink; move it away (it is replaced by a symlink to the "
                          f"newest run)")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(summary: dict[str, Any], run_dir: Path, *, latest: Path | None = None) -> dict[str, Path]:
    """Write summary.json / summary.md / index.html into ``run_dir`` (summary.json first, each file atomically);
    then point ``latest`` (a symlink) at it. ``ReportError`` names what could not be written."""
    paths = {"json": run_dir / "summary.json", "md": run_dir / "summary.md", "html": run_dir / "index.html"}
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(paths["json"], json.dumps(summary, indent=1, default=str) + "\n")
        _write_atomic(paths["md"], render_markdown(summary))
        _write_atomic(paths["html"], render_html(summary))
    except OSError as exc:
        raise ReportError(f"cannot write the report into {run_dir}: {exc}") from exc
    if latest is not None:
        tmp = latest.with_name(latest.name + ".tmp")
        try:
            check_latest(latest)
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(os.path.relpath(run_dir.resolve(), latest.parent.resolve()), tmp)
            os.replace(tmp, latest)
        except (OSError, ReportError) as exc:
            raise ReportError(f"the report is in {run_dir}, but {latest} could not point at it: {exc}") from exc
    return paths
