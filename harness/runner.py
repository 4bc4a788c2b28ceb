"""Running matrix cells: resolve -> install -> probe -> test, one venv per cell, results as one JSON file per cell.

A cell never takes the run down: an unresolvable spec gives ``unreleased``; an install failure, an install or test
timeout, an interpreter crash (segfault, OOM kill), an undeclared import failure, a test phase that collects no test,
or an unforeseen exception inside the harness give ``error`` with the cause and the log tail; the other cells
still run. Per cell the run directory receives

* ``cells/<id>.json`` — the cell record (fields: ``harness.records.Cell``), the unit that ``harness.cli merge``
  combines (written atomically: a temporary file renamed into place);
* ``logs/<id>.log`` — pip and pytest output; ``results/<id>.jsonl`` — the plugin's stream of check events.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from packaging.version import InvalidVersion, Version

from harness import envs
from harness.matrix import CellSpec, Matrix, ResolveError, VersionSource, resolve_cell
from harness.records import UNEXPECTED, RecordError, cell_record, cell_status, check_record, validate_check

ROOT = envs.ROOT
CELLS_ENVS_DIR = envs.ENVS_DIR / "cells"
LOG_TAIL_LINES = 40

BuildEnv = Callable[..., envs.CellEnv]

_PROBE = r"""
import importlib, importlib.metadata as md, json, sys
out = {"versions": {}, "import_errors": {}}
for dist in sys.argv[1].split(","):
    try:
        out["versions"][dist] = md.version(dist)
    except md.PackageNotFoundError:
        out["versions"][dist] = None
for mod in sys.argv[2].split(","):
    try:
        importlib.import_module(mod)
    except Exception as exc:  # reported to the runner, which turns it into the cell's status
        out["import_errors"][mod] = f"{type(exc).__name__}: {exc}"
print("MOE_PROBE " + json.dumps(out))
"""


@dataclass
class RunOptions:
    """Knobs of one run (CLI flags of ``harness.cli run``)."""

    quick: bool = False
    jobs: int = 2
    timeout_s: float | None = None          # test phase; None = the matrix's timeout_s
    install_timeout_s: float | None = None  # None = the matrix's install_timeout_s
    envs_dir: Path = CELLS_ENVS_DIR
    pytest_args: tuple[str, ...] = ()
    tests: tuple[str, ...] | None = None    # None = the matrix's tests
    env: dict[str, str] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)  # recorded in every cell record (merge reads it)


class Progress:
    """Line-oriented progress for a terminal or a CI log: phase changes, a heartbeat, a final table."""

    def __init__(self, stream: TextIO = sys.stderr, heartbeat_s: float = 30.0):
        self.stream = stream
        self.t0 = time.monotonic()
        self.state: dict[str, tuple[str, float]] = {}
        self.lock = threading.Lock()
        self.heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _print(self, text: str) -> None:
        with self.lock:
            self.stream.write(f"[matrix {time.monotonic() - self.t0:7.1f}s] {text}\n")
            self.stream.flush()

    def phase(self, cell: str, phase: str, detail: str = "") -> None:
        now = time.monotonic()
        prev = self.state.get(cell)
        took = f" (previous phase {prev[0]} took {now - prev[1]:.1f}s)" if prev else ""
        self.state[cell] = (phase, now)
        self._print(f"{cell}: {phase}{' - ' + detail if detail else ''}{took}")

    def done(self, cell: str, status: str, duration: float, message: str = "") -> None:
        self.state.pop(cell, None)
        first = message.strip().splitlines()[0][:160] if message.strip() else ""
        self._print(f"{cell}: {status.upper()} in {duration:.1f}s{' - ' + first if first else ''}")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            now = time.monotonic()
            running = ", ".join(f"{c} ({p}, {now - t:.0f}s)" for c, (p, t) in sorted(self.state.items()))
            if running:
                self._print(f"running: {running}")

    def __enter__(self) -> Progress:
        if self.heartbeat_s > 0:
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)


def host_info() -> dict[str, Any]:
    """Python, torch, bitsandbytes and the device of the base environment (shared by every cell)."""
    import platform
    from importlib import metadata

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    try:
        bnb = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        bnb = None
    return {"python": platform.python_version(), "torch": torch.__version__, "bitsandbytes": bnb,
            "device": device, "platform": platform.platform(), "cpus": os.cpu_count()}


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_results(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None, str | None, dict[str, Any] | None]:
    """Parse a plugin stream: (checks, session event, node id running when the stream ended, finish event).

    A line cut by a crash mid-write is skipped (the crash itself is reported from the exit status); a complete line
    that is not a valid check record becomes a ``fail`` check naming the line and the fault.
    """
    checks: list[dict[str, Any]] = []
    session = finish = running = None
    if not path.exists():
        return checks, session, running, finish
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        kind = ev.pop("event", None) if isinstance(ev, dict) else None
        if kind == "check":
            try:
                checks.append(validate_check(ev, f"{path.name}:{lineno}"))
            except RecordError as exc:
                checks.append(check_record(name="malformed_check_record", status="fail", node_id=f"{path}:{lineno}",
                                           message=f"the results stream has a malformed check record: {exc}"))
                continue
            if checks[-1]["node_id"] == running:
                running = None
        elif kind == "start" and isinstance(ev.get("node_id"), str):
            running = ev["node_id"]
        elif kind == "session":
            session = ev
        elif kind == "finish":
            finish = ev
    return checks, session, running, finish


def same_version(a: str | None, b: str | None) -> bool:
    """Equal as PEP 440 versions (``5.0`` == ``5.0.0``); strings that are no version compare as strings."""
    if a is None or b is None:
        return a == b
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


_ACTIVE: set[int] = set()  # process-group ids of running test phases (each cell's pytest is its own session)
_ACTIVE_LOCK = threading.Lock()


def kill_active() -> list[int]:
    """SIGKILL every running test phase's process group (on Ctrl-C / SIGTERM); returns the group ids."""
    with _ACTIVE_LOCK:
        groups = sorted(_ACTIVE)
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            continue  # already gone
    return groups


