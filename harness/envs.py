"""Cell virtual environments that share the base interpreter's torch.

A cell venv is a plain venv made from the base interpreter (the one .venv was made from), plus a
``_moe_compat_base.pth`` file that appends the base venv's site-packages to ``sys.path``. pip inside the
cell then sees torch and bitsandbytes as installed and never re-resolves them; the cell's own packages
(transformers, PEFT, accelerate, ...) shadow anything of the same name further down ``sys.path``.

Pitfall this avoids: ``venv --system-site-packages`` made from inside a venv exposes the *system*
interpreter's packages, not the venv's, so torch would be missing and pip would pull a CUDA build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENVS_DIR = ROOT / ".envs"
PTH_NAME = "_moe_compat_base.pth"


class EnvError(RuntimeError):
    """A cell environment could not be built; the message carries the command and its output tail."""


def base_site_packages() -> Path:
    """site-packages of the interpreter running the harness (the base venv)."""
    return Path(sysconfig.get_paths()["purelib"])


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
    """Hash of the exact requirement pins plus the base site-packages path: a change rebuilds the venv."""
    blob = json.dumps({"reqs": sorted(requirements), "base": str(base_site_packages())}, sort_keys=True)
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


def is_current(name: str, requirements: list[str], *, envs_dir: Path = ENVS_DIR) -> bool:
    """True when ``envs_dir/name`` exists and was built from exactly these requirement pins (it will be reused)."""
    env = CellEnv(name, envs_dir / name)
    stamp = env.path / ".moe-compat-key"
    return stamp.exists() and stamp.read_text().strip() == requirements_key(requirements) and env.python.exists()


def ensure_env(name: str, requirements: list[str], *, log: Path | None = None, envs_dir: Path = ENVS_DIR,
               timeout: float = 1800) -> CellEnv:
    """Create (or reuse, when the pins are unchanged) the venv ``envs_dir/name`` with ``requirements``.

    ``timeout`` bounds each command (venv creation, pip install); on expiry ``subprocess.TimeoutExpired`` propagates.
    The venv is built in a temporary sibling directory and renamed into place, so an interrupted build
    never leaves a half-made venv that a later run would trust.
    """
    env = CellEnv(name, envs_dir / name)
    key = requirements_key(requirements)
    stamp = env.path / ".moe-compat-key"
    if is_current(name, requirements, envs_dir=envs_dir):
        return env
    envs_dir.mkdir(parents=True, exist_ok=True)
    tmp = envs_dir / f".{name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    _run([str(base_interpreter()), "-m", "venv", str(tmp)], log=log, timeout=timeout)
    tmp_env = CellEnv(name, tmp)
    (tmp_env.site_packages / PTH_NAME).write_text(str(base_site_packages()) + "\n")
    if requirements:
        # --no-compile: byte-compiling every module of transformers costs more CPU than the first import of the few used
        _run([str(tmp_env.python), "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check",
              *requirements],
             log=log, timeout=timeout)
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
    """``pip freeze`` of the cell's own packages (the shared base is listed separately by the runner)."""
    return _run([str(env.python), "-m", "pip", "freeze", "--local", "--disable-pip-version-check"])


def env_size_bytes(env: CellEnv) -> int:
    return sum(p.stat().st_size for p in env.path.rglob("*") if p.is_file() and not p.is_symlink())
