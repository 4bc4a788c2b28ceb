"""The harness's records, defined once: a *check* (one test in one cell) and a *cell* (one matrix cell's run), their
statuses, and the comparison of a run with a baseline.

Writers and readers all go through this module: the pytest plugin builds check records (``check_record``), the
runner builds the cell record (``cell_record``) and folds the plugin's stream into it, the report and ``harness.cli
merge`` read cell records and baselines back (``validate_cell``) and compare them (``compare``). On disk and in
``summary.json`` a record is the plain dict of its dataclass below (schema in ``reports/README.md``).

Check statuses: ``pass | fail | xfail | xpass | skip | finding``; ``fail`` and ``xpass`` are unexpected (they fail
the gate). Cell statuses: ``pass | fail | error | unreleased | skipped``.

Identity (the key of the baseline comparison): ``(cell id, node id)``; a check without a node id (none today) falls
back to its label ``name [family] [variant]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.matrix import Retired

CHECK_STATUSES = ("pass", "fail", "xfail", "xpass", "skip", "finding")
UNEXPECTED = ("fail", "xpass")                # fail the gate
GOOD = ("pass", "finding", "xfail")           # a baseline status that turns into an unexpected one is a regression
FIXED = ("pass", "finding")                   # an unexpected baseline status that turns into one of these is a fix
TESTED = ("pass", "fail", "xfail", "xpass", "finding")   # the test ran (a `skip` did not)

CELL_STATUSES = ("pass", "fail", "error", "unreleased", "skipped")
CELL_RAN = ("pass", "fail")                   # cells whose test phase ran to its end

ABSENT = "absent"                             # the `now` of a check that vanished since the baseline

# Threshold operators of a check's metrics (``threshold = {key: {"op": op, "value": number}}``).
OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda v, t: v <= t,
    "<": lambda v, t: v < t,
    ">=": lambda v, t: v >= t,
    ">": lambda v, t: v > t,
    "==": lambda v, t: v == t,
}

# A cell id (and each axis-value id it is made of): used as a file and directory name, so nothing path-like.
ID_PATTERN = re.compile(r"[A-Za-z0-9._+-]+")


class RecordError(ValueError):
    """A record (cell file, check line, baseline) is malformed; the message names where and which key."""


def id_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a cell id (or an axis-value id), or None when it can."""
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__} {value!r}"
    if not value:
        return "must not be empty"
    if not ID_PATTERN.fullmatch(value):
        return f"{value!r} may hold only letters, digits, '.', '_', '+' and '-' (no '/', no spaces)"
    if set(value) == {"."}:
        return f"{value!r} is path-like"
    return None


def json_number(value: float) -> float | str:
    """A float as JSON can carry it: non-finite values become the strings NaN / Infinity / -Infinity."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


# ----------------------------------------------------------------------------------------------- the records

@dataclass
class Check:
    """One test in one cell (setup + call + teardown folded); written by ``harness/pytest_plugin.py``."""

    name: str
    status: str
    node_id: str = ""
    family: str | None = None
    variant: str | None = None
    metrics: dict[str, float | str] = field(default_factory=dict)
    threshold: dict[str, dict[str, Any]] = field(default_factory=dict)
    plots: list[dict[str, Any]] = field(default_factory=list)
    properties: dict[str, str] = field(default_factory=dict)
    message: str = ""
    details: str = ""
    duration_s: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in CHECK_STATUSES:
            raise RecordError(f"status: {self.status!r} is not one of {', '.join(CHECK_STATUSES)}")
        for key, t in self.threshold.items():
            if not isinstance(t, dict) or t.get("op") not in OPS or "value" not in t:
                raise RecordError(f"threshold.{key}: expected {{op: one of {' '.join(OPS)}, value: number}}, got {t!r}")


@dataclass
class Cell:
    """One matrix cell's run: written by ``harness/runner.py`` as ``cells/<id>.json``, merged by the report."""

    id: str
    status: str
    matrix: str = ""
    specs: dict[str, Any] = field(default_factory=dict)
    axis_ids: dict[str, str] = field(default_factory=dict)
    resolved: dict[str, str] = field(default_factory=dict)
    message: str = ""
    started: str | None = None
    finished: str | None = None
    duration_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    venv: str | None = None
    venv_bytes: int | None = None
    venv_reused: bool | None = None
    installer: str | None = None
    freeze: list[str] = field(default_factory=list)
    installed: dict[str, str | None] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    known: list[dict[str, Any]] = field(default_factory=list)
    known_unused: list[dict[str, Any]] = field(default_factory=list)
    pytest_exit: int | None = None
    log: str = ""
    log_tail: str = ""
    host: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problem = id_problem(self.id)
        if problem:
            raise RecordError(f"id: {problem}")
        if self.status not in CELL_STATUSES:
            raise RecordError(f"status: {self.status!r} is not one of {', '.join(CELL_STATUSES)}")


