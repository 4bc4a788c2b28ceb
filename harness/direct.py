"""Direct references: a local wheel / sdist / source tree (``path = ...``) or a VCS reference (``vcs = "git+URL@ref"``).

Each resolves to a pip requirement (``name @ file:///…`` or ``name @ git+URL@<commit>``) and a record of its exact
source, which goes into the cell record (``sources``) and summary.json:

* wheel / sdist: ``{"kind": "wheel"|"sdist", "path", "sha256", "version"}`` (version from the file name);
* source tree: ``{"kind": "tree", "path", "tree_sha256", "version" (static ``[project] version`` or null: read from
  the installed package), "git_commit" (when the tree is a git checkout)}``;
* VCS: ``{"kind": "vcs", "url", "ref", "commit"}``: the ref (branch, tag) is resolved to a commit hash once per run
  with ``git ls-remote``, and the cell installs that commit, so every cell of a run gets the same code.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)

from harness.index import ResolveError

ROOT = Path(__file__).resolve().parent.parent
TREE_SKIP_DIRS = {".git", "__pycache__", ".nox", ".tox", ".venv", ".envs", "build", "dist", ".eggs"}
GIT_TIMEOUT_S = 120
_SHA = re.compile(r"^[0-9a-f]{40}$")


class SourceError(ResolveError):
    """A ``path`` or ``vcs`` value cannot be used (missing file, wrong package, unknown ref, git failure)."""


def local_path(path: str) -> Path:
    """``path`` relative to the repository root, or absolute."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else ROOT / p


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_sha256(root: Path) -> str:
    """Digest of a source tree: relative paths and contents of every file, sorted (build outputs, VCS data and byte
    code left out, so building or importing in place does not change it)."""
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".pyc")
                   and not any(part in TREE_SKIP_DIRS or part.endswith(".egg-info")
                               for part in p.relative_to(root).parts[:-1]))
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(file_sha256(p).encode() + b"\0")
    return h.hexdigest()


def _static_version(tree: Path) -> str | None:
    pyproject = tree / "pyproject.toml"
    if not pyproject.is_file():
        return None
    project = tomllib.loads(pyproject.read_text()).get("project", {})
    return None if "version" in project.get("dynamic", []) else project.get("version")


def _git(args: list[str], what: str) -> str:
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    except FileNotFoundError as exc:
        raise SourceError(f"{what}: git is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise SourceError(f"{what}: `git {' '.join(args)}` timed out after {GIT_TIMEOUT_S}s") from exc
    if proc.returncode != 0:
        raise SourceError(f"{what}: `git {' '.join(args)}` exited {proc.returncode}: {proc.stderr.strip()[-600:]}")
    return proc.stdout


def resolve_path(package: str, path: str) -> tuple[str, dict[str, Any]]:
    """(requirement, source record) of a local wheel, sdist or source tree of ``package``."""
    p = local_path(path).resolve()
    what = f"{package} path {path!r}"
    if not p.exists():
        raise SourceError(f"{what}: {p} does not exist")
    if p.is_dir():
        if not ((p / "pyproject.toml").is_file() or (p / "setup.py").is_file()):
            raise SourceError(f"{what}: {p} is a directory without pyproject.toml or setup.py (not a source tree)")
        src: dict[str, Any] = {"kind": "tree", "path": str(p), "tree_sha256": tree_sha256(p),
                               "version": _static_version(p)}
        if (p / ".git").exists():
            src["git_commit"] = _git(["-C", str(p), "rev-parse", "HEAD"], what).strip()
            src["git_dirty"] = bool(_git(["-C", str(p), "status", "--porcelain"], what).strip())
        return f"{package} @ {p.as_uri()}", src
    try:
        if p.name.endswith(".whl"):
            name, version, _b, _t = parse_wheel_filename(p.name)
            kind = "wheel"
        else:
            name, version = parse_sdist_filename(p.name)
            kind = "sdist"
    except (InvalidWheelFilename, InvalidSdistFilename) as exc:
        raise SourceError(f"{what}: {p.name} is neither a wheel nor an sdist file name ({exc})") from exc
    if canonicalize_name(name) != canonicalize_name(package):
        raise SourceError(f"{what}: {p.name} is a distribution of {name}, not of {package}")
    return f"{package} @ {p.as_uri()}", {"kind": kind, "path": str(p), "sha256": file_sha256(p),
                                        "version": str(version)}


def split_vcs(vcs: str) -> tuple[str, str]:
    """``git+https://host/repo@ref`` -> (``https://host/repo``, ``ref``); no ``@ref`` means ``HEAD``."""
    if not vcs.startswith("git+"):
        raise SourceError(f"vcs reference {vcs!r}: only git is supported (git+https://host/repo@ref)")
    url = vcs[len("git+"):]
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise SourceError(f"vcs reference {vcs!r}: expected git+<scheme>://host/repo@ref")
    netloc, slash, path = rest.partition("/")
    if "@" in path:
        path, _, ref = path.rpartition("@")
    else:
        ref = "HEAD"
    if not ref:
        raise SourceError(f"vcs reference {vcs!r}: empty ref after '@'")
    return f"{scheme}://{netloc}{slash}{path}", ref


def resolve_vcs_ref(url: str, ref: str) -> str:
    """The commit hash ``ref`` (branch, tag, HEAD, or a hash) names in the repository at ``url``."""
    if _SHA.match(ref):
        return ref
    out = _git(["ls-remote", url, ref, f"{ref}^{{}}"], f"git+{url}@{ref}")  # ^{}: an annotated tag's commit
    refs = {}
    for line in out.splitlines():
        sha, sep, name = line.partition("\t")
        if sep:
            refs[name.strip()] = sha.strip()
    for name in (f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}", f"refs/heads/{ref}", ref):
        if name in refs:
            return refs[name]
    raise SourceError(f"git+{url}@{ref}: no branch, tag or ref named {ref!r} (git ls-remote listed "
                      f"{len(refs)} ref(s))")


def resolve_vcs(package: str, vcs: str) -> tuple[str, dict[str, Any]]:
    """(requirement pinned to the commit, source record) of a ``git+URL@ref`` reference."""
    url, ref = split_vcs(vcs)
    commit = resolve_vcs_ref(url, ref)
    return f"{package} @ git+{url}@{commit}", {"kind": "vcs", "url": url, "ref": ref, "commit": commit,
                                                "version": None}


def _requirement_path(requirement: str) -> Path | None:
    """The local path of a ``name @ file://…`` requirement; None for anything else."""
    _name, sep, url = requirement.partition(" @ ")
    if not sep or not url.startswith("file:"):
        return None
    return Path(url2pathname(urlparse(url).path))


def is_local_tree(requirement: str) -> bool:
    p = _requirement_path(requirement)
    return p is not None and p.is_dir()


def requirement_digest(requirement: str) -> str | None:
    """Content digest of a ``name @ file://…`` requirement (file sha256 or tree digest); None for anything else.

    Cell venvs are cached by their requirement strings; a local file or tree can change under the same path."""
    p = _requirement_path(requirement)
    if p is None:
        return None
    if p.is_dir():
        return tree_sha256(p)
    return file_sha256(p) if p.is_file() else None
