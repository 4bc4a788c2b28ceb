"""Cell environments: the uv path's check that base packages satisfy the cell's requirements; installer choice."""

from __future__ import annotations

import pytest

from harness import envs


def _dist(site, name: str, version: str, requires: list[str]) -> None:
    d = site / f"{name}-{version}.dist-info"
    d.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
    (d / "METADATA").write_text("\n".join(lines) + "\n")


def test_base_requirement_conflict_is_named(tmp_path):
    env = envs.CellEnv("c", tmp_path / "c")
    _dist(env.site_packages, "needsnew", "1.0", ["numpy>=99", "torch>=1.0", "notinbase>=1", 'numpy<1; python_version < "3"'])
    with pytest.raises(envs.EnvError, match=r"needsnew needs numpy>=99 but the shared base has numpy"):
        envs.check_base_requirements(env)


def test_base_requirements_met(tmp_path):
    env = envs.CellEnv("c", tmp_path / "c")
    _dist(env.site_packages, "fine", "1.0", ["torch>=2", "numpy", 'pytest; extra == "test"'])
    envs.check_base_requirements(env)
    assert "torch" in envs.base_distributions()


def test_installer_choice(monkeypatch):
    monkeypatch.setenv("MOE_COMPAT_INSTALLER", "pip")
    assert envs.installer() == "pip"
    monkeypatch.setenv("MOE_COMPAT_INSTALLER", "conda")
    with pytest.raises(envs.EnvError, match="must be 'uv' or 'pip'"):
        envs.installer()
    monkeypatch.setattr(envs, "find_uv", lambda: None)
    monkeypatch.setenv("MOE_COMPAT_INSTALLER", "uv")
    with pytest.raises(envs.EnvError, match="no uv binary"):
        envs.installer()
    monkeypatch.delenv("MOE_COMPAT_INSTALLER")
    assert envs.installer() == "pip"