CHECK_FIELDS = tuple(f.name for f in dataclasses.fields(Check))
CELL_FIELDS = tuple(f.name for f in dataclasses.fields(Cell))


def check_record(**fields: Any) -> dict[str, Any]:
    """A check record as a dict (every field present; unknown or mistyped fields raise ``RecordError``)."""
    return _from_mapping(Check, fields, "check", strict=True)


def cell_record(**fields: Any) -> dict[str, Any]:
    """A cell record as a dict (every field present; its checks validated)."""
    return validate_cell(fields, "cell")


def validate_check(data: Any, where: str, *, strict: bool = True) -> dict[str, Any]:
    """``data`` checked against ``Check`` and completed with defaults; ``strict`` also refuses unknown keys."""
    return _from_mapping(Check, data, where, strict=strict)


def validate_cell(data: Any, where: str, *, strict: bool = True) -> dict[str, Any]:
    """``data`` checked against ``Cell`` (and each of its checks) and completed with defaults.

    ``strict=False`` is for baselines written by an older harness: unknown keys are ignored, missing ones defaulted.
    """
    rec = _from_mapping(Cell, data, where, strict=strict)
    rec["checks"] = [validate_check(k, f"{where}: checks[{i}]", strict=strict) for i, k in enumerate(rec["checks"])]
    return rec


