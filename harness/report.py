"""The merged report of a matrix run: ``summary.json``, ``summary.md``, ``index.html``; baseline diff; the gate.

Inputs are cell records (``cells/<id>.json`` written by ``harness.runner``), from one run or merged from many
(one CI job per cell). The schema of ``summary.json`` is documented in ``reports/README.md``.

Gate (the exit code of ``harness.cli run`` / ``merge``): 1 when any check is ``fail`` or ``xpass``, any cell is
``error``, or the baseline comparison finds a regression; 0 otherwise (``unreleased`` and ``skipped`` cells pass).
"""

from __future__ import annotations

import html
import json
import math
import os
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
CELL_STATUSES = ("pass", "fail", "error", "unreleased", "skipped")
CHECK_STATUSES = ("pass", "fail", "xfail", "xpass", "skip", "finding")
BAD = ("fail", "xpass")
GOOD = ("pass", "finding", "xfail")
ICON = {"pass": "✅", "fail": "❌", "xfail": "🟡", "xpass": "🟣", "skip": "⏭️", "finding": "🔎",
        "error": "💥", "unreleased": "∅", "skipped": "⏭️"}
COLOR = {"pass": "#c8e6c9", "fail": "#ffab91", "xfail": "#fff59d", "xpass": "#e1bee7", "skip": "#eeeeee",
         "finding": "#b3e5fc", "error": "#ef5350", "unreleased": "#f5f5f5", "skipped": "#e0e0e0"}
OP_TEXT = {"<=": "≤", "<": "<", ">=": "≥", ">": ">", "==": "="}
MD_LIMIT = 900_000  # $GITHUB_STEP_SUMMARY takes at most 1024k per step


class ReportError(ValueError):
    """Inputs cannot be merged (no cell files, duplicate cells, unreadable JSON); the message names the file."""


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


def load_cells(paths: list[Path]) -> list[dict[str, Any]]:
    """Read cell records, refusing duplicates (the same cell from two inputs is ambiguous)."""
    cells: dict[str, tuple[Path, dict[str, Any]]] = {}
    for f in find_cell_files(paths):
        try:
            rec = json.loads(f.read_text())
        except json.JSONDecodeError as exc:
            raise ReportError(f"{f}: not JSON ({exc})") from exc
        if not isinstance(rec, dict) or "id" not in rec or "status" not in rec:
            raise ReportError(f"{f}: not a cell record (needs `id` and `status`)")
        if rec["status"] not in CELL_STATUSES:
            raise ReportError(f"{f}: unknown cell status {rec['status']!r}")
        if rec["id"] in cells:
            raise ReportError(f"cell {rec['id']} appears twice: {cells[rec['id']][0]} and {f}")
        cells[rec["id"]] = (f, rec)
    return [rec for _f, rec in cells.values()]


def order_cells(cells: list[dict[str, Any]], order: list[str] | None) -> list[dict[str, Any]]:
    rank = {cid: i for i, cid in enumerate(order or [])}
    return sorted(cells, key=lambda c: (rank.get(c["id"], len(rank)), c["id"]))


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

def check_label(check: dict[str, Any]) -> str:
    """Row label of a check: ``name [family] [variant]``."""
    parts = [check["name"]]
    for key in ("family", "variant"):
        if check.get(key):
            parts.append(f"[{check[key]}]")
    return " ".join(parts)


def _index(summary: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["id"], k.get("node_id") or check_label(k)): k for c in summary["cells"] for k in c.get("checks", [])}


