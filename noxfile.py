"""Sessions of moe-compat. Run them from the base environment: ``./bootstrap.sh && .venv/bin/nox -s <session>``.

Every session uses ``venv_backend="none"``: the harness builds its own venvs (``harness/envs.py``) so that each
shares the base interpreter's torch through a .pth file and never installs one.

* ``tests`` (default, CI): the whole suite against the newest upstream releases (requirements/tests.txt).
* ``matrix``: every cell of ``matrices/default.toml``, each in its own venv, then one report in
  ``reports/runs/<run-id>/`` (``reports/latest``). Options after ``--`` go to ``python -m harness.cli run``:
  ``--matrix extended``, ``--cells t5.x-platest,t4.57-p0.18``, ``--jobs 2``, ``--quick``, ``--baseline PATH``,
  ``--timeout S``, ``--pytest-args "-k reload"``.
* ``cell(<id>)``: one cell of the default matrix alone, e.g. ``nox -s "cell(t5.x-platest)"``; same options as
  ``matrix``. ``nox -l --json -t cell`` lists the cells as JSON (CI fans out one job per entry).
* ``report``: merge per-cell records into one report: ``nox -s report -- DIR_OR_JSON... [--baseline PATH]``.
* ``prerelease``: each axis package's newest pre-release (or ``-- --candidate peft=path/to.whl``,
  ``--candidate transformers=git+https://github.com/huggingface/transformers@main``) against its newest release,
  everything else as in the newest cell; regression report in ``reports/runs/<run-id>/prerelease.md``.
* ``bisect``: ``-- --package transformers --good 5.0.0 --bad 5.25.0 --check <name or node id> [--cell ID]``: the
  first release that fails the check (binary search, one cached cell venv per version).
* ``subject``: the subject checks (tests/subjects) for one released version of another implementation, one cell per
  PEFT version of ``matrices/subjects.toml``: ``nox -s subject -- unsloth_zoo==2026.10.9 [run options]``. The whole
  subjects matrix: ``nox -s matrix -- --matrix subjects``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from harness.matrix import load_matrix  # noqa: E402  (needs ROOT on sys.path)

nox.options.default_venv_backend = "none"
nox.options.sessions = ["tests"]

DEFAULT_CELLS = [c.id for c in load_matrix("default").cells()]


def _requirements(path: Path) -> list[str]:
    lines = (ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines())
    return [ln for ln in lines if ln]


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """The test suite against the newest upstream releases (requirements/tests.txt). CI runs this."""
    from harness.envs import ensure_env

    session.log("building/reusing the tests venv (.envs/tests), sharing the base torch")
    env = ensure_env("tests", _requirements(ROOT / "requirements" / "tests.txt"))
    # the whole suite: one worker per core (at most 4); --dist loadfile keeps a file's module fixtures (the
    # synthetic wheels and cell runs of test_prerelease / test_bisect) in one worker, built once
    workers = max(1, min(4, os.cpu_count() or 1))
    args = session.posargs or ["-n", str(workers), "--dist", "loadfile", "tests"]
    session.run(str(env.python), "-m", "pytest", "-p", "no:cacheprovider", "-p", "harness.pytest_plugin", *args,
                external=True,
                env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})


@nox.session(venv_backend="none", default=False)
def matrix(session: nox.Session) -> None:
    """Every cell of the default matrix (or `-- --matrix extended`) in its own venv, then the merged report."""
    session.run(sys.executable, "-m", "harness.cli", "run", *session.posargs, external=True)


@nox.session(venv_backend="none", default=False, tags=["cell"])
@nox.parametrize("cell", DEFAULT_CELLS, ids=DEFAULT_CELLS)
def cell(session: nox.Session, cell: str) -> None:
    """One cell of the default matrix in its own venv, with its report (one CI job per cell)."""
    session.run(sys.executable, "-m", "harness.cli", "run", "--cells", cell, "--jobs", "1", *session.posargs,
                external=True)


@nox.session(venv_backend="none", default=False)
def report(session: nox.Session) -> None:
    """Merge per-cell records (cells/<id>.json, e.g. CI artifacts) into one report: `-- DIR... [--baseline P]`."""
    if not session.posargs:
        session.error("usage: nox -s report -- DIR_OR_CELL_JSON... [--out DIR] [--baseline summary.json]")
    session.run(sys.executable, "-m", "harness.cli", "merge", *session.posargs, external=True)


@nox.session(venv_backend="none", default=False)
def prerelease(session: nox.Session) -> None:
    """Newest pre-release (or a wheel / VCS ref: `-- --candidate PKG=VALUE`) vs newest release: regression report."""
    session.run(sys.executable, "-m", "harness.cli", "prerelease", *session.posargs, external=True)


@nox.session(venv_backend="none", default=False)
def bisect(session: nox.Session) -> None:
    """`-- --package P --good V --bad V --check NAME`: the first release between good and bad that fails the check."""
    if not session.posargs:
        session.error("usage: nox -s bisect -- --package P --good V --bad V --check NAME_OR_NODE_ID [--cell ID]")
    session.run(sys.executable, "-m", "harness.cli", "bisect", *session.posargs, external=True)


@nox.session(venv_backend="none", default=False)
def subject(session: nox.Session) -> None:
    """Subject checks of one release of another implementation: `-- unsloth_zoo==VERSION [harness.cli run options]`."""
    if not session.posargs:
        session.error("usage: nox -s subject -- NAME==VERSION [run options], e.g. unsloth_zoo==2026.10.9")
    session.run(sys.executable, "-m", "harness.subjects.session", *session.posargs, external=True)


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """GPU benchmark of the MoE expert kernels (CUDA only): writes reports/bench/<gpu>-<date>.json and .md."""
    session.run(sys.executable, str(ROOT / "bench" / "bench_moe.py"), *session.posargs, external=True)
