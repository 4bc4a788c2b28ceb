"""Cell virtual environments that share the base interpreter's torch.

A cell venv is a plain venv made from the base interpreter (the one .venv was made from), plus a
``_moe_compat_base.pth`` file that appends the base venv's site-packages to ``sys.path``. pip inside the
cell then sees torch and bitsandbytes as installed and never re-resolves them; the cell's own packages
(transformers, PEFT, accelerate, ...) shadow anything of the same name further down ``sys.path``.

Pitfall this avoids: ``venv --system-site-packages`` made from inside a venv exposes the *system*
interpreter's packages, not the venv's, so torch would be missing and pip would pull a CUDA build.

Installer: ``uv`` when it is available (``.venv/bin/uv`` from requirements/base.txt, or on PATH), else pip;
``MOE_COMPAT_INSTALLER=pip|uv`` forces one. uv does not see packages that come through a .pth file, so it is run
with ``--excludes`` listing every distribution of the base site-packages (torch, bitsandbytes, numpy, ...): they
are neither resolved nor installed, exactly as pip treats them (installed already). Unlike pip, uv would not
upgrade a base package that a cell package needs newer, so after a uv install every requirement of the cell's
packages on a base package is checked against the base version (``EnvError`` naming the conflict if one fails).
A uv-built venv has no pip of its own (``venv --without-pip`` saves seconds per cell); its freeze is ``uv pip freeze``.

Package sources: both installers get the configured indexes and find-links locations as explicit options
(``harness.index.IndexConfig.install_args``), the same ones version resolution asked. Requirements may be direct
references (``name @ file:///…`` wheel, sdist or source tree, ``name @ git+URL@<commit>``); a local file's or tree's
content digest is part of the venv's cache key, and uv is told to rebuild a source tree instead of reusing its cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from harness.direct import is_local_tree, requirement_digest
from harness.index import IndexConfig

ROOT = Path(__file__).resolve().parent.parent
ENVS_DIR = ROOT / ".envs"
PTH_NAME = "_moe_compat_base.pth"


class EnvError(RuntimeError):
    """A cell environment could not be built; the message carries the command and its output tail."""


def base_site_packages() -> Path:
    """site-packages of the base venv: the running interpreter's, or, when running inside a cell venv (e.g. the
    harness's own tests in the ``tests`` venv), the base that the cell's .pth file points at."""
    here = Path(sysconfig.get_paths()["purelib"])
    pth = here / PTH_NAME
    return Path(pth.read_text().strip()) if pth.exists() else here


def base_interpreter() -> Path:
    """The interpreter the base venv was created from (``sys._base_executable`` is that in a venv)."""
    return Path(getattr(sys, "_base_executable", sys.executable))


@dataclass(frozen=True)
class CellEnv:
    name: str
    path: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def site_packages(self) -> Path:
        v = f"python{sys.version_info.major}.{sys.version_info.minor}"
        return self.path / "lib" / v / "site-packages"


def requirements_key(requirements: list[str]) -> str:
    """Hash of the exact requirement pins (with the content digest of local files and trees) plus the base
    site-packages path: a change rebuilds the venv."""
    digests = {r: d for r in requirements if (d := requirement_digest(r)) is not None}
    blob = json.dumps({"reqs": sorted(requirements), "base": str(base_site_packages()), **(
        {"local": digests} if digests else {})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _run(cmd: list[str], *, log: Path | None = None, timeout: float = 1800) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if log is not None:
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n{out}\n")
    if proc.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-25:])
        raise EnvError(f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return out


def base_distributions() -> dict[str, str]:
    """Normalized name -> version of every distribution in the base site-packages."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    return {canonicalize_name(d.metadata["Name"]): d.version
            for d in metadata.distributions(path=[str(base_site_packages())]) if d.metadata["Name"]}


def find_uv() -> Path | None:
    """The uv binary next to the running interpreter or in the base venv (requirements/base.txt; also found from
    inside a cell venv such as .envs/tests), else on PATH; None when absent."""
    for local in (Path(sys.executable).parent / "uv", base_site_packages().parents[2] / "bin" / "uv"):
        if local.exists():
            return local
    found = shutil.which("uv")
    return Path(found) if found else None


def installer() -> str:
    """``uv`` or ``pip`` (see the module docstring); an unknown or unavailable forced choice is an error."""
    forced = os.environ.get("MOE_COMPAT_INSTALLER", "").strip()
    if forced not in ("", "uv", "pip"):
        raise EnvError(f"MOE_COMPAT_INSTALLER must be 'uv' or 'pip', got {forced!r}")
    if forced == "uv" and find_uv() is None:
        raise EnvError("MOE_COMPAT_INSTALLER=uv but no uv binary (pip install uv into the base venv)")
    if forced:
        return forced
    return "uv" if find_uv() is not None else "pip"


