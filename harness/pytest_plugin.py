"""pytest plugin of moe-compat: every test becomes a *check* of the matrix report.

Load it with ``-p harness.pytest_plugin`` (the nox sessions ``tests``, ``matrix`` and ``cell(...)`` do). It

* registers ``--quick`` (tests marked ``slow`` are skipped; tests may also read the ``quick`` fixture or
  ``request.config.getoption("quick")`` to shrink their own work) and ``--moe-results PATH``;
* records each test as a check (``harness.records.Check``: ``{name, family, variant, status, metrics, threshold,
  plots, message, ...}``, status ``pass | fail | xfail | xpass | skip | finding``), streamed as JSON lines to ``--moe-results``
  (or ``$MOE_COMPAT_RESULTS``) so that a crash of the interpreter still leaves the finished checks behind;
* applies the matrix's known-broken entries (``[[known]]`` in ``matrices/*.toml``) that hold for the current cell
  (``$MOE_COMPAT_CELL``, matrix ``$MOE_COMPAT_MATRIX``, default ``matrices/default.toml``) and the transformers/PEFT
  versions actually installed: ``expect = "xfail"`` turns a failure into ``xfail`` and a *pass* into ``xpass``
  (strict: reported as a failure so that a stale entry surfaces); ``expect = "skip"`` skips the test.

The ``moe_check`` fixture (the API for test authors)
----------------------------------------------------
::

    def test_loss_parity(moe_check, family):            # `family` / `variant` params are picked up automatically
        moe_check.set(name="loss_parity", variant="nf4") # optional; default name = function name minus "test_"
        moe_check.metric("steps", 20)                    # a number for the report, no threshold
        moe_check.require("max_rel_diff", rel, 0.05)     # record + assert  rel <= 0.05  (op="<=" by default)
        moe_check.metric("sqnr_db", sqnr, threshold=25, op=">=")   # record with a threshold, no assert
        moe_check.plot("loss", {"bf16": bf16_losses, "nf4": nf4_losses})   # series of numbers -> inline SVG
        moe_check.finding("PEFT 0.19.0 applies ΔW transposed for GPT-OSS on v5; ...")  # status `finding`

* Defaults: name = function name minus ``test_`` (or ``@pytest.mark.moe_name("...")``); family = the ``family``
  parameter; variant = the ``variant`` parameter and every other parameter joined with ``-`` (e.g. ``2i_eq_h-eager``).
* ``set(name=None, family=None, variant=None)`` — name the check. Names are what ``[[known]].checks`` globs match
  (together with the node id), e.g. ``oracle_peft_reload``, ``impl_nf4_forward``, ``loss_parity``.
* ``metric(key, value, threshold=None, op="<=")`` — record a number (python/numpy/0-d torch value); returns it as
  float. ``op`` is one of ``<= < >= > ==``; the threshold is printed next to the value in the report.
* ``require(key, value, threshold, op="<=", msg=None)`` — ``metric`` + ``assert``; the failure message names the
  metric, the value, the threshold and ``msg``.
* ``plot(title, series, x=None, xlabel="step", ylabel="")`` — ``series`` maps a label to a list of numbers (same
  length as ``x`` when ``x`` is given). Keep it short (the report embeds it): a few hundred points at most.
* ``finding(explanation)`` — the test passed but documents upstream behaviour worth reading (a paragraph); the
  check's status becomes ``finding`` (not a failure).
* ``note(text)`` — an extra line in the check's message.
* pytest's own ``record_property(key, value)`` also lands in the check: numbers as metrics, others in
  ``properties``.
* read-only: ``cell`` (the matrix cell id or None), ``quick`` (bool), ``versions`` (installed transformers/peft/
  torch/bitsandbytes/accelerate versions, from package metadata).

A check's ``metrics`` are ``{key: number}``; ``threshold`` is ``{key: {"op": "<=", "value": number}}``; non-finite
numbers are written as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from harness.records import OPS, check_record, json_number

_MAX_MESSAGE = 2000
_MAX_DETAILS = 6000
_MAX_PLOT_POINTS = 2000

_check_key = pytest.StashKey["MoeCheck"]()
_reports_key = pytest.StashKey[dict]()


def _json_plot(plot: dict[str, Any]) -> dict[str, Any]:
    return {**plot, "series": {k: [json_number(v) for v in vals] for k, vals in plot["series"].items()},
            "x": None if plot["x"] is None else [json_number(v) for v in plot["x"]]}


def _as_float(key: str, value: Any) -> float:
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalars and 0-d tensors
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"moe_check: value of {key!r} must be a real number, got {type(value).__name__}: {value!r}")
    return float(value)


class MoeCheck:
    """Per-test recorder behind the ``moe_check`` fixture (see the module docstring for the API)."""

    def __init__(self, *, cell: str | None, quick: bool, versions: dict[str, str | None]):
        self.name: str | None = None
        self.family: str | None = None
        self.variant: str | None = None
        self.metrics: dict[str, float] = {}
        self.threshold: dict[str, dict[str, Any]] = {}
        self.plots: list[dict[str, Any]] = []
        self.explanation: str | None = None
        self.notes: list[str] = []
        self.cell = cell
        self.quick = quick
        self.versions = versions

    def set(self, *, name: str | None = None, family: str | None = None, variant: str | None = None) -> MoeCheck:
        """Name the check and/or set its family and variant (each argument left None is unchanged)."""
        if name is not None:
            self.name = str(name)
        if family is not None:
            self.family = str(family)
        if variant is not None:
            self.variant = str(variant)
        return self

    def metric(self, key: str, value: Any, *, threshold: Any = None, op: str = "<=") -> float:
        """Record number ``value`` under ``key`` (optionally with its threshold); return it as a float."""
        v = _as_float(key, value)
        self.metrics[key] = v
        if threshold is not None:
            if op not in OPS:
                raise ValueError(f"moe_check: op for {key!r} must be one of {sorted(OPS)}, got {op!r}")
            self.threshold[key] = {"op": op, "value": _as_float(f"{key} threshold", threshold)}
        return v

    def require(self, key: str, value: Any, threshold: Any, *, op: str = "<=", msg: str | None = None) -> float:
        """Record ``value`` with its threshold and assert ``value op threshold`` (NaN never satisfies it)."""
        v = self.metric(key, value, threshold=threshold, op=op)
        t = self.threshold[key]["value"]
        if not OPS[op](v, t):
            extra = f": {msg}" if msg else ""
            raise AssertionError(f"{key} = {v:.6g} violates threshold {op} {t:.6g}{extra}")
        return v

    def plot(self, title: str, series: dict[str, Any], *, x: Any = None, xlabel: str = "step", ylabel: str = "") -> None:
        """Record named series of numbers (e.g. loss curves) for an inline SVG chart in the report."""
        if not isinstance(series, dict) or not series:
            raise TypeError(f"moe_check.plot({title!r}): series must be a non-empty dict label -> list of numbers")
        out: dict[str, list[float]] = {}
        for label, values in series.items():
            vals = [_as_float(f"{title}/{label}[{i}]", v) for i, v in enumerate(list(values))]
            if len(vals) > _MAX_PLOT_POINTS:
                raise ValueError(f"moe_check.plot({title!r}): series {label!r} has {len(vals)} points (max {_MAX_PLOT_POINTS})")
            out[str(label)] = vals
        xs = None
        if x is not None:
            xs = [_as_float(f"{title}/x[{i}]", v) for i, v in enumerate(list(x))]
            bad = [k for k, v in out.items() if len(v) != len(xs)]
            if bad:
                raise ValueError(f"moe_check.plot({title!r}): series {bad} differ in length from x ({len(xs)})")
        self.plots.append({"title": str(title), "series": out, "x": xs, "xlabel": xlabel, "ylabel": ylabel})

    def finding(self, explanation: str) -> None:
        """Mark the (passing) check as a finding; ``explanation`` is a paragraph shown in the report."""
        if not explanation or not str(explanation).strip():
            raise ValueError("moe_check.finding() needs a non-empty explanation")
        self.explanation = str(explanation).strip()

    def note(self, text: str) -> None:
        """Add a line to the check's message."""
        self.notes.append(str(text))