def _wait_with_rusage(proc: subprocess.Popen, timeout: float) -> tuple[int | None, float]:
    """Wait for ``proc`` (its own session) up to ``timeout`` s; on expiry kill its whole process group.

    Returns (exit code or None when killed on timeout, CPU seconds user+sys of the process). ``os.wait4`` gives
    the CPU time of this child alone, which tells the cell's own cost apart from the load of a shared machine.
    """
    deadline = time.monotonic() + timeout
    timed_out = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            break
        if time.monotonic() > deadline and not timed_out:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it exited between the poll and the kill; the next wait4 reaps it
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return (None if timed_out else proc.returncode), round(usage.ru_utime + usage.ru_stime, 2)


def run_cell(matrix: Matrix, cell: CellSpec, *, source: VersionSource, run_dir: Path, opts: RunOptions,
             build_env: BuildEnv = envs.ensure_env, progress: Progress | None = None) -> dict[str, Any]:
    """Run one cell through all phases and write ``run_dir/cells/<id>.json``; returns the record."""
    progress = progress or Progress(heartbeat_s=0)
    for sub in ("cells", "logs", "results"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    log = run_dir / "logs" / f"{cell.id}.log"
    results = run_dir / "results" / f"{cell.id}.jsonl"
    for stale in (log, results):
        stale.unlink(missing_ok=True)
    rec = cell_record(id=cell.id, status="error", matrix=matrix.name, specs=dict(cell.specs),
                      axis_ids=dict(cell.axis_ids), started=_now(), log=str(log), host=opts.host)
    t0 = time.monotonic()

    def finish(status: str, message: str = "") -> dict[str, Any]:
        rec["status"], rec["message"] = status, message
        rec["finished"], rec["duration_s"] = _now(), round(time.monotonic() - t0, 2)
        if status == "error":
            rec["log_tail"] = _tail(log)
        out = cell_record(**rec)
        target = run_dir / "cells" / f"{cell.id}.json"
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(out, indent=1, default=str) + "\n")
        os.replace(tmp, target)
        progress.done(cell.id, status, out["duration_s"], message)
        return out

    try:
        return _phases(matrix, cell, rec, finish, source=source, opts=opts, build_env=build_env, progress=progress,
                       log=log, results=results)
    except Exception as exc:  # noqa: BLE001 - not swallowed: recorded as this cell's `error` (fails the gate)
        # A bug or an unforeseen failure (disk, permissions) in one cell must not lose the other cells' results.
        with log.open("a") as f:
            f.write("harness error:\n" + traceback.format_exc())
        return finish("error", f"harness error in this cell: {type(exc).__name__}: {exc}")