def check_base_requirements(env: CellEnv) -> None:
    """Every requirement of the cell's own distributions on a base distribution must hold for the base version."""
    from importlib import metadata

    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    base = base_distributions()
    conflicts = []
    for dist in metadata.distributions(path=[str(env.site_packages)]):
        for text in dist.requires or []:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue  # a malformed requirement string of an upstream package; pip ignores it as well
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = canonicalize_name(req.name)
            if name in base and not req.specifier.contains(base[name], prereleases=True):
                conflicts.append(f"{dist.metadata['Name']} needs {req} but the shared base has {name} {base[name]}")
    if conflicts:
        raise EnvError(f"cell venv {env.path}: requirements on shared base packages not met (MOE_COMPAT_INSTALLER=pip "
                       f"would install newer copies into the cell): " + "; ".join(sorted(set(conflicts))))


def is_current(name: str, requirements: list[str], *, envs_dir: Path = ENVS_DIR) -> bool:
    """True when ``envs_dir/name`` exists and was built from exactly these requirement pins (it will be reused)."""
    env = CellEnv(name, envs_dir / name)
    stamp = env.path / ".moe-compat-key"
    return stamp.exists() and stamp.read_text().strip() == requirements_key(requirements) and env.python.exists()


def ensure_env(name: str, requirements: list[str], *, log: Path | None = None, envs_dir: Path = ENVS_DIR,
               timeout: float = 1800, index: IndexConfig | None = None) -> CellEnv:
    """Create (or reuse, when the pins are unchanged) the venv ``envs_dir/name`` with ``requirements``.

    ``index``: the package sources (default: ``IndexConfig.from_environment()``, what resolution reads too).
    ``timeout`` bounds each command (venv creation, pip install); on expiry ``subprocess.TimeoutExpired`` propagates.
    The venv is built in a temporary sibling directory and renamed into place, so an interrupted build
    never leaves a half-made venv that a later run would trust.
    """
    env = CellEnv(name, envs_dir / name)
    if is_current(name, requirements, envs_dir=envs_dir):
        return env
    envs_dir.mkdir(parents=True, exist_ok=True)
    # Two runs building the same venv at once (a person and a CI job on one box) would share the temporary dir.
    with (envs_dir / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_current(name, requirements, envs_dir=envs_dir):  # the other run built it meanwhile
            return env
        return _build(env, requirements, log=log, envs_dir=envs_dir, timeout=timeout, index=index)


def _build(env: CellEnv, requirements: list[str], *, log: Path | None, envs_dir: Path, timeout: float,
           index: IndexConfig | None) -> CellEnv:
    name = env.name
    key = requirements_key(requirements)
    stamp = env.path / ".moe-compat-key"
    tmp = envs_dir / f".{name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    tool = installer()
    _run([str(base_interpreter()), "-m", "venv", *(["--without-pip"] if tool == "uv" else []), str(tmp)], log=log,
         timeout=timeout)
    tmp_env = CellEnv(name, tmp)
    (tmp_env.site_packages / PTH_NAME).write_text(str(base_site_packages()) + "\n")
    sources = (index or IndexConfig.from_environment()).install_args(tool) if requirements else []
    if requirements and tool == "uv":
        excludes = envs_dir / f".{name}.excludes.txt"
        excludes.write_text("\n".join(sorted(base_distributions())) + "\n")
        # uv caches the build of a local source tree by its pyproject.toml/setup.py mtimes only: rebuild trees
        refresh = [a for r in requirements if is_local_tree(r) for a in ("--refresh-package", r.split(" @ ")[0])]
        _run([str(find_uv()), "pip", "install", "--quiet", "--python", str(tmp_env.python), "--excludes",
              str(excludes), *sources, *refresh, *requirements], log=log, timeout=timeout)
        excludes.unlink()
        check_base_requirements(tmp_env)
    elif requirements:
        # --no-compile: byte-compiling every module of transformers costs more CPU than the first import of the few used
        _run([str(tmp_env.python), "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check",
              *sources, *requirements],
             log=log, timeout=timeout)
    (tmp_env.path / ".moe-compat-installer").write_text(tool + "\n")
    _check_shared_torch(tmp_env)
    # venv scripts hard-code their interpreter path; we only ever call `python -m ...`, so the rename is safe.
    shutil.rmtree(env.path, ignore_errors=True)
    os.replace(tmp, env.path)
    stamp.write_text(key + "\n")
    return env


def _check_shared_torch(env: CellEnv) -> None:
    if (env.site_packages / "torch").exists():
        raise EnvError(f"cell venv {env.path} installed its own torch; it must share {base_site_packages()}")
    out = _run([str(env.python), "-c", "import torch; print(torch.__file__)"])
    if not out.strip().startswith(str(base_site_packages())):
        raise EnvError(f"cell venv {env.path} imports torch from {out.strip()}, not the base {base_site_packages()}")


def freeze(env: CellEnv) -> str:
    """``pip freeze`` of the cell's own packages (the shared base is listed separately by the runner); ``uv pip
    freeze`` in a venv built by uv (it has no pip)."""
    marker = env.path / ".moe-compat-installer"
    if marker.exists() and marker.read_text().strip() == "uv" and find_uv() is not None:
        return _run([str(find_uv()), "pip", "freeze", "--quiet", "--python", str(env.python)])
    return _run([str(env.python), "-m", "pip", "freeze", "--local", "--disable-pip-version-check"])


def env_size_bytes(env: CellEnv) -> int:
    return sum(p.stat().st_size for p in env.path.rglob("*") if p.is_file() and not p.is_symlink())
