"""Matrix files (``matrices/*.toml``): cells, version specs and their resolution, known-broken data.

A matrix file has
* ``[matrix]``: ``name``, ``description``, ``tests`` (pytest paths run in every cell), ``timeout_s`` (test phase),
  ``install_timeout_s``, ``pytest_args``, optional ``extends = "<other matrix>"`` (axes values, packages and
  known entries are appended to the other file's);
* ``[packages]``: packages installed in every cell, ``name = "<spec>"`` (resolved like the axes, e.g. accelerate);
* ``[[axis]]``: ``package``, ``prefix`` (one letter of the cell id) and ``values = [{id, spec, note}]``; the cross
  product of the axes gives the cells ``t<id>-p<id>``; ``kind = "subject"`` makes the axis a *subject* to check
  (resolved like a package, never installed: its released wheel is fetched and the cell runs with
  ``MOE_COMPAT_SUBJECT=<package>==<version>``, see harness/subjects/matrix_hook.py);
* ``[[pin]]``: ``cells`` globs + ``packages = {name = spec}``: extra pins for some cells (never torch: torch is
  always the base venv's; a torch pin is an error);
* ``[[known]]``: known-broken checks: ``cells`` (globs on cell ids) and/or ``when`` (PEP 440 specifiers on the
  *installed* versions, e.g. ``{transformers = ">=5.6", peft = ">=0.19,<0.20"}``), ``checks`` (globs on check names
  and node ids), optional ``families``, ``expect`` (``xfail``: strict, a pass is reported as ``xpass``; ``skip``),
  ``match`` (regex the failure text must match), ``reason``, ``link``;
* ``[[incompatible]]``: cells whose packages cannot be imported together (``cells``/``when``, ``reason``,
  ``link``): the cell is ``skipped`` with the reason once the import probe confirms it (a probe that succeeds
  means the entry is stale: the cell runs and the stale entry is reported as an ``xpass`` check).

A spec is a PEP 440 specifier set resolved to the newest final release on the index that satisfies it
(``"==4.57.*"`` newest 4.57.x, ``"==5.0.0"`` exactly, ``""`` or ``"latest"`` newest release). A spec no release
satisfies makes the cell ``unreleased``.
"""

from __future__ import annotations

import fnmatch
import json
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
MATRICES_DIR = ROOT / "matrices"

VersionSource = Callable[[str], list[str]]
AXIS_KINDS = ("package", "subject")  # `kind` of an [[axis]]: installed in the cell, or a subject to check


class MatrixError(ValueError):
    """A matrix file is malformed; the message names the file and the offending entry."""


class ResolveError(RuntimeError):
    """The package index could not be asked (network, HTTP error); not the same as `unreleased`."""


def _spec_set(spec: str, where: str) -> SpecifierSet:
    text = "" if spec.strip() in ("", "latest", "*") else spec.strip()
    try:
        return SpecifierSet(text)
    except InvalidSpecifier as exc:
        raise MatrixError(f"{where}: invalid version spec {spec!r} ({exc})") from exc