def _phases(matrix: Matrix, cell: CellSpec, rec: dict[str, Any], finish: Callable[..., dict[str, Any]], *,
            source: VersionSource, opts: RunOptions, build_env: BuildEnv, progress: Progress, log: Path,
            results: Path) -> dict[str, Any]:
    """resolve -> install -> probe -> test; every outcome goes through ``finish(status, message)``."""
    t_start = time.monotonic()

    def timed(phase: str, start: float) -> None:
        rec["phases"][phase] = round(time.monotonic() - start, 2)

    # -- resolve
    progress.phase(cell.id, "resolve")
    try:
        res = resolve_cell(cell, source)
    except ResolveError as exc:
        timed("resolve", t_start)
        return finish("error", f"resolve failed: {exc}")
    timed("resolve", t_start)
    rec["resolved"] = dict(res.resolved)
    if not res.ok:
        return finish("unreleased", "; ".join(res.unreleased.values()))
    axis_pkgs = [pkg for pkg, _prefix, _values in matrix.axes]
    unpinned = [p for p in axis_pkgs if p not in res.resolved]
    if unpinned:
        values = {p: cell.axis_values.get(p) for p in unpinned}
        return finish("error", f"axis package(s) {unpinned} were not resolved to a version (axis values: {values}); "
                               f"installing the cell without them would test whatever version pip picks")

    # -- install
    reqs = res.requirements()
    reused = envs.is_current(cell.id, reqs, envs_dir=opts.envs_dir)
    progress.phase(cell.id, "install", "reusing cached venv" if reused else " ".join(reqs))
    ts = time.monotonic()
    install_timeout = matrix.install_timeout_s if opts.install_timeout_s is None else opts.install_timeout_s
    try:
        env = build_env(cell.id, reqs, log=log, envs_dir=opts.envs_dir, timeout=install_timeout)
    except envs.EnvError as exc:
        timed("install", ts)
        return finish("error", f"install failed: {exc}")
    except subprocess.TimeoutExpired as exc:
        timed("install", ts)
        return finish("error", f"install timed out after {install_timeout:.0f}s: {' '.join(map(str, exc.cmd))}")
    timed("install", ts)
    rec["venv"], rec["venv_reused"] = str(env.path), reused
    marker = env.path / ".moe-compat-installer"
    rec["installer"] = marker.read_text().strip() if marker.exists() else None
    if (env.site_packages / "torch").exists():
        return finish("error", f"cell venv {env.path} contains its own torch; cells must share the base torch")
    rec["venv_bytes"] = envs.env_size_bytes(env)
    try:
        rec["freeze"] = envs.freeze(env).strip().splitlines()
    except envs.EnvError as exc:
        return finish("error", f"pip freeze failed: {exc}")

    # -- probe: installed versions and imports (same environment variables as the tests)
    threads = str(max(1, (os.cpu_count() or 1) // max(1, opts.jobs)))
    env_vars = {**os.environ, "MOE_COMPAT_CELL": cell.id, "MOE_COMPAT_MATRIX": str(matrix.path),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONFAULTHANDLER": "1", **opts.env}
    env_vars.pop("MOE_COMPAT_RESULTS", None)
    env_vars.setdefault("HYPOTHESIS_PROFILE", "ci")
    env_vars.setdefault("OMP_NUM_THREADS", threads)
    dists = sorted({*res.resolved, "torch", "bitsandbytes"})
    # A probe result is cached in the venv: same pins, same base, same packages asked -> same answer.
    probe_key = json.dumps({"venv": envs.requirements_key(reqs), "dists": dists, "mods": axis_pkgs,
                            "env": opts.env}, sort_keys=True)
    probe_file = env.path / ".moe-compat-probe.json"
    probe = _cached_probe(probe_file, probe_key) if reused else None
    if probe is not None:
        progress.phase(cell.id, "probe", "cached")
    else:
        progress.phase(cell.id, "probe")
        try:
            proc = subprocess.run([str(env.python), "-c", _PROBE, ",".join(dists), ",".join(axis_pkgs)],
                                  capture_output=True, text=True, timeout=install_timeout, cwd=ROOT, env=env_vars)
        except subprocess.TimeoutExpired:
            return finish("error", f"import probe timed out after {install_timeout:.0f}s")
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MOE_PROBE ")), None)
        if proc.returncode != 0 or line is None:
            with log.open("a") as f:
                f.write(f"$ import probe\n{proc.stdout}{proc.stderr}\n")
            return finish("error", f"import probe died (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
        probe = json.loads(line[len("MOE_PROBE "):])
        probe_file.write_text(json.dumps({"key": probe_key, "probe": probe}))
    rec["installed"] = probe["versions"]
    mismatched = {p: (v, probe["versions"].get(p)) for p, v in res.resolved.items()
                  if not same_version(probe["versions"].get(p), v)}
    if mismatched:
        return finish("error", "installed versions differ from the resolved ones: "
                      + ", ".join(f"{p} resolved {a} installed {b}" for p, (a, b) in mismatched.items()))
    incompatible = matrix.incompatible_for(cell.id, probe["versions"])
    extra_checks: list[dict[str, Any]] = []
    if probe["import_errors"]:
        errors = "; ".join(f"import {m} failed: {e}" for m, e in probe["import_errors"].items())
        versions = ", ".join(f"{p} {v}" for p, v in sorted(res.resolved.items()) if p in axis_pkgs)
        if incompatible is not None:
            return finish("skipped", f"known incompatible ({incompatible.link}): {incompatible.reason}. "
                                     f"Confirmed: {errors}")
        return finish("error", f"incompatible packages ({versions}): {errors}")
    if incompatible is not None:
        extra_checks.append(check_record(
            name="known_incompatible", status="xpass", node_id="matrix::incompatible",
            message=f"stale [[incompatible]] entry: every package imports fine ({incompatible.link}): "
                    f"{incompatible.reason}"))

    # -- test
    tests = list(opts.tests if opts.tests is not None else matrix.tests)
    cmd = [str(env.python), "-m", "pytest", "-p", "harness.pytest_plugin", "-p", "no:cacheprovider",
           "--moe-results", str(results), "-rfEX", "--continue-on-collection-errors", *matrix.pytest_args,
           *(["--quick"] if opts.quick else []), *opts.pytest_args, *tests]
    timeout = matrix.timeout_s if opts.timeout_s is None else opts.timeout_s
    progress.phase(cell.id, "test", " ".join(tests))
    ts = time.monotonic()
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env_vars,
                                start_new_session=True)
        with _ACTIVE_LOCK:
            _ACTIVE.add(proc.pid)
        try:
            rc, cpu = _wait_with_rusage(proc, timeout)
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE.discard(proc.pid)
    timed("test", ts)
    rec["phases"]["test_cpu"] = cpu
    checks, session, running, fin = read_results(results)
    rec["pytest_exit"] = rc
    rec["checks"] = checks + extra_checks
    if session is not None:
        rec["known"] = session.get("known", [])
    if fin is not None:
        rec["known_unused"] = fin.get("known_unused", [])
    if rc is None or rc < 0 or fin is None:
        cause = (f"timed out after {timeout:.0f}s" if rc is None
                 else f"crashed ({_signal_name(rc)})" if rc < 0
                 else f"pytest exited {rc} without finishing its session")
        if running is not None:
            rec["checks"].append(check_record(
                name=running.split("::")[-1].split("[")[0].removeprefix("test_"), status="fail", node_id=running,
                message=f"the test process {cause} while this test ran"))
        return finish("error", f"test phase {cause}" + (f" while running {running}" if running else ""))
    if rc not in (0, 1, 5):
        return finish("error", f"pytest exited {rc} ({'interrupted' if rc == 2 else 'internal/usage error'})")
    if rc == 5 or not checks:
        # A cell that tests nothing is not a pass: every module skipped at import (a missing package), a -k that
        # matches nothing, or an empty test path.
        args = " ".join([*matrix.pytest_args, *opts.pytest_args])
        return finish("error", f"no tests collected (pytest exit {rc}) in {' '.join(tests)}"
                      + (f" with {args}" if args else ""))
    status = cell_status(rec["checks"])
    bad = [c for c in rec["checks"] if c["status"] in UNEXPECTED]
    names = list(dict.fromkeys(c["name"] for c in bad))
    return finish(status, f"{len(bad)} unexpected result(s) in {len(names)} check(s): " + ", ".join(names[:8])
                  + (", ..." if len(names) > 8 else "") if bad else "")


def _cached_probe(probe_file: Path, key: str) -> dict[str, Any] | None:
    """The probe result cached in a reused venv for exactly ``key``; None when absent, stale or unreadable."""
    try:
        cached = json.loads(probe_file.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a cut write (interrupted run): probe again, the result overwrites the file
    if not isinstance(cached, dict) or cached.get("key") != key or not isinstance(cached.get("probe"), dict):
        return None
    probe = cached["probe"]
    return probe if {"versions", "import_errors"} <= probe.keys() else None


def run_cells(matrix: Matrix, cells: list[CellSpec], *, source: VersionSource, run_dir: Path, opts: RunOptions,
              build_env: BuildEnv = envs.ensure_env, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Run ``cells`` with up to ``opts.jobs`` in parallel; records come back in matrix order."""
    progress = progress or Progress()
    with progress, ThreadPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
        futures = [pool.submit(run_cell, matrix, c, source=source, run_dir=run_dir, opts=opts,
                               build_env=build_env, progress=progress) for c in cells]
        try:
            return [f.result() for f in futures]
        except KeyboardInterrupt:
            # Test phases run in their own sessions (so a timeout can kill a whole tree); they do not get the
            # terminal's Ctrl-C, so stop them here, and cancel the cells not started.
            for f in futures:
                f.cancel()
            groups = kill_active()
            sys.stderr.write(f"interrupted: killed the test phases of {len(groups)} running cell(s)\n")
            raise
