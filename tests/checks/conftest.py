"""Fixtures of the end-to-end checks: the family parametrization (one family under --quick) and a per-session cache
of trained runs, so loss_parity and token_overlap share one training per (family, base kind)."""

from __future__ import annotations

import pytest


def _quick(config: pytest.Config) -> bool:
    return bool(config.getoption("quick", default=False))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``family`` with the installed transformers' families (``--quick``: qwen3_moe or the first)."""
    if "family" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        if "family" in mark.args[0]:
            return
    try:
        from tests.checks import helpers
    except ModuleNotFoundError as exc:  # transformers / PEFT absent (base env): one visible skip
        metafunc.parametrize("family", [pytest.param(None, marks=pytest.mark.skip(reason=f"needs {exc.name}"))])
        return
    metafunc.parametrize("family", helpers.families(_quick(metafunc.config)))


class RunCache:
    """``get(family, kind)`` trains once per session and returns the `helpers.Run`; a failed training is not cached
    (each caller retrains and fails with its own traceback)."""

    def __init__(self, workdir, quick: bool):
        self.workdir = workdir
        self.quick = quick
        self._runs: dict = {}

    def get(self, family: str, kind: str):
        from tests.checks import helpers

        key = (family, kind)
        if key not in self._runs:
            self._runs[key] = helpers.train_run(family, kind, self.workdir / f"{family}-{kind}", self.quick)
        return self._runs[key]


@pytest.fixture(scope="session")
def run_cache(tmp_path_factory, request) -> RunCache:
    return RunCache(tmp_path_factory.mktemp("moe_checks"), _quick(request.config))


@pytest.fixture(scope="session")
def check_workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("moe_checks_misc")