def _globs(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise MatrixError(f"{where}: expected a string or a list of strings, got {value!r}")


@dataclass(frozen=True)
class AxisValue:
    package: str
    id: str
    spec: str
    note: str = ""


@dataclass(frozen=True)
class Known:
    """A known-broken entry (see the module docstring)."""

    checks: tuple[str, ...]
    reason: str
    link: str
    expect: str = "xfail"
    cells: tuple[str, ...] = ()
    when: tuple[tuple[str, str], ...] = ()
    families: tuple[str, ...] = ()
    match: str | None = None

    def applies_to_cell(self, cell: str | None, versions: Mapping[str, str | None]) -> bool:
        """True when the cell glob (if any) and every ``when`` specifier hold for this cell's versions."""
        if self.cells and (cell is None or not any(fnmatch.fnmatchcase(cell, g) for g in self.cells)):
            return False
        for package, spec in self.when:
            installed = versions.get(package)
            if installed is None:
                return False
            try:
                if not SpecifierSet(spec).contains(Version(installed), prereleases=True):
                    return False
            except InvalidVersion:
                return False
        return True

    def matches_check(self, *, name: str, node_id: str, family: str | None, variant: str | None) -> bool:
        """True when a ``checks`` glob matches the check name or node id (and ``families``, if set, the family)."""
        if self.families and (family is None or not any(fnmatch.fnmatchcase(family, f) for f in self.families)):
            return False
        return any(fnmatch.fnmatchcase(v, p) for p in self.checks for v in (name, node_id))

    def describe(self) -> dict[str, Any]:
        return {"checks": list(self.checks), "cells": list(self.cells), "when": dict(self.when),
                "families": list(self.families), "expect": self.expect, "match": self.match,
                "reason": self.reason, "link": self.link}


@dataclass(frozen=True)
class Incompatible:
    reason: str
    link: str
    cells: tuple[str, ...] = ()
    when: tuple[tuple[str, str], ...] = ()

    def applies(self, cell: str, versions: Mapping[str, str | None]) -> bool:
        return Known(checks=(), reason=self.reason, link=self.link, cells=self.cells,
                     when=self.when).applies_to_cell(cell, versions)


@dataclass(frozen=True)
class CellSpec:
    """One cell of the matrix: its id and the version spec of each package (axes, common packages, pins)."""

    id: str
    specs: dict[str, str]
    axis_ids: dict[str, str]


@dataclass(frozen=True)
class Matrix:
    name: str
    path: Path
    description: str
    tests: tuple[str, ...]
    axes: tuple[tuple[str, str, tuple[AxisValue, ...]], ...]  # (package, prefix, values)
    packages: dict[str, str] = field(default_factory=dict)
    pins: tuple[tuple[tuple[str, ...], dict[str, str]], ...] = ()
    known: tuple[Known, ...] = ()
    incompatible: tuple[Incompatible, ...] = ()
    subjects: frozenset[str] = frozenset()  # packages of `kind = "subject"` axes
    timeout_s: float = 1800.0
    install_timeout_s: float = 900.0
    pytest_args: tuple[str, ...] = ()

    def cells(self) -> list[CellSpec]:
        """The cross product of the axes, in file order."""
        combos: list[list[AxisValue]] = [[]]
        for _package, _prefix, values in self.axes:
            combos = [c + [v] for c in combos for v in values]
        prefixes = {pkg: prefix for pkg, prefix, _ in self.axes}
        out = []
        for combo in combos:
            cid = "-".join(f"{prefixes[v.package]}{v.id}" for v in combo)
            specs = dict(self.packages)
            specs.update({v.package: v.spec for v in combo})
            for globs, pinned in self.pins:
                if any(fnmatch.fnmatchcase(cid, g) for g in globs):
                    specs.update(pinned)
            out.append(CellSpec(cid, specs, {v.package: v.id for v in combo}))
        return out

    def cell(self, cell_id: str) -> CellSpec:
        for c in self.cells():
            if c.id == cell_id:
                return c
        raise MatrixError(f"{self.path}: no cell {cell_id!r}; cells are {', '.join(c.id for c in self.cells())}")

    def known_for(self, cell: str | None, versions: Mapping[str, str | None]) -> list[Known]:
        """Known entries in force for ``cell`` with these installed versions."""
        return [k for k in self.known if k.applies_to_cell(cell, versions)]

    def incompatible_for(self, cell: str, versions: Mapping[str, str | None]) -> Incompatible | None:
        return next((i for i in self.incompatible if i.applies(cell, versions)), None)


def matrix_path(name_or_path: str | Path) -> Path:
    """``default`` -> matrices/default.toml; a path is taken as is."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        return p
    return MATRICES_DIR / f"{name_or_path}.toml"


def _when(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise MatrixError(f"{where}: `when` must be a table package = spec, got {value!r}")
    for pkg, spec in value.items():
        _spec_set(str(spec), f"{where}.when.{pkg}")
    return tuple(sorted((str(k), str(v)) for k, v in value.items()))


def load_matrix(name_or_path: str | Path, _seen: tuple[Path, ...] = ()) -> Matrix:
    """Parse and validate a matrix file (following ``extends``)."""
    path = matrix_path(name_or_path).resolve()
    if path in _seen:
        raise MatrixError(f"{path}: `extends` cycle through {[str(p) for p in _seen]}")
    if not path.exists():
        raise MatrixError(f"matrix file {path} does not exist (matrices: "
                          f"{', '.join(p.stem for p in sorted(MATRICES_DIR.glob('*.toml')))})")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise MatrixError(f"{path}: {exc}") from exc
    unknown = set(data) - {"matrix", "packages", "axis", "pin", "known", "incompatible"}
    if unknown:
        raise MatrixError(f"{path}: unknown top-level keys {sorted(unknown)}")
    meta = data.get("matrix", {})
    base = load_matrix(meta["extends"], (*_seen, path)) if "extends" in meta else None

    axes: dict[str, tuple[str, list[AxisValue]]] = {}
    subjects = set(base.subjects) if base is not None else set()
    if base is not None:
        axes = {pkg: (prefix, list(values)) for pkg, prefix, values in base.axes}
    for i, ax in enumerate(data.get("axis", [])):
        where = f"{path}: axis[{i}]"
        if "package" not in ax or "values" not in ax:
            raise MatrixError(f"{where}: needs `package` and `values`")
        pkg = ax["package"]
        kind = ax.get("kind", "package")
        if kind not in AXIS_KINDS:
            raise MatrixError(f"{where}: kind must be one of {AXIS_KINDS}, got {kind!r}")
        if kind == "subject":
            subjects.add(pkg)
        prefix = ax.get("prefix", axes.get(pkg, (pkg[0], []))[0])
        values = axes.get(pkg, (prefix, []))[1]
        for j, v in enumerate(ax["values"]):
            if "id" not in v or "spec" not in v:
                raise MatrixError(f"{where}.values[{j}]: needs `id` and `spec`")
            _spec_set(v["spec"], f"{where}.values[{j}]")
            if any(x.id == str(v["id"]) for x in values):
                raise MatrixError(f"{where}.values[{j}]: duplicate id {v['id']!r}")
            values.append(AxisValue(pkg, str(v["id"]), v["spec"], v.get("note", "")))
        axes[pkg] = (prefix, values)
    if not axes:
        raise MatrixError(f"{path}: no [[axis]]")

    packages = dict(base.packages) if base else {}
    for pkg, spec in data.get("packages", {}).items():
        _spec_set(spec, f"{path}: packages.{pkg}")
        packages[pkg] = spec
    pins = list(base.pins) if base else []
    for i, pin in enumerate(data.get("pin", [])):
        where = f"{path}: pin[{i}]"
        pinned = dict(pin.get("packages", {}))
        if "torch" in pinned:
            raise MatrixError(f"{where}: torch cannot be pinned per cell; every cell shares the base venv's torch "
                              f"(make a base venv per torch version instead)")
        for pkg, spec in pinned.items():
            _spec_set(spec, f"{where}.packages.{pkg}")
        pins.append((_globs(pin.get("cells"), f"{where}.cells"), pinned))

    known = list(base.known) if base else []
    for i, k in enumerate(data.get("known", [])):
        where = f"{path}: known[{i}]"
        for req in ("checks", "reason", "link"):
            if req not in k:
                raise MatrixError(f"{where}: needs `{req}`")
        expect = k.get("expect", "xfail")
        if expect not in ("xfail", "skip"):
            raise MatrixError(f"{where}: expect must be 'xfail' or 'skip', got {expect!r}")
        if not k.get("cells") and not k.get("when"):
            raise MatrixError(f"{where}: needs `cells` or `when` (an entry for every cell is not a known breakage)")
        known.append(Known(checks=_globs(k["checks"], f"{where}.checks"), reason=k["reason"], link=k["link"],
                           expect=expect, cells=_globs(k.get("cells"), f"{where}.cells"),
                           when=_when(k.get("when"), where), families=_globs(k.get("families"), f"{where}.families"),
                           match=k.get("match")))
    incompatible = list(base.incompatible) if base else []
    for i, k in enumerate(data.get("incompatible", [])):
        where = f"{path}: incompatible[{i}]"
        if "reason" not in k or "link" not in k or not (k.get("cells") or k.get("when")):
            raise MatrixError(f"{where}: needs `reason`, `link` and `cells` or `when`")
        incompatible.append(Incompatible(k["reason"], k["link"], _globs(k.get("cells"), f"{where}.cells"),
                                         _when(k.get("when"), where)))

    def pick(key: str, default: Any) -> Any:
        return meta.get(key, getattr(base, key) if base is not None else default)

    return Matrix(
        name=meta.get("name", path.stem), path=path, description=meta.get("description", ""),
        tests=tuple(pick("tests", ("tests",))),
        axes=tuple((pkg, prefix, tuple(values)) for pkg, (prefix, values) in axes.items()),
        packages=packages, pins=tuple(pins), known=tuple(known), incompatible=tuple(incompatible),
        subjects=frozenset(subjects), timeout_s=float(pick("timeout_s", 1800.0)),
        install_timeout_s=float(pick("install_timeout_s", 900.0)), pytest_args=tuple(pick("pytest_args", ())),
    )


# ----------------------------------------------------------------------------------------------- resolution

def resolve_spec(spec: str, versions: list[str]) -> str | None:
    """Newest final release in ``versions`` satisfying ``spec``; None when there is none (`unreleased`)."""
    ss = _spec_set(spec, "spec")
    good = []
    for v in versions:
        try:
            pv = Version(v)
        except InvalidVersion:
            continue
        if pv.is_prerelease or pv.is_devrelease:
            continue
        if ss.contains(pv):
            good.append(pv)
    return str(max(good)) if good else None


def pypi_versions(package: str, *, timeout: float = 30.0) -> list[str]:
    """Release versions of ``package`` on PyPI that have at least one file not yanked (JSON API)."""
    url = f"https://pypi.org/pypi/{package}/json"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - fixed https URL
            data = json.load(resp)
    except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as exc:
        raise ResolveError(f"cannot list versions of {package} from {url}: {exc}") from exc
    return [v for v, files in data.get("releases", {}).items() if files and not all(f.get("yanked") for f in files)]


class CachedSource:
    """Memoizes a version source for one run (one index query per package)."""

    def __init__(self, source: VersionSource = pypi_versions):
        self._source = source
        self._cache: dict[str, list[str]] = {}

    def __call__(self, package: str) -> list[str]:
        if package not in self._cache:
            self._cache[package] = list(self._source(package))
        return self._cache[package]


@dataclass(frozen=True)
class Resolution:
    resolved: dict[str, str]
    unreleased: dict[str, str]  # package -> message

    @property
    def ok(self) -> bool:
        return not self.unreleased

    def requirements(self) -> list[str]:
        return [f"{pkg}=={ver}" for pkg, ver in sorted(self.resolved.items())]


def resolve_cell(cell: CellSpec, source: VersionSource) -> Resolution:
    """Resolve every spec of ``cell``; specs without a release are listed in ``unreleased`` with the newest one."""
    resolved, unreleased = {}, {}
    for pkg, spec in cell.specs.items():
        versions = source(pkg)
        got = resolve_spec(spec, versions)
        if got is None:
            newest = resolve_spec("", versions)
            unreleased[pkg] = (f"no release of {pkg} matches {spec!r} (newest release: {newest})"
                               if newest else f"no release of {pkg} on the index")
        else:
            resolved[pkg] = got
    return Resolution(resolved, unreleased)
