"""Matrix files (``matrices/*.toml``): cells, version specs and their resolution, known-broken data.

A matrix file has
* ``[matrix]``: ``name``, ``description``, ``tests`` (pytest paths run in every cell), ``timeout_s`` (test phase),
  ``install_timeout_s``, ``pytest_args``, optional ``extends = "<other matrix>"`` (axes values, packages and
  known entries are appended to the other file's);
* ``[packages]``: packages installed in every cell, ``name = "<spec>"`` (resolved like the axes, e.g. accelerate);
* ``[[axis]]``: ``package``, ``prefix`` (one letter of the cell id) and ``values = [{id, spec | path | vcs, pre,
  note}]``; the cross product of the axes gives the cells ``t<id>-p<id>``. A value has exactly one of ``spec`` (PEP 440
  specifier set), ``path`` (a local wheel, sdist or source tree, relative to the repository root or absolute) and
  ``vcs`` (``git+https://host/repo@ref``, installed at the commit the ref names when the run starts);
  ``pre = true`` (only with ``spec``) lets the spec resolve to pre-releases (rc, dev, alpha, beta);
* ``[[pin]]``: ``cells`` globs + ``packages = {name = spec}``: extra pins for some cells (never torch: torch is
  always the base venv's; a torch pin is an error);
* ``[[known]]``: known-broken checks: ``cells`` (globs on cell ids) and/or ``when`` (PEP 440 specifiers on the
  *installed* versions, e.g. ``{transformers = ">=5.6", peft = ">=0.19,<0.20"}``), ``checks`` (globs on check names
  and node ids), optional ``families``, ``expect`` (``xfail``: strict, a pass is reported as ``xpass``; ``skip``),
  ``match`` (regex the failure text must match), ``reason``, ``link``;
* ``[[incompatible]]``: cells whose packages cannot be imported together (``cells``/``when``, ``reason``,
  ``link``): the cell is ``skipped`` with the reason once the import probe confirms it (a probe that succeeds
  means the entry is stale: the cell runs and the stale entry is reported as an ``xpass`` check).

A spec is a PEP 440 specifier set resolved to the newest final release on the configured index (``harness/index.py``)
that satisfies it (``"==4.57.*"`` newest 4.57.x, ``"==5.0.0"`` exactly, ``""`` or ``"latest"`` newest release; with
``pre = true`` the newest release or pre-release). A spec no release satisfies makes the cell ``unreleased``.
``path`` and ``vcs`` values resolve through ``harness/direct.py``. The resolved version and the exact source of every
package (index files and their sha256, wheel sha256, tree digest, commit hash) are recorded in the cell record.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from harness import direct
from harness.index import ResolveError, RunCache  # noqa: F401  (ResolveError: re-exported for runner and cli)

ROOT = Path(__file__).resolve().parent.parent
MATRICES_DIR = ROOT / "matrices"

VersionSource = Callable[[str], list[str]]


class MatrixError(ValueError):
    """A matrix file is malformed; the message names the file and the offending entry."""


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
    pre: bool = False
    path: str | None = None
    vcs: str | None = None

    def describe(self) -> str:
        """The value as a spec string for reports: the specifier, ``path:<path>`` or the VCS reference."""
        if self.path is not None:
            return f"path:{self.path}"
        if self.vcs is not None:
            return self.vcs
        return self.spec + (" (pre)" if self.pre else "")


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
    values: dict[str, AxisValue] = field(default_factory=dict)  # axis package -> its value (pre / path / vcs)


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
            specs.update({v.package: v.describe() for v in combo})
            values = {v.package: v for v in combo}
            for globs, pinned in self.pins:
                if any(fnmatch.fnmatchcase(cid, g) for g in globs):
                    specs.update(pinned)
                    for pkg in pinned:
                        values.pop(pkg, None)  # a pin replaces the axis value of its package
            out.append(CellSpec(cid, specs, {v.package: v.id for v in combo}, values))
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


def newest_cell(matrix: Matrix) -> CellSpec:
    """The cell made of each axis's last value (by convention the newest: ``t5.x-platest`` in the default matrix)."""
    last = {pkg: values[-1].id for pkg, _prefix, values in matrix.axes}
    return next(c for c in matrix.cells() if c.axis_ids == last)


