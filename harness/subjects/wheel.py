"""Released wheels as subjects: fetch from the package index, unpack into a cache, import selected modules.

`fetch(dist, version)` runs ``pip download --no-deps --only-binary=:all: <dist>==<version>`` into a temporary
directory, unpacks the wheel (a zip) and renames it into ``.envs/subjects/<dist>-<version>/`` (``MOE_COMPAT_SUBJECT_CACHE``
overrides the directory); a cached copy is reused. Nothing is installed: the wheel's declared dependencies (for
unsloth-zoo: ``unsloth`` itself, torchvision, trl, datasets, ...) are never resolved, so no package can pull a torch.

`load_modules(root, package, modules, stub_packages=..., stub_modules=...)` imports only ``modules`` from the unpacked
tree. Packages in ``stub_packages`` become empty package objects whose ``__path__`` points into the tree (their
``__init__.py`` is NOT executed, so GPU initialisation and import-time patching never run); modules in
``stub_modules`` are replaced by a module holding exactly the given attributes (importing a name a stub does not hold
raises ImportError naming the stub, so nothing is silently stubbed). Every other submodule the selected modules
import is the wheel's real code. A package can be loaded once per process: module globals of a subject may depend on
the environment at import time (unsloth-zoo reads the PEFT version), so a second, different tree raises.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import types
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from harness.envs import ENVS_DIR
from harness.subjects.interface import SubjectLoadError

ROOT_MARK = "__moe_compat_subject_root__"


def cache_dir() -> Path:
    return Path(os.environ.get("MOE_COMPAT_SUBJECT_CACHE") or ENVS_DIR / "subjects")


def unpacked_dir(dist: str, version: str, cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / f"{dist}-{version}"


_FETCH_LOCKS: dict[Path, threading.Lock] = {}
_FETCH_LOCKS_GUARD = threading.Lock()


def fetch(dist: str, version: str, *, cache: Path | None = None, timeout: float = 600) -> Path:
    """The unpacked wheel of ``dist==version`` (downloaded once into the cache); raises SubjectLoadError.

    Matrix cells run as threads of one process and several cells share a subject version: one lock per cache entry
    makes them download it once, and each download works in its own temporary directory (other processes may fetch
    the same entry; the last complete rename wins, every copy being the same wheel)."""
    dest = unpacked_dir(dist, version, cache)
    with _FETCH_LOCKS_GUARD:
        lock = _FETCH_LOCKS.setdefault(dest.resolve(), threading.Lock())
    with lock:
        if (dest / ".complete").exists():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        try:
            return _download(dist, version, dest, tmp, timeout)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _download(dist: str, version: str, dest: Path, tmp: Path, timeout: float) -> Path:
    (tmp / "wheel").mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(tmp / "wheel"), f"{dist}=={version}"]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise SubjectLoadError(f"pip download of {dist}=={version} timed out after {timeout:.0f}s") from exc
    wheels = sorted((tmp / "wheel").glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise SubjectLoadError(f"could not download the wheel of {dist}=={version} ({' '.join(cmd)}): "
                               f"exit {proc.returncode}, wheels {[w.name for w in wheels]}\n{tail}")
    unpack(wheels[0], tmp / "tree")
    check_version(tmp / "tree", dist, version)
    (tmp / "tree" / ".wheel").write_text(wheels[0].name + "\n")
    (tmp / "tree" / ".complete").write_text("ok\n")
    if (dest / ".complete").exists():  # another process finished first: keep its copy (it may be in use)
        return dest
    shutil.rmtree(dest, ignore_errors=True)  # an incomplete earlier attempt
    os.replace(tmp / "tree", dest)
    return dest


def unpack(wheel: Path, dest: Path) -> None:
    """Extract a wheel, refusing members that would land outside ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            target = (dest / member).resolve()
            if not str(target).startswith(str(dest.resolve()) + os.sep):
                raise SubjectLoadError(f"{wheel.name}: member {member!r} would be written outside {dest}")
        zf.extractall(dest)


def check_version(tree: Path, dist: str, version: str) -> None:
    """The unpacked ``*.dist-info/METADATA`` must name ``version`` (a wrong wheel in the cache is an error)."""
    norm = dist.replace("-", "_").lower()
    metas = [p for p in tree.glob("*.dist-info/METADATA") if p.parent.name.lower().startswith(norm + "-")]
    if len(metas) != 1:
        raise SubjectLoadError(f"{tree}: expected one {norm}-*.dist-info/METADATA, found {[str(m) for m in metas]}")
    got = next((ln.split(":", 1)[1].strip() for ln in metas[0].read_text().splitlines() if ln.startswith("Version:")),
               None)  # fmt: skip
    if got != version:
        raise SubjectLoadError(f"{metas[0]}: Version {got!r}, expected {version!r}")


def _package(name: str, path: Path, attrs: Mapping[str, Any]) -> types.ModuleType:
    mod = types.ModuleType(name, f"moe-compat stand-in for {name} (its __init__.py is not executed)")
    mod.__path__ = [str(path)]
    mod.__package__ = name
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(path)]
    mod.__spec__ = spec
    mod.__dict__.update(attrs)
    return mod


def _stub(name: str, attrs: Mapping[str, Any]) -> types.ModuleType:
    mod = types.ModuleType(name, f"moe-compat stub of {name}: only {sorted(attrs)}")
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__dict__.update(attrs)
    return mod


def load_modules(
    root: Path,
    package: str,
    modules: Iterable[str],
    *,
    stub_packages: Mapping[str, Mapping[str, Any]] = (),
    stub_modules: Mapping[str, Mapping[str, Any]] = (),
) -> dict[str, types.ModuleType]:
    """Import ``modules`` (dotted names under ``package``) from the unpacked tree ``root`` (see the module docstring).

    stub_packages: package name -> attributes of its stand-in (``package`` itself must be one of them);
    stub_modules: module name -> exactly the attributes it holds.
    """
    root = Path(root).resolve()
    current = sys.modules.get(package)
    if current is not None:
        loaded_from = getattr(current, ROOT_MARK, None)
        if loaded_from != str(root):
            raise SubjectLoadError(
                f"{package} is already imported in this process from {loaded_from or getattr(current, '__file__', '?')}; "
                f"one subject version per process (module globals depend on the environment at import time)"
            )
    else:
        stub_packages = dict(stub_packages)
        if package not in stub_packages:
            raise SubjectLoadError(f"{package} must be a stub package (its __init__ is not executed)")
        for name, attrs in sorted(stub_packages.items(), key=lambda kv: kv[0].count(".")):
            path = root.joinpath(*name.split("."))
            if not (path / "__init__.py").exists():
                raise SubjectLoadError(f"{root}: {name} is not a package of this wheel (no {path / '__init__.py'})")
            sys.modules[name] = _package(name, path, {**attrs, ROOT_MARK: str(root)})
        for name, attrs in dict(stub_modules).items():
            sys.modules[name] = _stub(name, attrs)
        for name in stub_packages:  # make submodule attribute access work (pkg.sub)
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, sys.modules[name])
    out = {}
    for mod in modules:
        try:
            out[mod] = importlib.import_module(mod)
        except Exception as exc:  # re-raised with the subject's root and module named
            raise SubjectLoadError(f"importing {mod} from {root} failed: {type(exc).__name__}: {exc}") from exc
    return out