# ----------------------------------------------------------------------------------------------- options

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("moe-compat")
    group.addoption("--quick", action="store_true", default=False,
                    help="moe-compat: smaller/faster checks; tests marked `slow` are skipped")
    group.addoption("--moe-results", default=os.environ.get("MOE_COMPAT_RESULTS"), metavar="PATH",
                    help="moe-compat: write one JSON line per check to PATH (default $MOE_COMPAT_RESULTS)")


def _installed_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("transformers", "peft", "torch", "bitsandbytes", "accelerate"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


class _State:
    """Per-session plugin state: known entries in force, the results stream, finished records."""

    def __init__(self, config: pytest.Config):
        from harness import matrix as mx

        self.cell = os.environ.get("MOE_COMPAT_CELL") or None
        self.quick = bool(config.getoption("quick"))
        self.versions = _installed_versions()
        matrix_path = os.environ.get("MOE_COMPAT_MATRIX") or str(mx.MATRICES_DIR / "default.toml")
        self.matrix_path = matrix_path
        if os.environ.get("MOE_COMPAT_KNOWN", "on") == "off":
            self.known = []
        else:
            self.known = mx.load_matrix(matrix_path).known_for(self.cell, self.versions)
        self.used_known: set[int] = set()
        path = config.getoption("moe_results")
        self.stream = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.stream = open(path, "a", buffering=1)  # noqa: SIM115 - closed in pytest_unconfigure
            self.emit({"event": "session", "cell": self.cell, "matrix": matrix_path, "versions": self.versions,
                       "quick": self.quick, "pid": os.getpid(), "known": [k.describe() for k in self.known]})
        self.records: list[dict[str, Any]] = []

    def emit(self, obj: dict[str, Any]) -> None:
        if self.stream is not None:
            self.stream.write(json.dumps(obj, default=str, allow_nan=False) + "\n")
            self.stream.flush()


_state_key = pytest.StashKey[_State]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "moe_name(name): name the check of this test (default: function name)")
    config.stash[_state_key] = _State(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_state_key, None)
    if state is not None and state.stream is not None:
        state.stream.close()