def vary(matrix: Matrix, base: CellSpec, package: str, values: list[AxisValue]) -> Matrix:
    """A matrix of the cells of ``base`` with ``package`` taking each of ``values``, every other axis fixed to the
    base cell's value (same packages, pins and known entries). A package that is no axis (e.g. one of
    ``[packages]``) becomes an axis whose prefix is its name."""
    axes = []
    for pkg, prefix, vals in matrix.axes:
        if pkg == package:
            axes.append((pkg, prefix, tuple(values)))
        else:
            axes.append((pkg, prefix, tuple(v for v in vals if v.id == base.axis_ids[pkg])))
    packages = dict(matrix.packages)
    if package not in base.axis_ids:
        if package not in packages:
            raise MatrixError(f"{matrix.path}: {package} is neither an axis nor in [packages] "
                              f"(axes: {', '.join(base.axis_ids)}; packages: {', '.join(packages) or 'none'})")
        packages.pop(package)
        axes.append((package, package, tuple(values)))
    return dataclasses.replace(matrix, axes=tuple(axes), packages=packages)


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
    if base is not None:
        axes = {pkg: (prefix, list(values)) for pkg, prefix, values in base.axes}
    for i, ax in enumerate(data.get("axis", [])):
        where = f"{path}: axis[{i}]"
        if "package" not in ax or "values" not in ax:
            raise MatrixError(f"{where}: needs `package` and `values`")
        pkg = ax["package"]
        prefix = ax.get("prefix", axes.get(pkg, (pkg[0], []))[0])
        values = axes.get(pkg, (prefix, []))[1]
        for j, v in enumerate(ax["values"]):
            kinds = [k for k in ("spec", "path", "vcs") if k in v]
            if "id" not in v or len(kinds) != 1:
                raise MatrixError(f"{where}.values[{j}]: needs `id` and exactly one of `spec`, `path`, `vcs`")
            if v.get("pre") and "spec" not in v:
                raise MatrixError(f"{where}.values[{j}]: `pre = true` goes only with `spec`")
            if "spec" in v:
                _spec_set(v["spec"], f"{where}.values[{j}]")
            if any(x.id == str(v["id"]) for x in values):
                raise MatrixError(f"{where}.values[{j}]: duplicate id {v['id']!r}")
            values.append(AxisValue(pkg, str(v["id"]), v.get("spec", ""), v.get("note", ""), bool(v.get("pre", False)),
                                    v.get("path"), v.get("vcs")))
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
        timeout_s=float(pick("timeout_s", 1800.0)), install_timeout_s=float(pick("install_timeout_s", 900.0)),
        pytest_args=tuple(pick("pytest_args", ())),
    )


# ----------------------------------------------------------------------------------------------- resolution

def resolve_spec(spec: str, versions: list[str], *, pre: bool = False) -> str | None:
    """Newest version in ``versions`` satisfying ``spec``: final releases only, or also pre/dev releases when
    ``pre``; None when there is none (`unreleased`)."""
    ss = _spec_set(spec, "spec")
    good = []
    for v in versions:
        try:
            pv = Version(v)
        except InvalidVersion:
            continue
        if (pv.is_prerelease or pv.is_devrelease) and not pre:
            continue
        if ss.contains(pv, prereleases=pre):
            good.append(pv)
    return str(max(good)) if good else None


class CachedSource(RunCache):
    """A version source asked once per package per run (answers and ResolveErrors memoized, thread-safe).

    ``harness.index.IndexSource`` is the real one (it also tells where a version comes from); tests wrap a table.
    """

    def __init__(self, source: VersionSource):
        super().__init__()
        self._source = source

    def __call__(self, package: str) -> list[str]:
        return self.memo(("versions", package), lambda: list(self._source(package)))

    def provenance(self, package: str, version: str) -> dict[str, Any]:
        return {"kind": "index", "version": version}


def run_source(source: VersionSource) -> RunCache:
    """``source`` as a per-run cache (IndexSource and CachedSource already are one)."""
    return source if isinstance(source, RunCache) else CachedSource(source)


@dataclass(frozen=True)
class Resolution:
    resolved: dict[str, str]          # package -> version (direct references: when known before installing)
    unreleased: dict[str, str]        # package -> message
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)  # package -> exact source (see harness/direct.py)
    direct: dict[str, str] = field(default_factory=dict)  # package -> `name @ url` requirement (path / vcs values)

    @property
    def ok(self) -> bool:
        return not self.unreleased

    def requirements(self) -> list[str]:
        pins = [f"{pkg}=={ver}" for pkg, ver in sorted(self.resolved.items()) if pkg not in self.direct]
        return pins + [req for _pkg, req in sorted(self.direct.items())]


def resolve_value(value: AxisValue, source: VersionSource) -> tuple[str, dict[str, Any]]:
    """(requirement, source record) of a ``path`` or ``vcs`` value, once per run for a given reference."""
    memo = run_source(source).memo
    if value.path is not None:
        return memo(("path", value.package, value.path), lambda: direct.resolve_path(value.package, value.path))
    if value.vcs is not None:
        return memo(("vcs", value.package, value.vcs), lambda: direct.resolve_vcs(value.package, value.vcs))
    raise ValueError(f"{value.package} {value.id}: not a path or vcs value")


def resolve_cell(cell: CellSpec, source: VersionSource) -> Resolution:
    """Resolve every package of ``cell``; specs without a release are listed in ``unreleased`` with the newest one.

    Raises ResolveError (or a subclass: IndexUnreachable, SourceError) when an index, a path or a VCS reference cannot
    be read; the runner turns it into the cell's `error`.
    """
    src = run_source(source)
    resolved, unreleased, sources, direct_reqs = {}, {}, {}, {}
    for pkg, spec in cell.specs.items():
        value = cell.values.get(pkg)
        if value is not None and (value.path is not None or value.vcs is not None):
            req, record = resolve_value(value, src)
            direct_reqs[pkg], sources[pkg] = req, record
            if record.get("version"):
                resolved[pkg] = record["version"]
            continue
        pre = value.pre if value is not None else False
        text = value.spec if value is not None else spec
        versions = src(pkg)
        got = resolve_spec(text, versions, pre=pre)
        if got is None:
            newest = resolve_spec("", versions, pre=pre)
            kind = "release or pre-release" if pre else "release"
            unreleased[pkg] = (f"no {kind} of {pkg} matches {text!r} (newest {kind}: {newest})"
                               if newest else f"no {kind} of {pkg} on the index")
        else:
            resolved[pkg] = got
            sources[pkg] = {**src.provenance(pkg, got), "pre": pre}
    return Resolution(resolved, unreleased, sources, direct_reqs)