def _type_ok(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if origin is not None:
        return isinstance(value, origin)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "") if typing.get_origin(hint) else getattr(hint, "__name__", str(hint))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_mapping(cls: type, data: Any, where: str, *, strict: bool) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise RecordError(f"{where}: expected a JSON object, got {type(data).__name__}")
    hints = _hints(cls)
    if strict:
        unknown = sorted(set(data) - set(hints))
        if unknown:
            raise RecordError(f"{where}: unknown key(s) {unknown} (a {cls.__name__.lower()} record has "
                              f"{', '.join(hints)})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"{where}: missing key `{f.name}`")
            continue
        value = data[f.name]
        if not _type_ok(value, hints[f.name]):
            raise RecordError(f"{where}.{f.name}: expected {_type_name(hints[f.name])}, got "
                              f"{type(value).__name__} {str(value)[:80]!r}")
        kwargs[f.name] = value
    try:
        obj = cls(**kwargs)
    except RecordError as exc:
        raise RecordError(f"{where}.{exc}") from exc
    return dataclasses.asdict(obj)


# ----------------------------------------------------------------------------------------------- identity

def check_label(check: Mapping[str, Any]) -> str:
    """Row label of a check: ``name [family] [variant]``."""
    parts = [check["name"]]
    for key in ("family", "variant"):
        if check.get(key):
            parts.append(f"[{check[key]}]")
    return " ".join(parts)


def check_key(cell_id: str, check: Mapping[str, Any]) -> tuple[str, str]:
    """The identity of a check across runs: (cell id, node id), or the label when there is no node id."""
    return cell_id, check.get("node_id") or check_label(check)


def cell_status(checks: Iterable[Mapping[str, Any]]) -> str:
    """``fail`` when some check is unexpected, else ``pass`` (for a cell whose test phase ran to its end)."""
    return "fail" if any(c["status"] in UNEXPECTED for c in checks) else "pass"


def tested_count(cells: Iterable[Mapping[str, Any]]) -> int:
    """How many checks actually ran a test (any status but ``skip``) over ``cells``."""
    return sum(1 for c in cells for k in c.get("checks", []) if k["status"] in TESTED)


# ----------------------------------------------------------------------------------------------- comparison

COMPARISON_KEYS = ("regressions", "fixes", "new_failures", "removed", "added", "missing_cells", "retired_unused")


def _item(cell: str, check: str, node_id: str, was: str | None, now: str | None, message: str = "") -> dict[str, Any]:
    return {"cell": cell, "check": check, "node_id": node_id, "was": was, "now": now, "message": message}


def compare(current: list[dict[str, Any]], baseline: list[dict[str, Any]],
            retired: Iterable[Retired] = ()) -> dict[str, list[dict[str, Any]]]:
    """Compare the cells of a run with those of a baseline run.

    * ``regressions``: a check good in the baseline (pass/finding/xfail) that is unexpected now (fail/xpass); a
      check of the baseline *absent* now in a cell that ran its tests (``now = "absent"``) unless a ``[[retired]]``
      entry of the matrix file (``harness.matrix.Retired``) matches it; a cell that errors now and did not; a cell
      that ran its tests in the baseline and is ``unreleased`` now (its versions vanished from the index).
    * ``fixes``: unexpected -> pass/finding; an error cell that runs its tests again.
    * ``new_failures``: checks absent from the baseline that are unexpected now; ``added``: the other new checks.
    * ``removed``: vanished checks a ``retired`` declaration matches (``message`` = its reason), and cells that
      ran in the baseline and are ``skipped`` now (a declared ``[[incompatible]]`` entry).
    * ``missing_cells``: baseline cells that are not in this run at all (``--cells`` narrowed it, or a merge got
      fewer cell files): not compared, so their checks are *not* counted as vanished.
    * ``retired_unused``: declarations that matched no vanished check (stale: remove them).
    """
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in COMPARISON_KEYS}
    retired = list(retired)
    used: set[int] = set()
    base_cells = {c["id"]: c for c in baseline}
    for cell in current:
        cid = cell["id"]
        old_cell = base_cells.get(cid)
        old_checks = {check_key(cid, k): k for k in (old_cell or {}).get("checks", [])}
        now_checks = {check_key(cid, k): k for k in cell.get("checks", [])}
        for key, chk in now_checks.items():
            old = old_checks.get(key)
            before = None if old is None else old["status"]
            if old is None:
                bucket = "new_failures" if chk["status"] in UNEXPECTED else "added"
            elif before in GOOD and chk["status"] in UNEXPECTED:
                bucket = "regressions"
            elif before in UNEXPECTED and chk["status"] in FIXED:
                bucket = "fixes"
            else:
                continue
            out[bucket].append(_item(cid, check_label(chk), key[1], before, chk["status"], chk.get("message", "")))
        if old_cell is None:
            continue
        was, now = old_cell["status"], cell["status"]
        if now in CELL_RAN:
            for key, chk in old_checks.items():
                if key in now_checks:
                    continue
                hit = next((i for i, r in enumerate(retired) if r.matches(cid, chk)), None)
                if hit is None:
                    out["regressions"].append(_item(cid, check_label(chk), key[1], chk["status"], ABSENT,
                                                    "vanished: in the baseline, not in this run (declare a removal "
                                                    "with a [[retired]] entry in the matrix file)"))
                else:
                    used.add(hit)
                    out["removed"].append(_item(cid, check_label(chk), key[1], chk["status"], ABSENT,
                                                f"retired: {retired[hit].reason}"))
        if now == "error" and was != "error":
            out["regressions"].append(_item(cid, "(cell)", "", was, now, cell.get("message", "")))
        elif now == "unreleased" and was in CELL_RAN:
            out["regressions"].append(_item(cid, "(cell)", "", was, now, cell.get("message", "")))
        elif now == "skipped" and was in CELL_RAN:
            out["removed"].append(_item(cid, "(cell)", "", was, now, cell.get("message", "")))
        elif was == "error" and now in CELL_RAN:
            out["fixes"].append(_item(cid, "(cell)", "", was, now))
    current_ids = {c["id"] for c in current}
    out["missing_cells"] = [{"cell": c["id"], "was": c["status"], "checks": len(c.get("checks", []))}
                            for c in baseline if c["id"] not in current_ids]
    out["retired_unused"] = [r.describe() for i, r in enumerate(retired) if i not in used]
    return out
