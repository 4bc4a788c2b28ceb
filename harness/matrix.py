"""Matrix files (``matrices/*.toml``): cells, version specs and their resolution, known-broken data.

A matrix file has (every key is type-checked and unknown keys are errors, at every level; the messages name the
file and the key path, e.g. ``matrices/x.toml: axis[1].values[2].id: ...``)
* ``[matrix]``: ``name``, ``description``, ``tests`` (non-empty list of pytest paths run in every cell),
  ``timeout_s`` (test phase, > 0), ``install_timeout_s`` (> 0), ``pytest_args`` (list), optional
  ``extends = "<other matrix>"`` (axes values, packages, pins, known/incompatible/retired entries are appended
  to the other file's);
* ``[packages]``: packages installed in every cell, ``name = "<spec>"`` (resolved like the axes, e.g. accelerate);
* ``[[axis]]``: ``package``, ``prefix`` (letters, the start of the axis's part of the cell id) and a non-empty
  ``values = [{id, spec | path | vcs, pre, note}]``: ``id`` is the cell-id fragment (letters, digits, ``.``, ``_``,
  ``+``, ``-``); exactly one of ``spec`` (PEP 440 specifier set), ``path`` (a local wheel or source tree) and
  ``vcs`` (``git+https://...@ref``); ``pre`` (bool, only with ``spec``) admits pre-releases; ``note`` is free
  text. The cross product of the axes gives the cells ``t<id>-p<id>``; two cells with one id are an error;
* ``[[pin]]``: ``cells`` globs + ``packages = {name = spec}``: extra pins for some cells (never torch: torch is
  always the base venv's; a torch pin, package or axis is an error);
* ``[[known]]``: known-broken checks: ``cells`` (globs on cell ids) and/or ``when`` (PEP 440 specifiers on the
  *installed* versions, e.g. ``{transformers = ">=5.6", peft = ">=0.19,<0.20"}``), ``checks`` (globs on check names
  and node ids), optional ``families``, ``expect`` (``xfail``: strict, a pass is reported as ``xpass``; ``skip``),
  ``match`` (regex the failure text must match), ``reason``, ``link``;
* ``[[incompatible]]``: cells whose packages cannot be imported together (``cells``/``when``, ``reason``,
  ``link``): the cell is ``skipped`` with the reason once the import probe confirms it (a probe that succeeds
  means the entry is stale: the cell runs and the stale entry is reported as an ``xpass`` check);
* ``[[retired]]``: checks removed on purpose: ``checks`` (globs on check names and node ids), ``reason``, optional
  ``cells`` and ``link``. Against ``--baseline``, a check of the baseline absent from a cell that ran its tests is
  a regression unless a retired entry matches it (then it is listed as ``removed``).

The top-level tables allowed are ``SECTIONS`` (one constant: add a new section there).

A spec is a PEP 440 specifier set resolved to the newest final release on the index that satisfies it
(``"==4.57.*"`` newest 4.57.x, ``"==5.0.0"`` exactly, ``""`` or ``"latest"`` newest release). A spec no release
satisfies makes the cell ``unreleased``.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from harness.records import id_problem

ROOT = Path(__file__).resolve().parent.parent
MATRICES_DIR = ROOT / "matrices"

VersionSource = Callable[[str], list[str]]

# The top-level tables of a matrix file: name -> dict (a [table]) or list (an array of [[tables]]).
SECTIONS: dict[str, type] = {"matrix": dict, "packages": dict, "axis": list, "pin": list, "known": list,
                             "incompatible": list, "retired": list}
MATRIX_KEYS = ("name", "description", "tests", "timeout_s", "install_timeout_s", "pytest_args", "extends")
AXIS_KEYS = ("package", "prefix", "values")
AXIS_VALUE_KEYS = ("id", "spec", "pre", "path", "vcs", "note")
AXIS_SOURCES = ("spec", "path", "vcs")        # exactly one per axis value
PIN_KEYS = ("cells", "packages")
KNOWN_KEYS = ("checks", "reason", "link", "expect", "cells", "when", "families", "match")
INCOMPATIBLE_KEYS = ("reason", "link", "cells", "when")
RETIRED_KEYS = ("checks", "reason", "cells", "link")
SHARED_FROM_BASE = ("torch",)                 # always the base venv's; never a cell's own
_PACKAGE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
_PREFIX = re.compile(r"[A-Za-z]+")


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


def _glob_match(values: tuple[str, ...], globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(v, g) for g in globs for v in values)


@dataclass(frozen=True)
class AxisValue:
    """One value of an axis: ``id`` (cell-id fragment) and its source, exactly one of ``spec`` (a PEP 440
    specifier set; ``pre`` admits pre-releases), ``path`` (local wheel or source tree) or ``vcs`` (``git+...``)."""

    package: str
    id: str
    spec: str | None = None
    note: str = ""
    pre: bool = False
    path: str | None = None
    vcs: str | None = None


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
        if self.cells and (cell is None or not _glob_match((cell,), self.cells)):
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
        if self.families and (family is None or not _glob_match((family,), self.families)):
            return False
        return _glob_match((name, node_id), self.checks)

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
class Retired:
    """Checks removed on purpose (``[[retired]]``): a check of the baseline absent now that matches ``checks``
    (globs on the name or node id) in a cell matching ``cells`` (empty: every cell) is ``removed``, not a
    regression (``harness.records.compare``)."""

    checks: tuple[str, ...]
    reason: str
    cells: tuple[str, ...] = ()
    link: str = ""

    def matches(self, cell: str, check: Mapping[str, Any]) -> bool:
        if self.cells and not _glob_match((cell,), self.cells):
            return False
        return _glob_match((check.get("name") or "", check.get("node_id") or ""), self.checks)

    def describe(self) -> dict[str, Any]:
        return {"checks": list(self.checks), "cells": list(self.cells), "reason": self.reason, "link": self.link}


@dataclass(frozen=True)
class CellSpec:
    """One cell of the matrix: its id, the version spec of each package (axes, common packages, pins) and the
    axis value of each axis package (which also carries ``pre`` / ``path`` / ``vcs``)."""

    id: str
    specs: dict[str, str]
    axis_ids: dict[str, str]
    axis_values: dict[str, AxisValue] = field(default_factory=dict)


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
    retired: tuple[Retired, ...] = ()

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
            specs.update({v.package: v.spec for v in combo if v.spec is not None})
            for globs, pinned in self.pins:
                if _glob_match((cid,), globs):
                    specs.update(pinned)
            out.append(CellSpec(cid, specs, {v.package: v.id for v in combo}, {v.package: v for v in combo}))
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


# ----------------------------------------------------------------------------------------------- validation

def _type_name(value: Any) -> str:
    return {dict: "a table", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)


class _Table:
    """Typed access to one TOML table of a matrix file; every error names the file and the key path."""

    def __init__(self, file: Path, where: str, data: Any, allowed: tuple[str, ...]):
        self.file, self.where = file, where
        if not isinstance(data, dict):
            raise self.error("", f"expected a table, got {_type_name(data)} {data!r}")
        unknown = [k for k in data if k not in allowed]
        if unknown:
            what = "unknown top-level keys" if not where else "unknown key(s)"
            raise self.error("", f"{what} {unknown}; allowed: {', '.join(allowed)}")
        self.data = data

    def path(self, key: str) -> str:
        return ".".join(p for p in (self.where, key) if p)

    def error(self, key: str, message: str) -> MatrixError:
        return MatrixError(f"{self.file}: {self.path(key) or '(top level)'}: {message}")

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def string(self, key: str, default: str | None = None, *, required: bool = False, nonempty: bool = False) -> Any:
        if key not in self.data:
            if required:
                raise self.error(key, "required")
            return default
        value = self.data[key]
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_type_name(value)} {value!r}")
        if nonempty and not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_type_name(value)} {value!r}")
        return value

    def seconds(self, key: str) -> float | None:
        """A positive, finite number of seconds, or None when absent."""
        if key not in self.data:
            return None
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"expected a number of seconds, got {_type_name(value)} {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise self.error(key, f"must be a finite number > 0, got {value!r}")
        return float(value)

    def strings(self, key: str, *, required: bool = False, glob: bool = False,
                may_be_empty: bool = False) -> tuple[str, ...] | None:
        """A list of non-empty strings (``glob``: a single string is a one-item list); None when absent."""
        if key not in self.data:
            if required:
                raise self.error(key, "required")
            return None
        value = self.data[key]
        if glob and isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of strings{' (or one string)' if glob else ''}, got "
                                  f"{_type_name(value)} {value!r}")
        if not value and not may_be_empty:
            raise self.error(key, "must not be an empty list")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise self.error(f"{key}[{i}]", f"expected a non-empty string, got {_type_name(item)} {item!r}")
        return tuple(value)

    def tables(self, key: str) -> list[Any]:
        value = self.data.get(key, [])
        if not isinstance(value, list):
            raise self.error(key, f"expected an array of tables ([[{key}]] or a list of {{...}}), got "
                                  f"{_type_name(value)}")
        return value

    def sub(self, key: str, allowed: tuple[str, ...] | None = None) -> _Table:
        """The table under ``key`` (empty when absent); ``allowed`` None = any keys."""
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {_type_name(value)} {value!r}")
        return _Table(self.file, self.path(key), value, tuple(value) if allowed is None else allowed)

    def package(self, key: str, name: Any, *, shared_ok: bool = False) -> str:
        """``name`` as a package name (``key`` is where it was found)."""
        if not isinstance(name, str) or not _PACKAGE_NAME.fullmatch(name):
            raise self.error(key, f"{name!r} is not a package name")
        if not shared_ok and name.lower() in SHARED_FROM_BASE:
            raise self.error(key, f"{name} cannot be pinned per cell; every cell shares the base venv's {name} "
                                  f"(make a base venv per {name} version instead)")
        return name

    def specs(self, key: str) -> dict[str, str]:
        """A table ``package = "<spec>"``."""
        table = self.sub(key)
        out = {}
        for pkg, spec in table.data.items():
            table.package(pkg, pkg)
            if not isinstance(spec, str):
                raise table.error(pkg, f"expected a version spec string, got {_type_name(spec)} {spec!r}")
            _spec_set(spec, f"{table.file}: {table.path(pkg)}")
            out[pkg] = spec
        return out

    def when(self) -> tuple[tuple[str, str], ...]:
        if "when" not in self.data:
            return ()
        table = self.sub("when")
        for pkg, spec in table.data.items():
            table.package(pkg, pkg, shared_ok=True)
            if not isinstance(spec, str):
                raise table.error(pkg, f"expected a version spec string, got {_type_name(spec)} {spec!r}")
            _spec_set(spec, f"{table.file}: {table.path(pkg)}")
        if not table.data:
            raise self.error("when", "must not be an empty table")
        return tuple(sorted(table.data.items()))


def _axis_value(file: Path, where: str, package: str, data: Any) -> AxisValue:
    t = _Table(file, where, data, AXIS_VALUE_KEYS)
    vid = t.string("id", required=True)
    problem = id_problem(vid)
    if problem:
        raise t.error("id", problem)
    sources = [k for k in AXIS_SOURCES if k in t]
    if len(sources) != 1:
        raise t.error("", f"needs exactly one of {', '.join(AXIS_SOURCES)}, got "
                          f"{', '.join(sources) if sources else 'none'}")
    spec = t.string("spec")
    if spec is not None:
        _spec_set(spec, f"{file}: {t.path('spec')}")
    if "pre" in t and spec is None:
        raise t.error("pre", "only together with `spec` (a path or vcs value is taken as it is)")
    path = t.string("path", nonempty=True)
    vcs = t.string("vcs", nonempty=True)
    if vcs is not None and not re.fullmatch(r"git\+(https|ssh|file)://\S+", vcs):
        raise t.error("vcs", f"expected git+https://...@ref (or git+ssh://, git+file://), got {vcs!r}")
    return AxisValue(package, vid, spec, t.string("note", ""), t.boolean("pre", False), path, vcs)


def _declared(t: _Table, required: tuple[str, ...], *, scoped: str | None = None) -> dict[str, Any]:
    """The fields shared by [[known]], [[incompatible]] and [[retired]]: reason, link, cells (and, when ``scoped``,
    ``when``: such an entry needs ``cells`` or ``when``; ``scoped`` completes the error message)."""
    fields = {"reason": t.string("reason", required="reason" in required, nonempty=True),
              "link": t.string("link", "", required="link" in required, nonempty="link" in required),
              "cells": t.strings("cells", glob=True) or ()}
    if scoped is not None:
        fields["when"] = t.when()
        if not fields["cells"] and not fields["when"]:
            raise t.error("", f"needs `cells` or `when`{scoped}")
    return fields


def load_matrix(name_or_path: str | Path, _seen: tuple[Path, ...] = ()) -> Matrix:
    """Parse and validate a matrix file (following ``extends``); ``MatrixError`` names the file and key path."""
    path = matrix_path(name_or_path).resolve()
    if path in _seen:
        raise MatrixError(f"{path}: `extends` cycle through {[str(p) for p in _seen]}")
    if not path.is_file():
        raise MatrixError(f"matrix file {path} does not exist (matrices: "
                          f"{', '.join(p.stem for p in sorted(MATRICES_DIR.glob('*.toml')))})")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MatrixError(f"{path}: {exc}") from exc
    top = _Table(path, "", data, tuple(SECTIONS))
    for key, kind in SECTIONS.items():
        if key in data and not isinstance(data[key], kind):
            raise top.error(key, f"expected {'a [table]' if kind is dict else 'an array of [[tables]]'}, got "
                                 f"{_type_name(data[key])}")
    meta = top.sub("matrix", MATRIX_KEYS)
    extends = meta.string("extends", nonempty=True)
    if extends is not None:
        try:
            base = load_matrix(extends, (*_seen, path))
        except MatrixError as exc:
            raise MatrixError(f"{path}: matrix.extends = {extends!r}: {exc}") from exc
    else:
        base = None

    axes: dict[str, tuple[str, list[AxisValue]]] = {}
    if base is not None:
        axes = {pkg: (prefix, list(values)) for pkg, prefix, values in base.axes}
    for i, raw in enumerate(top.tables("axis")):
        ax = _Table(path, f"axis[{i}]", raw, AXIS_KEYS)
        pkg = ax.package("package", ax.string("package", required=True))
        old_prefix = axes[pkg][0] if pkg in axes else None
        prefix = ax.string("prefix", old_prefix or pkg[0])
        if not _PREFIX.fullmatch(prefix):
            raise ax.error("prefix", f"{prefix!r} must be letters only (the start of the axis's part of the cell id)")
        if old_prefix is not None and prefix != old_prefix:
            raise ax.error("prefix", f"{prefix!r} differs from the prefix {old_prefix!r} of the {pkg} axis it extends")
        clash = next((p for p, (pre, _v) in axes.items() if pre == prefix and p != pkg), None)
        if clash is not None:
            raise ax.error("prefix", f"{prefix!r} is already the prefix of the {clash} axis")
        raw_values = ax.tables("values") if "values" in ax else None
        if raw_values is None:
            raise ax.error("values", "required")
        if not raw_values:
            raise ax.error("values", "must not be empty (an axis without values gives no cells)")
        values = axes[pkg][1] if pkg in axes else []
        for j, v in enumerate(raw_values):
            value = _axis_value(path, f"axis[{i}].values[{j}]", pkg, v)
            if any(x.id == value.id for x in values):
                raise ax.error(f"values[{j}].id", f"duplicate id {value.id!r} in the {pkg} axis")
            values.append(value)
        axes[pkg] = (prefix, values)
    if not axes:
        raise top.error("axis", "no [[axis]]: a matrix needs at least one axis")

    packages = dict(base.packages) if base else {}
    packages.update(top.specs("packages"))
    pins = list(base.pins) if base else []
    for i, raw in enumerate(top.tables("pin")):
        pin = _Table(path, f"pin[{i}]", raw, PIN_KEYS)
        globs = pin.strings("cells", required=True, glob=True)
        if "packages" not in pin:
            raise pin.error("packages", "required")
        pinned = pin.specs("packages")
        if not pinned:
            raise pin.error("packages", "must not be empty")
        pins.append((globs, pinned))

    known = list(base.known) if base else []
    for i, raw in enumerate(top.tables("known")):
        k = _Table(path, f"known[{i}]", raw, KNOWN_KEYS)
        common = _declared(k, ("reason", "link"), scoped=" (an entry for every cell is not a known breakage)")
        expect = k.string("expect", "xfail")
        if expect not in ("xfail", "skip"):
            raise k.error("expect", f"expect must be 'xfail' or 'skip', got {expect!r}")
        match = k.string("match", nonempty=True)
        if match is not None:
            try:
                re.compile(match)
            except re.error as exc:
                raise k.error("match", f"invalid regular expression {match!r}: {exc}") from exc
        known.append(Known(checks=k.strings("checks", required=True, glob=True), expect=expect,
                           families=k.strings("families", glob=True) or (), match=match, **common))
    incompatible = list(base.incompatible) if base else []
    for i, raw in enumerate(top.tables("incompatible")):
        k = _Table(path, f"incompatible[{i}]", raw, INCOMPATIBLE_KEYS)
        incompatible.append(Incompatible(**_declared(k, ("reason", "link"), scoped="")))
    retired = list(base.retired) if base else []
    for i, raw in enumerate(top.tables("retired")):
        k = _Table(path, f"retired[{i}]", raw, RETIRED_KEYS)
        retired.append(Retired(checks=k.strings("checks", required=True, glob=True), **_declared(k, ("reason",))))

    name = meta.string("name", nonempty=True)
    if name is not None and id_problem(name):
        raise meta.error("name", id_problem(name))
    tests = meta.strings("tests")
    matrix = Matrix(
        name=name or path.stem, path=path, description=meta.string("description", ""),
        tests=tests or (base.tests if base else ("tests",)),
        axes=tuple((pkg, prefix, tuple(values)) for pkg, (prefix, values) in axes.items()),
        packages=packages, pins=tuple(pins), known=tuple(known), incompatible=tuple(incompatible),
        timeout_s=meta.seconds("timeout_s") or (base.timeout_s if base else 1800.0),
        install_timeout_s=meta.seconds("install_timeout_s") or (base.install_timeout_s if base else 900.0),
        pytest_args=(meta.strings("pytest_args", may_be_empty=True) if "pytest_args" in meta
                     else base.pytest_args if base else ()),
        retired=tuple(retired),
    )
    seen: dict[str, str] = {}
    for cell in matrix.cells():
        combo = ", ".join(f"{p} {v}" for p, v in cell.axis_ids.items())
        if cell.id in seen:
            raise MatrixError(f"{path}: axis: two cells have the id {cell.id!r} ({seen[cell.id]} and {combo}); "
                              f"change an axis-value id")
        seen[cell.id] = combo
    return matrix


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
