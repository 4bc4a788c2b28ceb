"""Helpers of the harness tests: a throw-away matrix file, a fake version source, cell records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def write_matrix(tmp_path: Path):
    """Write a matrix TOML into tmp_path and return its path."""

    def write(text: str, name: str = "m.toml") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    return write


def fake_source(table: dict[str, list[str]]):
    """A version source that never touches the network."""

    def source(package: str) -> list[str]:
        if package not in table:
            raise AssertionError(f"unexpected index query for {package}")
        return table[package]

    return source


def check(name: str, status: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "family": kw.get("family"), "variant": kw.get("variant"), "status": status,
            "metrics": kw.get("metrics", {}), "threshold": kw.get("threshold", {}), "plots": kw.get("plots", []),
            "message": kw.get("message", ""), "node_id": kw.get("node_id", f"tests/x.py::test_{name}"),
            "details": "", "duration_s": 0.1}


def cell(cid: str, status: str, checks: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return {"id": cid, "matrix": "default", "specs": {"transformers": "==5.*"}, "axis_ids": {"transformers": "5.x"},
            "resolved": {"transformers": "5.24.0"}, "status": status, "message": kw.get("message", ""),
            "started": "2026-11-29T06:00:00+00:00", "finished": "2026-11-29T06:01:00+00:00", "duration_s": 60.0,
            "venv_bytes": 225_000_000, "freeze": ["transformers==5.24.0"], "checks": checks,
            "known_unused": [], "log_tail": kw.get("log_tail", ""),
            "host": {"python": "3.11", "torch": "2.13.0+cpu", "device": "cpu"}}
