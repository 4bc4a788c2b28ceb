"""The configured package index(es), read through the "simple" repository API (PEP 503 HTML, PEP 691 JSON).

Resolution asks the same sources the installs use, so a machine that reaches only a mirror can run the matrix.
``IndexConfig.from_environment()`` reads, for both installers, what they would read themselves:

* uv: ``UV_DEFAULT_INDEX`` / ``UV_INDEX_URL`` (primary), ``UV_INDEX`` / ``UV_EXTRA_INDEX_URL`` (extra),
  ``UV_FIND_LINKS``, ``UV_NO_INDEX``, then ``uv.toml`` (``UV_CONFIG_FILE``, else the project's ``uv.toml`` /
  ``pyproject.toml [tool.uv]``, the user's and the system's; keys ``index-url``, ``extra-index-url``, ``find-links``,
  ``no-index``, ``[[index]]``, also under ``[pip]``); ``UV_NO_CONFIG`` skips the files;
* pip: ``pip config list`` of the base interpreter, which covers ``PIP_INDEX_URL`` / ``PIP_EXTRA_INDEX_URL`` /
  ``PIP_FIND_LINKS`` / ``PIP_NO_INDEX`` and every pip.conf (``PIP_CONFIG_FILE`` included); ``:env:`` beats
  ``[install]`` beats ``[global]``.

The primary index is the first one set of: uv environment, pip environment, uv files, pip files; else PyPI. Extra
indexes and find-links locations are the union of both tools' settings. The installs get the same sources as explicit
arguments (``install_args``; uv with ``--index-strategy unsafe-best-match`` when there is more than one source, which
is pip's rule: the best version over all sources), so resolution and installation cannot disagree.

``IndexSource`` answers "which versions of X exist" from those sources, once per package per run (answers and errors
are memoized). A source that cannot be reached raises ``IndexUnreachable``; the index is then marked dead for the rest
of the run, so every later query (every other cell) fails at once instead of waiting for the timeout again.
A package absent from one source (HTTP 404, no directory in a file:// index) is an empty answer from that source.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import threading
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, cached_property
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.tags import sys_tags
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import Version

PYPI = "https://pypi.org/simple"
ROOT = Path(__file__).resolve().parent.parent
JSON_ACCEPT = "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"
DEFAULT_TIMEOUT_S = 30.0


class ResolveError(RuntimeError):
    """A version or a source could not be determined (index, local path, VCS reference); not `unreleased`."""


class IndexUnreachable(ResolveError):
    """A configured index or find-links location did not answer (network, HTTP error, missing directory)."""


class IndexConfigError(ResolveError):
    """The index configuration itself cannot be read (``pip config list`` failed, a malformed uv.toml)."""


def _split(value: str | None, seps: str = r"\s+") -> list[str]:
    return [v for v in re.split(seps, value or "") if v]


def _uv_index_entry(value: str) -> str:
    """``UV_INDEX`` entries may be ``name=url``."""
    name, sep, url = value.partition("=")
    return url if sep and "://" in url and "://" not in name else value


# ----------------------------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class IndexConfig:
    """Where packages come from: one primary index, extra indexes, find-links locations (directories or pages)."""

    index_url: str = PYPI
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    no_index: bool = False
    origin: dict[str, str] = field(default_factory=dict, compare=False)  # setting -> where it came from

    @property
    def indexes(self) -> tuple[str, ...]:
        return () if self.no_index else tuple(dict.fromkeys((self.index_url, *self.extra_index_urls)))

    @property
    def sources(self) -> tuple[str, ...]:
        return (*self.indexes, *self.find_links)

    def describe(self) -> dict[str, Any]:
        return {"index_url": None if self.no_index else self.index_url, "extra_index_urls": list(self.extra_index_urls),
                "find_links": list(self.find_links), "no_index": self.no_index, "origin": dict(self.origin)}

    def install_args(self, tool: str) -> list[str]:
        """Command-line options giving ``uv pip install`` / ``pip install`` exactly these sources."""
        args: list[str] = []
        if self.no_index:
            args.append("--no-index")
        else:
            args += ["--default-index" if tool == "uv" else "--index-url", self.index_url]
            for url in self.extra_index_urls:
                args += ["--index" if tool == "uv" else "--extra-index-url", url]
        for loc in self.find_links:
            args += ["--find-links", loc]
        if tool == "uv" and len(self.sources) > 1:
            args += ["--index-strategy", "unsafe-best-match"]
        return args

    @classmethod
    def from_environment(cls, env: dict[str, str] | None = None, *, cwd: Path = ROOT) -> IndexConfig:
        env = dict(os.environ if env is None else env)
        uv_env = _uv_env_settings(env)
        uv_file = _uv_file_settings(env, cwd)
        pip_env, pip_file = _pip_settings(env)
        origin: dict[str, str] = {}
        primary = PYPI
        for where, settings in (("uv environment", uv_env), ("pip environment", pip_env),
                                ("uv config", uv_file), ("pip config", pip_file)):
            if settings.get("index-url"):
                primary, origin["index_url"] = settings["index-url"][0], where
                break
        extras: list[str] = []
        links: list[str] = []
        no_index = False
        for where, settings in (("uv environment", uv_env), ("pip environment", pip_env),
                                ("uv config", uv_file), ("pip config", pip_file)):
            for url in settings.get("extra-index-url", []):
                if url not in extras and url != primary:
                    extras.append(url)
                    origin.setdefault(f"extra {url}", where)
            for loc in settings.get("find-links", []):
                if loc not in links:
                    links.append(loc)
                    origin.setdefault(f"find-links {loc}", where)
            if settings.get("no-index"):
                no_index = True
                origin.setdefault("no_index", where)
        return cls(primary.rstrip("/"), tuple(u.rstrip("/") for u in extras), tuple(links), no_index, origin)


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _uv_env_settings(env: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    primary = env.get("UV_DEFAULT_INDEX") or env.get("UV_INDEX_URL")
    if primary:
        out["index-url"] = [primary.strip()]
    extras = [_uv_index_entry(v) for v in _split(env.get("UV_INDEX"))] + _split(env.get("UV_EXTRA_INDEX_URL"))
    if extras:
        out["extra-index-url"] = extras
    if env.get("UV_FIND_LINKS"):
        out["find-links"] = _split(env["UV_FIND_LINKS"], r"[,\s]+")
    if _truthy(env.get("UV_NO_INDEX", "")):
        out["no-index"] = ["1"]
    return out


def _uv_config_files(env: dict[str, str], cwd: Path) -> list[Path]:
    """uv's configuration files, most important first (uv's own discovery order)."""
    if _truthy(env.get("UV_NO_CONFIG", "")):
        return []
    if env.get("UV_CONFIG_FILE"):
        return [Path(env["UV_CONFIG_FILE"])]
    files: list[Path] = []
    for d in (cwd, *cwd.parents):
        if (d / "uv.toml").is_file():
            files.append(d / "uv.toml")
            break
        if (d / "pyproject.toml").is_file() and "uv" in _read_toml(d / "pyproject.toml")["_raw"].get("tool", {}):
            files.append(d / "pyproject.toml")
            break
    home = Path(env.get("XDG_CONFIG_HOME") or Path(env.get("HOME", "~")).expanduser() / ".config")
    files.append(home / "uv" / "uv.toml")
    for d in _split(env.get("XDG_CONFIG_DIRS"), ":") or ["/etc/xdg"]:
        files.append(Path(d) / "uv" / "uv.toml")
    files.append(Path("/etc/uv/uv.toml"))
    return [f for f in files if f.is_file()]


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise IndexConfigError(f"cannot read uv configuration {path}: {exc}") from exc
    data = raw.get("tool", {}).get("uv", {}) if path.name == "pyproject.toml" else raw
    return {"_raw": raw, **data}


def _uv_file_settings(env: dict[str, str], cwd: Path) -> dict[str, list[str]]:
    """Settings of uv's configuration files; a more important file's value of a key wins."""
    out: dict[str, list[str]] = {}
    for path in reversed(_uv_config_files(env, cwd)):  # least important first, overwritten by the next
        data = _read_toml(path)
        for section in (data, data.get("pip", {})):
            if section.get("index-url"):
                out["index-url"] = [section["index-url"]]
            if section.get("extra-index-url"):
                out["extra-index-url"] = list(section["extra-index-url"])
            if section.get("find-links"):
                out["find-links"] = list(section["find-links"])
            if section.get("no-index"):
                out["no-index"] = ["1"]
            for idx in section.get("index", []):
                if idx.get("default"):
                    out["index-url"] = [idx["url"]]
                elif idx.get("url"):
                    out.setdefault("extra-index-url", []).append(idx["url"])
    return out


def _pip_settings(env: dict[str, str]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(settings from PIP_* variables, settings from pip.conf files), both as reported by ``pip config list``."""
    # The base venv has pip; a cell venv without its own (uv-built, e.g. .envs/tests) imports it through its .pth.
    cmd = [sys.executable, "-m", "pip", "config", "list"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IndexConfigError(f"cannot read pip's configuration ({' '.join(cmd)}): {exc}") from exc
    if proc.returncode != 0:
        raise IndexConfigError(f"cannot read pip's configuration ({' '.join(cmd)} exited {proc.returncode}): "
                               f"{proc.stderr.strip()[-500:]}")
    by_section: dict[str, dict[str, str]] = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^([^.=]*)\.([\w-]+)=(.*)$", line.strip())
        if not m:
            continue
        try:
            value = ast.literal_eval(m.group(3))
        except (ValueError, SyntaxError):
            value = m.group(3).strip("'\"")
        by_section.setdefault(m.group(1), {})[m.group(2)] = str(value)

    def pick(sections: tuple[str, ...]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for key in ("index-url", "extra-index-url", "find-links", "no-index"):
            value = next((by_section[s][key] for s in sections if key in by_section.get(s, {})), None)
            if value is None:
                continue
            if key == "no-index":
                if _truthy(value):
                    out[key] = ["1"]
            else:
                out[key] = _split(value)
        return out

    return pick((":env:",)), pick(("install", "global"))


# ----------------------------------------------------------------------------------------------- the simple API

@dataclass(frozen=True)
class IndexFile:
    """One distribution file listed for a project."""

    filename: str
    url: str
    version: str
    source: str                       # the index or find-links location that listed it
    sha256: str | None = None
    yanked: bool = False
    requires_python: str | None = None
    upload_time: str | None = None


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[dict[str, str | None]] = []
        self._current: dict[str, str | None] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._current = {**dict(attrs), "_text": ""}
            self.links.append(self._current)

    def handle_data(self, data: str) -> None:
        if self._current is not None:
            self._current["_text"] = (self._current["_text"] or "") + data

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self._current = None


def _file_version(filename: str, project: str | None) -> str | None:
    """Version of a wheel or sdist file of ``project`` (None: another project, or not a distribution file)."""
    try:
        if filename.endswith(".whl"):
            name, version, _build, tags = parse_wheel_filename(filename)
            if not any(t in _supported_tags() for t in tags):
                return None  # a wheel this interpreter cannot install
        elif filename.endswith((".tar.gz", ".zip")):
            name, version = parse_sdist_filename(filename)
        else:
            return None
    except (InvalidWheelFilename, InvalidSdistFilename):
        return None
    if project is not None and canonicalize_name(name) != canonicalize_name(project):
        return None
    return str(version)


@cache
def _supported_tags() -> frozenset:
    return frozenset(sys_tags())


def _python_ok(requires_python: str | None) -> bool:
    if not requires_python:
        return True
    try:
        return SpecifierSet(requires_python).contains(Version(".".join(map(str, sys.version_info[:3]))),
                                                      prereleases=True)
    except InvalidSpecifier:
        return True  # pip ignores a malformed Requires-Python too (the file stays a candidate)


def _files_from_links(links: list[dict[str, str | None]], base_url: str, project: str | None,
                      source: str) -> list[IndexFile]:
    out = []
    for a in links:
        href = a.get("href")
        if not href:
            continue
        url = urllib.parse.urljoin(base_url, href)
        path, _, frag = url.partition("#")
        filename = urllib.parse.unquote(path.rsplit("/", 1)[-1])
        version = _file_version(filename, project)
        if version is None:
            continue
        sha = frag.removeprefix("sha256=") if frag.startswith("sha256=") else None
        yanked = a.get("data-yanked")
        out.append(IndexFile(filename, path, version, source, sha, yanked is not None,
                             a.get("data-requires-python")))
    return out


def _files_from_json(data: dict[str, Any], base_url: str, project: str, source: str) -> list[IndexFile]:
    out = []
    for f in data.get("files", []):
        version = _file_version(f["filename"], project)
        if version is None:
            continue
        out.append(IndexFile(f["filename"], urllib.parse.urljoin(base_url, f["url"]), version, source,
                             (f.get("hashes") or {}).get("sha256"), bool(f.get("yanked")), f.get("requires-python"),
                             f.get("upload-time")))
    return out


def _local_path(location: str) -> Path | None:
    if location.startswith("file:"):
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(location).path))
    if "://" not in location:
        return Path(location).expanduser()
    return None