def diff(current: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Compare with an earlier summary: regressions (good -> bad), fixes (bad -> pass/finding), new failures,
    removed checks, and cells that newly error. Keys are (cell id, test node id)."""
    cur, base = _index(current), _index(baseline)
    base_cells = {c["id"]: c for c in baseline["cells"]}
    cur_cells = {c["id"]: c for c in current["cells"]}
    out: dict[str, list[dict[str, Any]]] = {"regressions": [], "fixes": [], "new_failures": [], "removed": []}

    def item(key: tuple[str, str], was: str | None, now: str | None, chk: dict[str, Any]) -> dict[str, Any]:
        return {"cell": key[0], "check": check_label(chk), "node_id": key[1], "was": was, "now": now,
                "message": chk.get("message", "")}

    for key, chk in cur.items():
        old = base.get(key)
        if old is None:
            if chk["status"] in BAD:
                out["new_failures"].append(item(key, None, chk["status"], chk))
        elif old["status"] in GOOD and chk["status"] in BAD:
            out["regressions"].append(item(key, old["status"], chk["status"], chk))
        elif old["status"] in BAD and chk["status"] in ("pass", "finding"):
            out["fixes"].append(item(key, old["status"], chk["status"], chk))
    for key, chk in base.items():
        if key not in cur and key[0] in cur_cells and cur_cells[key[0]]["status"] not in ("error",):
            out["removed"].append(item(key, chk["status"], None, chk))
    for cid, cell in cur_cells.items():
        old = base_cells.get(cid)
        if old is None:
            continue
        if cell["status"] == "error" and old["status"] != "error":
            out["regressions"].append({"cell": cid, "check": "(cell)", "node_id": "", "was": old["status"],
                                       "now": "error", "message": cell.get("message", "")})
        elif old["status"] == "error" and cell["status"] in ("pass", "fail"):
            out["fixes"].append({"cell": cid, "check": "(cell)", "node_id": "", "was": "error",
                                 "now": cell["status"], "message": ""})
    return out


def attach_gate(summary: dict[str, Any], baseline: dict[str, Any] | None = None,
                baseline_path: str | None = None) -> int:
    """Add ``baseline`` (the diff) and ``gate`` to ``summary``; return the exit code."""
    reasons = []
    unexpected = [(c["id"], k) for c in summary["cells"] for k in c.get("checks", []) if k["status"] in BAD]
    errors = [c["id"] for c in summary["cells"] if c["status"] == "error"]
    if unexpected:
        reasons.append(f"{len(unexpected)} unexpected check result(s) (fail/xpass)")
    if errors:
        reasons.append(f"{len(errors)} cell(s) in error: {', '.join(errors)}")
    summary["baseline"] = None
    if baseline is not None:
        d = diff(summary, baseline)
        summary["baseline"] = {"path": baseline_path, "run_id": baseline.get("run_id"), **d}
        if d["regressions"]:
            reasons.append(f"{len(d['regressions'])} regression(s) against baseline {baseline.get('run_id')}")
    code = 1 if reasons else 0
    summary["gate"] = {"exit_code": code, "reasons": reasons}
    return code


def load_summary(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"baseline {path}: cannot read a summary.json ({exc})") from exc
    if not isinstance(data, dict) or "cells" not in data:
        raise ReportError(f"baseline {path}: not a summary.json (no `cells`)")
    return data


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


_OPS = {"<=": lambda v, t: v <= t, "<": lambda v, t: v < t, ">=": lambda v, t: v >= t, ">": lambda v, t: v > t,
        "==": lambda v, t: v == t}


def violated(check: dict[str, Any], key: str) -> bool:
    """True when metric ``key`` breaks its threshold (a non-number value counts as broken)."""
    t = check.get("threshold", {}).get(key)
    v = check.get("metrics", {}).get(key)
    if not t:
        return False
    if not isinstance(v, int | float) or not isinstance(t["value"], int | float):
        return True
    return not _OPS.get(t["op"], lambda a, b: True)(v, t["value"])


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


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _cell_counts(cell: dict[str, Any]) -> str:
    c = Counter(k["status"] for k in cell.get("checks", []))
    return " ".join(f"{ICON[s]}{c[s]}" for s in CHECK_STATUSES if c.get(s))


def _versions(cell: dict[str, Any]) -> str:
    res = cell.get("resolved") or {}
    axis = cell.get("axis_ids") or {}
    return " · ".join(f"{p} {res.get(p, '—')}" for p in axis) or ""


def render_markdown(summary: dict[str, Any]) -> str:
    """summary.md: gate, cells, the cells × checks table, regressions/fixes, every failure and finding."""
    h = summary.get("host", {})
    gate = summary.get("gate", {"exit_code": None, "reasons": []})
    cells = summary["cells"]
    out = [f"# moe-compat matrix report `{summary['run_id']}`", "",
           f"Matrix **{summary['matrix'].get('name')}** · started {summary['started']} · finished "
           f"{summary['finished']} · python {h.get('python')} · torch {h.get('torch')} · bitsandbytes "
           f"{h.get('bitsandbytes')} · device {h.get('device')}", ""]
    verdict = "PASS" if gate.get("exit_code") == 0 else "FAIL"
    out += [f"**Gate: {verdict}** (exit {gate.get('exit_code')})"
            + (": " + "; ".join(gate["reasons"]) if gate.get("reasons") else ""), ""]
    out += ["## Cells", "", "| cell | versions | status | checks | duration | venv | message |",
            "|---|---|---|---|---|---|---|"]
    for c in cells:
        venv = f"{c['venv_bytes'] / 1e6:.0f} MB" if c.get("venv_bytes") else ""
        msg = _md_escape((c.get("message") or "")[:200])
        out.append(f"| `{c['id']}` | {_versions(c)} | {ICON[c['status']]} {c['status']} | {_cell_counts(c)} | "
                   f"{c.get('duration_s', 0):.0f}s | {venv} | {msg} |")
    labels, rows = _rows(summary)
    notable, quiet = split_rows(labels, rows)
    head = ["| check | " + " | ".join(f"`{c['id']}`" for c in cells) + " |", "|---|" + "---|" * len(cells)]

    def md_row(label: str) -> str:
        cols = []
        for c in cells:
            k = rows[label].get(c["id"])
            if k is None:
                cols.append("·" if c["status"] in ("pass", "fail") else "")
            else:
                hl = headline(k)
                cols.append(f"{ICON[k['status']]} {k['status']}" + (f"<br>{_md_escape(hl)}" if hl else ""))
        return f"| {_md_escape(label)} | " + " | ".join(cols) + " |"

    if labels:
        out += ["", "## Checks × cells", "",
                f"{len(notable)} check(s) with a failure, unexpected pass, finding or expected failure in some cell "
                f"(worst first); {len(quiet)} pass or skip everywhere (collapsed below).", ""]
        if notable:
            out += [*head, *(md_row(label) for label in notable)]
        if quiet:
            out += ["", f"<details><summary>{len(quiet)} checks that pass or skip in every cell</summary>", "",
                    *head, *(md_row(label) for label in quiet), "", "</details>"]
        out += ["", "Legend: " + " ".join(f"{ICON[s]} {s}" for s in CHECK_STATUSES) + " · `·` not run in this cell"]
    base = summary.get("baseline")
    if base:
        out += ["", f"## Against baseline `{base.get('run_id')}`", ""]
        for key, title in (("regressions", "Regressions"), ("fixes", "Fixes"), ("new_failures", "New failures"),
                           ("removed", "Removed checks")):
            out.append(f"**{title}** ({len(base[key])})")
            out += [f"- `{d['cell']}` {_md_escape(d['check'])}: {d['was']} → {d['now']}"
                    + (f" — {_md_escape(d['message'][:300])}" if d.get("message") else "") for d in base[key]]
            out.append("")
    errs = [c for c in cells if c["status"] in ("error", "unreleased", "skipped")]
    if errs:
        out += ["", "## Cells that did not run to completion", ""]
        for c in errs:
            out.append(f"- `{c['id']}` **{c['status']}**: {_md_escape(c.get('message', ''))}")
            if c["status"] == "error" and c.get("log_tail"):
                out += ["", "  <details><summary>log tail</summary>", "", "  ```",
                        *("  " + ln for ln in c["log_tail"].splitlines()[-25:]), "  ```", "  </details>", ""]
    for status, title in (("fail", "Failures"), ("xpass", "Unexpected passes (stale known-broken entries)"),
                          ("finding", "Findings"), ("xfail", "Known broken (expected failures)")):
        items = [(c, k) for c in cells for k in c.get("checks", []) if k["status"] == status]
        if not items:
            continue
        out += ["", f"## {title} ({len(items)})", ""]
        for c, k in items:
            metrics = ", ".join(metric_text(k, m) for m in k.get("metrics", {}))
            out.append(f"- `{c['id']}` **{_md_escape(check_label(k))}** (`{k.get('node_id')}`)"
                       + (f" — {metrics}" if metrics else ""))
            if k.get("message"):
                out.append(f"  > {_md_escape(k['message'][:1500])}")
    unused = {json.dumps(u, sort_keys=True) for c in cells for u in c.get("known_unused", [])}
    if unused:
        out += ["", "## Known-broken entries that matched no check", ""]
        out += [f"- {_md_escape(json.loads(u)['reason'][:200])} — checks {json.loads(u)['checks']}"
                for u in sorted(unused)]
    text = "\n".join(out) + "\n"
    if len(text.encode()) > MD_LIMIT:
        cut = text.encode()[:MD_LIMIT].decode(errors="ignore")
        text = cut + "\n\n… truncated (GitHub step summaries take 1024k); see summary.json / index.html\n"
    return text


# ----------------------------------------------------------------------------------------------- HTML

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def svg_plot(plot: dict[str, Any], width: int = 420, height: int = 220) -> str:
    """One line chart as inline SVG: each series a polyline, min/max axis labels, a legend."""
    e = html.escape
    series = {k: [v for v in vals] for k, vals in plot["series"].items()}
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

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{e(plot["title"])}">',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#999"/>',
             f'<text x="{left}" y="14" font-size="12" font-weight="bold">{e(plot["title"])}</text>',
             f'<text x="{left - 4}" y="{top + 10}" font-size="10" text-anchor="end">{e(fmt_num(hi))}</text>',
             f'<text x="{left - 4}" y="{top + ph}" font-size="10" text-anchor="end">{e(fmt_num(lo))}</text>',
             f'<text x="{left}" y="{height - 18}" font-size="10">{e(fmt_num(xlo))}</text>',
             f'<text x="{left + pw}" y="{height - 18}" font-size="10" text-anchor="end">{e(fmt_num(xhi))}</text>',
             f'<text x="{left + pw / 2}" y="{height - 4}" font-size="10" text-anchor="middle">'
             f'{e(plot.get("xlabel") or "")}</text>']
    if plot.get("ylabel"):
        parts.append(f'<text x="10" y="{top + ph / 2}" font-size="10" transform="rotate(-90 10 {top + ph / 2})" '
                     f'text-anchor="middle">{e(plot["ylabel"])}</text>')
    for i, (label, vals) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, vals)
                       if isinstance(y, int | float) and math.isfinite(y))
        if pts:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"/>')
        lx = left + 8 + i * 90
        parts.append(f'<rect x="{lx}" y="{top + 4}" width="10" height="3" fill="{color}"/>'
                     f'<text x="{lx + 13}" y="{top + 10}" font-size="10">{e(label[:14])}</text>')
    parts.append("</svg>")
    return "".join(parts)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}
th,td{border:1px solid #bbb;padding:3px 6px;font-size:13px;vertical-align:top}
th{background:#f0f0f0;position:sticky;top:0}
td.s{text-align:center;white-space:nowrap}
small{color:#444}
.msg{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:12px;background:#f7f7f7;padding:4px}
.plots{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0}
figcaption{font-size:12px}
.gate-pass{color:#1b5e20}.gate-fail{color:#b71c1c}
"""


def _html_counts(cell: dict[str, Any]) -> str:
    c = Counter(k["status"] for k in cell.get("checks", []))
    return " ".join(f'<span style="background:{COLOR[s]};padding:0 4px">{s}&#160;{c[s]}</span>'
                    for s in CHECK_STATUSES if c.get(s))


def render_html(summary: dict[str, Any]) -> str:
    """index.html: self-contained (inline CSS and SVG, no scripts, no network), well-formed XML syntax."""
    e = html.escape
    h = summary.get("host", {})
    gate = summary.get("gate", {"exit_code": None, "reasons": []})
    cells = summary["cells"]
    ok = gate.get("exit_code") == 0
    out = ['<!DOCTYPE html>', '<html lang="en">', '<head>', '<meta charset="utf-8"/>',
           f'<title>moe-compat matrix {e(summary["run_id"])}</title>', f'<style>{CSS}</style>', '</head>', '<body>',
           f'<h1>moe-compat matrix report <code>{e(summary["run_id"])}</code></h1>',
           f'<p>Matrix <b>{e(str(summary["matrix"].get("name")))}</b> · started {e(summary["started"])} · '
           f'finished {e(summary["finished"])} · python {e(str(h.get("python")))} · torch {e(str(h.get("torch")))}'
           f' · bitsandbytes {e(str(h.get("bitsandbytes")))} · device {e(str(h.get("device")))}</p>',
           f'<h2 class="{"gate-pass" if ok else "gate-fail"}">Gate: {"PASS" if ok else "FAIL"} '
           f'(exit {gate.get("exit_code")})</h2>']
    if gate.get("reasons"):
        out.append("<ul>" + "".join(f"<li>{e(r)}</li>" for r in gate["reasons"]) + "</ul>")
    out += ['<h2>Cells</h2>', '<table>', '<tr><th>cell</th><th>versions</th><th>status</th><th>checks</th>'
            '<th>duration</th><th>venv</th><th>message</th></tr>']
    for c in cells:
        venv = f"{c['venv_bytes'] / 1e6:.0f} MB" if c.get("venv_bytes") else ""
        out.append(f'<tr><td><code>{e(c["id"])}</code></td><td>{e(_versions(c))}</td>'
                   f'<td class="s" style="background:{COLOR[c["status"]]}">{e(c["status"])}</td>'
                   f'<td>{_html_counts(c)}</td><td>{c.get("duration_s", 0):.0f}s</td><td>{e(venv)}</td>'
                   f'<td><small>{e((c.get("message") or "")[:300])}</small></td></tr>')
    out.append('</table>')
    labels, rows = _rows(summary)
    notable, quiet = split_rows(labels, rows)
    head = '<tr><th>check</th>' + "".join(f'<th><code>{e(c["id"])}</code></th>' for c in cells) + '</tr>'

    def html_row(label: str) -> str:
        tds = []
        for c in cells:
            k = rows[label].get(c["id"])
            if k is None:
                tds.append('<td class="s">·</td>' if c["status"] in ("pass", "fail") else '<td></td>')
                continue
            hl = headline(k)
            tip = e((k.get("message") or "")[:400])
            tds.append(f'<td class="s" style="background:{COLOR[k["status"]]}" title="{tip}">{e(k["status"])}'
                       + (f'<br/><small>{e(hl)}</small>' if hl else "") + '</td>')
        return f'<tr><td>{e(label)}</td>{"".join(tds)}</tr>'

    if labels:
        out.append('<h2>Checks × cells</h2>')
        out.append(f'<p>{len(notable)} check(s) with a failure, unexpected pass, finding or expected failure in some '
                   f'cell (worst first); {len(quiet)} pass or skip everywhere (collapsed below).</p>')
        if notable:
            out += ['<table>', head, *(html_row(label) for label in notable), '</table>']
        if quiet:
            out += [f'<details><summary>{len(quiet)} checks that pass or skip in every cell</summary><table>', head,
                    *(html_row(label) for label in quiet), '</table></details>']
        out.append('<p>' + " ".join(f'<span style="background:{COLOR[s]};padding:1px 6px">{s}</span>'
                                    for s in CHECK_STATUSES) + ' · <code>·</code> not run in this cell</p>')
    base = summary.get("baseline")
    if base:
        out.append(f'<h2>Against baseline <code>{e(str(base.get("run_id")))}</code></h2>')
        for key, title in (("regressions", "Regressions"), ("fixes", "Fixes"), ("new_failures", "New failures"),
                           ("removed", "Removed checks")):
            out.append(f'<h3>{title} ({len(base[key])})</h3>')
            if base[key]:
                out.append("<ul>" + "".join(f'<li><code>{e(d["cell"])}</code> {e(d["check"])}: {e(str(d["was"]))}'
                                            f' → {e(str(d["now"]))}</li>' for d in base[key]) + "</ul>")
    errs = [c for c in cells if c["status"] in ("error", "unreleased", "skipped")]
    if errs:
        out.append('<h2>Cells that did not run to completion</h2>')
        for c in errs:
            out.append(f'<h3><code>{e(c["id"])}</code> {e(c["status"])}</h3><div class="msg">{e(c.get("message", ""))}'
                       '</div>')
            if c["status"] == "error" and c.get("log_tail"):
                out.append(f'<details><summary>log tail</summary><div class="msg">{e(c["log_tail"])}</div></details>')
    for status, title in (("fail", "Failures"), ("xpass", "Unexpected passes (stale known-broken entries)"),
                          ("finding", "Findings"), ("xfail", "Known broken (expected failures)")):
        items = [(c, k) for c in cells for k in c.get("checks", []) if k["status"] == status]
        if not items:
            continue
        out.append(f'<h2>{title} ({len(items)})</h2>')
        for c, k in items:
            metrics = ", ".join(metric_text(k, m) for m in k.get("metrics", {}))
            out.append(f'<h3><code>{e(c["id"])}</code> {e(check_label(k))}</h3><p><small>{e(k.get("node_id") or "")}'
                       f'</small>{(" — " + e(metrics)) if metrics else ""}</p>')
            if k.get("message"):
                out.append(f'<div class="msg">{e(k["message"])}</div>')
            if k.get("details") and status in ("fail", "xpass"):
                out.append(f'<details><summary>details</summary><div class="msg">{e(k["details"])}</div></details>')
    plotted = [(c, k) for c in cells for k in c.get("checks", []) if k.get("plots")]
    if plotted:
        out.append('<h2>Plots</h2>')
        for label in labels:
            figs = [(c, p) for c, k in plotted for p in k["plots"] if rows[label].get(c["id"]) is k]
            if not figs:
                continue
            out.append(f'<h3>{e(label)}</h3><div class="plots">')
            out += [f'<figure>{svg_plot(p)}<figcaption><code>{e(c["id"])}</code> {e(p["title"])}</figcaption></figure>'
                    for c, p in figs]
            out.append('</div>')
    out += ['</body>', '</html>']
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------- write

def new_run_id(matrix_name: str) -> str:
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{matrix_name}"


def write_report(summary: dict[str, Any], run_dir: Path, *, latest: Path | None = None) -> dict[str, Path]:
    """Write summary.json / summary.md / index.html into ``run_dir``; point ``latest`` (a symlink) at it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": run_dir / "summary.json", "md": run_dir / "summary.md", "html": run_dir / "index.html"}
    paths["json"].write_text(json.dumps(summary, indent=1, default=str) + "\n")
    paths["md"].write_text(render_markdown(summary))
    paths["html"].write_text(render_html(summary))
    if latest is not None:
        tmp = latest.with_name(latest.name + ".tmp")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(os.path.relpath(run_dir.resolve(), latest.parent.resolve()), tmp)
        os.replace(tmp, latest)
    return paths