# ----------------------------------------------------------------------------------------------- naming

def _param_str(value: Any) -> str | None:
    if isinstance(value, str | int | float | bool):
        return str(value)
    name = getattr(value, "name", None) or getattr(value, "__name__", None)
    return str(name) if name is not None else None


def _static_identity(item: pytest.Item) -> tuple[str, str | None, str | None]:
    """Name, family and variant known at collection time (before the test can call ``moe_check.set``)."""
    mark = item.get_closest_marker("moe_name")
    func = getattr(item, "originalname", None) or item.name.split("[", 1)[0]
    name = str(mark.args[0]) if mark and mark.args else (func[5:] if func.startswith("test_") else func)
    family = variant = None
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        params = callspec.params
        if "family" in params:
            family = _param_str(params["family"])
        parts = [params["variant"]] if "variant" in params else []
        parts += [v for k, v in params.items() if k not in ("family", "variant")]
        texts = [_param_str(v) for v in parts]
        if parts:
            variant = "-".join(texts) if all(t is not None for t in texts) else callspec.id
        if family is None and "family" in params:
            family = callspec.id
    return name, family, variant


def _identity(item: pytest.Item) -> tuple[str, str | None, str | None]:
    name, family, variant = _static_identity(item)
    chk = item.stash.get(_check_key, None)
    if chk is not None:
        name = chk.name or name
        family = chk.family or family
        variant = chk.variant or variant
    return name, family, variant


def _match(state: _State, item: pytest.Item, name: str, family: str | None, variant: str | None, expect: str):
    for i, entry in enumerate(state.known):
        if entry.expect == expect and entry.matches_check(name=name, node_id=item.nodeid, family=family,
                                                          variant=variant):
            return i, entry
    return None, None


# ----------------------------------------------------------------------------------------------- hooks

def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    state = config.stash[_state_key]
    for item in items:
        if state.quick and item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.skip(reason="slow test skipped by --quick"))
        name, family, variant = _static_identity(item)
        idx, entry = _match(state, item, name, family, variant, "skip")
        if entry is not None:
            state.used_known.add(idx)
            item.add_marker(pytest.mark.skip(reason=f"known broken in this cell: {entry.reason} ({entry.link})"))


@pytest.fixture
def moe_check(request: pytest.FixtureRequest) -> MoeCheck:
    """Recorder for this test's check: name/family/variant, metrics, thresholds, plots, findings."""
    state = request.config.stash[_state_key]
    chk = MoeCheck(cell=state.cell, quick=state.quick, versions=dict(state.versions))
    request.node.stash[_check_key] = chk
    return chk


@pytest.fixture
def quick(request: pytest.FixtureRequest) -> bool:
    """True under ``--quick``: run the smaller variant of a check."""
    return bool(request.config.getoption("quick"))


def pytest_runtest_logstart(nodeid: str, location: tuple) -> None:
    """Stream a start event so that a crash mid-test names the test that was running."""
    cfg = _CONFIG.get("config")
    if cfg is not None:
        cfg.stash[_state_key].emit({"event": "start", "node_id": nodeid, "t": time.time()})


_CONFIG: dict[str, pytest.Config] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    _CONFIG["config"] = session.config
    _ITEMS.clear()


def _error_text(call: pytest.CallInfo) -> str:
    if call.excinfo is None:
        return ""
    return f"{call.excinfo.typename}: {call.excinfo.value}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Apply ``expect = "xfail"`` known entries after the test ran (runtime check names are known by then)."""
    rep = yield
    if rep.when != "call" or hasattr(rep, "wasxfail"):
        return rep
    state = item.config.stash[_state_key]
    name, family, variant = _identity(item)
    idx, entry = _match(state, item, name, family, variant, "xfail")
    if entry is None:
        return rep
    state.used_known.add(idx)
    where = f"{entry.reason} ({entry.link})"
    if rep.failed:
        text = _error_text(call)
        if entry.match and not re.search(entry.match, text, re.S):
            rep.sections.append(("moe-compat known entry", f"a known entry expects a failure matching "
                                 f"{entry.match!r} ({where}); this failure does not match: {text[:500]}"))
            return rep
        rep.outcome = "skipped"
        rep.wasxfail = f"known broken: {where}; failed with {text[:500]}"
    elif rep.passed:
        rep.outcome = "failed"
        rep.longrepr = (f"[XPASS(strict)] known-broken entry no longer fails (stale entry? remove or narrow it in "
                        f"{state.matrix_path}): {where}")
    return rep