def _fetch(url: str, timeout: float) -> tuple[bytes, str]:
    req = urllib.request.Request(url, headers={"Accept": JSON_ACCEPT, "User-Agent": "moe-compat-harness"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the configured index URL
        return resp.read(), resp.headers.get("Content-Type", "")


def list_index(index_url: str, project: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> list[IndexFile]:
    """Files of ``project`` on one simple-API index (``https://…/simple`` or ``file:///…/simple``).

    [] when the index has no such project (404 / no directory); ``IndexUnreachable`` when the index does not answer.
    """
    name = canonicalize_name(project)
    page = f"{index_url.rstrip('/')}/{name}/"
    local = _local_path(index_url)
    if local is not None:
        if not local.is_dir():
            raise IndexUnreachable(f"index {index_url}: directory {local} does not exist")
        html_file = local / name / "index.html"
        if not html_file.is_file():
            return []
        parser = _Links()
        parser.feed(html_file.read_text(errors="replace"))
        return _files_from_links(parser.links, html_file.as_uri(), project, index_url)
    try:
        body, ctype = _fetch(page, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return []
        raise IndexUnreachable(f"index {index_url}: HTTP {exc.code} {exc.reason} for {page}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise IndexUnreachable(f"index {index_url} unreachable ({type(exc).__name__}: {reason}) asking for {page}") \
            from exc
    if "json" in ctype:
        try:
            return _files_from_json(json.loads(body), page, project, index_url)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise IndexUnreachable(f"index {index_url}: malformed PEP 691 JSON for {page} ({exc})") from exc
    parser = _Links()
    parser.feed(body.decode("utf-8", errors="replace"))
    return _files_from_links(parser.links, page, project, index_url)


def list_find_links(location: str, project: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> list[IndexFile]:
    """Files of ``project`` in a find-links location: a local directory (or ``file://`` one) or an HTML page."""
    local = _local_path(location)
    if local is not None:
        if not local.is_dir():
            raise IndexUnreachable(f"find-links location {location}: directory {local} does not exist")
        return [IndexFile(p.name, p.as_uri(), v, location) for p in sorted(local.iterdir())
                if (v := _file_version(p.name, project)) is not None]
    try:
        body, _ctype = _fetch(location, timeout)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise IndexUnreachable(f"find-links location {location} unreachable ({type(exc).__name__}: "
                               f"{getattr(exc, 'reason', exc)})") from exc
    parser = _Links()
    parser.feed(body.decode("utf-8", errors="replace"))
    return _files_from_links(parser.links, location, project, location)


# ----------------------------------------------------------------------------------------------- per-run source

class RunCache:
    """Per-run memo: each key computed once; an exception is remembered and raised again (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[Any, threading.Lock] = {}
        self._done: dict[Any, tuple[bool, Any]] = {}

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._done:
                try:
                    self._done[key] = (True, compute())
                except ResolveError as exc:
                    self._done[key] = (False, exc)
            ok, value = self._done[key]
        if not ok:
            raise value
        return value


class IndexSource(RunCache):
    """Versions and files of packages from the configured sources; one query per package and source per run.

    Callable as a version source: ``source("peft") -> ["0.18.1", "0.19.0", ...]`` (versions with at least one
    installable file: not yanked, Requires-Python admits this interpreter, a wheel tag it supports or an sdist).
    """

    def __init__(self, config: IndexConfig | None = None, *, timeout: float = DEFAULT_TIMEOUT_S):
        super().__init__()
        self._config = config
        self.timeout = timeout
        self._dead: dict[str, IndexUnreachable] = {}
        self._dead_lock = threading.Lock()

    @cached_property
    def config(self) -> IndexConfig:
        return self._config if self._config is not None else IndexConfig.from_environment()

    def _ask(self, location: str, project: str, lister: Callable[..., list[IndexFile]]) -> list[IndexFile]:
        with self._dead_lock:
            dead = self._dead.get(location)
        if dead is not None:
            raise IndexUnreachable(f"{dead} (not asked again in this run)")
        try:
            return lister(location, project, timeout=self.timeout)
        except IndexUnreachable as exc:
            with self._dead_lock:
                self._dead.setdefault(location, exc)
            raise

    def files(self, package: str) -> list[IndexFile]:
        """Every listed file of ``package`` over all sources (indexes first, then find-links), in source order."""

        def compute() -> list[IndexFile]:
            out: list[IndexFile] = []
            for url in self.config.indexes:
                out += self._ask(url, package, list_index)
            for loc in self.config.find_links:
                out += self._ask(loc, package, list_find_links)
            return out

        return self.memo(("files", canonicalize_name(package)), compute)

    def __call__(self, package: str) -> list[str]:
        files = [f for f in self.files(package) if not f.yanked and _python_ok(f.requires_python)]
        return sorted({f.version for f in files}, key=Version)

    def provenance(self, package: str, version: str) -> dict[str, Any]:
        """Where ``package==version`` comes from: the sources listing it and each file's sha256."""
        files = [f for f in self.files(package) if Version(f.version) == Version(version)]
        return {"kind": "index", "version": version, "sources": list(dict.fromkeys(f.source for f in files)),
                "files": {f.filename: f.sha256 for f in files},
                "uploaded": min((f.upload_time for f in files if f.upload_time), default=None)}

    def describe(self) -> dict[str, Any]:
        return self.config.describe()