def _crash_message(rep: pytest.TestReport) -> str:
    crash = getattr(rep.longrepr, "reprcrash", None)
    if crash is not None and getattr(crash, "message", None):
        return str(crash.message)
    if isinstance(rep.longrepr, tuple) and len(rep.longrepr) == 3:  # skip: (path, lineno, reason)
        return str(rep.longrepr[2])
    return rep.longreprtext.strip().splitlines()[-1] if rep.longreprtext.strip() else ""


def _status(reports: dict[str, pytest.TestReport], chk: MoeCheck | None) -> tuple[str, str]:
    """Fold the setup/call/teardown reports of one test into (status, message)."""
    setup, call, teardown = reports.get("setup"), reports.get("call"), reports.get("teardown")
    status, message = "pass", ""
    for rep in (setup, call):
        if rep is None:
            continue
        if hasattr(rep, "wasxfail"):
            if rep.skipped:
                status, message = "xfail", rep.wasxfail or "expected failure"
            else:
                status, message = "xpass", f"passed but expected to fail: {rep.wasxfail}"
            break
        if rep.failed:
            text = rep.longreprtext if isinstance(rep.longrepr, str) else _crash_message(rep)
            if isinstance(rep.longrepr, str) and rep.longrepr.startswith("[XPASS(strict)]"):
                status, message = "xpass", rep.longrepr
            else:
                where = "" if rep.when == "call" else f"error in {rep.when}: "
                status, message = "fail", where + text
            break
        if rep.skipped:
            status, message = "skip", _crash_message(rep)
            break
    if status == "pass" and teardown is not None and teardown.failed:
        status, message = "fail", "error in teardown: " + _crash_message(teardown)
    if status == "pass" and chk is not None and chk.explanation:
        status, message = "finding", chk.explanation
    if chk is not None and chk.notes:
        message = "\n".join([message, *chk.notes]).strip()
    return status, message[:_MAX_MESSAGE]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    cfg = _CONFIG.get("config")
    if cfg is None:
        return
    state = cfg.stash[_state_key]
    pending = cfg.stash.setdefault(_reports_key, {})
    pending.setdefault(report.nodeid, {})[report.when] = report
    if report.when != "teardown":
        return
    reports = pending.pop(report.nodeid)
    item = _ITEMS.get(report.nodeid)
    chk = item.stash.get(_check_key, None) if item is not None else None
    if item is not None:
        name, family, variant = _identity(item)
    else:
        name, family, variant = report.nodeid.split("::")[-1].split("[")[0], None, None
    status, message = _status(reports, chk)
    metrics = dict(chk.metrics) if chk else {}
    properties: dict[str, str] = {}
    for key, value in report.user_properties:  # `record_property(...)` values: numbers become metrics
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics.setdefault(str(key), float(value))
        else:
            properties[str(key)] = str(value)[:500]
    details = ""
    for rep in reports.values():
        if rep.failed:
            details += rep.longreprtext[-_MAX_DETAILS:]
    record = check_record(
        name=name, family=family, variant=variant, status=status,
        metrics={k: json_number(v) for k, v in metrics.items()}, properties=properties,
        threshold={k: {"op": t["op"], "value": json_number(t["value"])}
                   for k, t in (chk.threshold if chk else {}).items()},
        plots=[_json_plot(p) for p in (chk.plots if chk else [])],
        message=message, details=details[-_MAX_DETAILS:], node_id=report.nodeid,
        duration_s=round(sum(r.duration for r in reports.values()), 4),
    )
    state.records.append(record)
    state.emit({"event": "check", **record})


_ITEMS: dict[str, pytest.Item] = {}


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:
        _ITEMS[item.nodeid] = item


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if not report.failed:
        return
    cfg = _CONFIG.get("config")
    if cfg is None:
        return
    text = report.longreprtext
    record = check_record(name=f"collect:{report.nodeid or 'session'}", status="fail", node_id=report.nodeid,
                          message=("collection error: " + text.strip().splitlines()[-1] if text.strip()
                                   else "collection error")[:_MAX_MESSAGE], details=text[-_MAX_DETAILS:])
    state = cfg.stash[_state_key]
    state.records.append(record)
    state.emit({"event": "check", **record})


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash[_state_key]
    unused = [k.describe() for i, k in enumerate(state.known) if i not in state.used_known]
    state.emit({"event": "finish", "exitstatus": int(exitstatus), "checks": len(state.records),
                "known_unused": unused, "t": time.time()})

