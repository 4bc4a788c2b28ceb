"""Which subject a process checks: ``MOE_COMPAT_SUBJECT`` (default ``impl``), parsed and loaded once.

A spec is ``<name>`` or ``<name>==<version>``: ``impl`` (this checkout), ``unsloth_zoo==2026.10.9`` (the released
wheel), or ``<module>:<function>==<version>`` for an adapter outside this repository (the function takes the version
string, or None, and returns a `harness.subjects.interface.Subject`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

from harness.subjects.interface import Subject, SubjectLoadError

ENV = "MOE_COMPAT_SUBJECT"
DEFAULT = "impl"

# name -> "module:function" of its loader (imported lazily: loading a subject may import heavy upstream code)
ADAPTERS: dict[str, str] = {
    "impl": "harness.subjects.impl_subject:load",
    "unsloth_zoo": "harness.subjects.unsloth_zoo:load",
}


@dataclass(frozen=True)
class SubjectSpec:
    name: str
    version: str | None

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}=={self.version}"


def parse(spec: str) -> SubjectSpec:
    """``"unsloth_zoo==2026.9.8"`` -> SubjectSpec("unsloth_zoo", "2026.9.8"); ``"impl"`` -> ("impl", None)."""
    text = spec.strip()
    name, sep, version = text.partition("==")
    name, version = name.strip(), version.strip()
    if ":" not in name:
        name = name.replace("-", "_")  # the index's spelling unsloth-zoo == unsloth_zoo
    if not name or (sep and not version) or any(c in version for c in " ,<>=!~"):
        raise SubjectLoadError(f"subject spec {spec!r}: expected NAME or NAME==VERSION (one exact version)")
    if ":" not in name and name not in ADAPTERS:
        raise SubjectLoadError(f"unknown subject {name!r}; known: {sorted(ADAPTERS)} (or module:function)")
    return SubjectSpec(name, version or None)


def _loader(name: str) -> Callable[[str | None], Subject]:
    target = ADAPTERS.get(name, name)
    module, _, func = target.partition(":")
    if not func:
        raise SubjectLoadError(f"subject adapter {target!r} must be 'module:function'")
    return getattr(importlib.import_module(module), func)


def prefetch(spec: SubjectSpec) -> None:
    """Download what ``load`` will need (the adapter module's ``fetch(version)``, if it has one) without importing the
    subject: the matrix runner calls this in a cell's install phase, outside the cell's interpreter."""
    target = ADAPTERS.get(spec.name, spec.name)
    module = importlib.import_module(target.partition(":")[0])
    fetch = getattr(module, "fetch", None)
    if fetch is not None:
        fetch(spec.version)


_LOADED: dict[str, Subject] = {}


def current_spec() -> SubjectSpec:
    return parse(os.environ.get(ENV) or DEFAULT)


def load(spec: SubjectSpec | str | None = None) -> Subject:
    """The subject for ``spec`` (default: ``$MOE_COMPAT_SUBJECT`` or impl), loaded once per process."""
    s = parse(spec) if isinstance(spec, str) else (spec or current_spec())
    key = str(s)
    if key not in _LOADED:
        subject = _loader(s.name)(s.version)
        if not isinstance(subject, Subject):
            raise SubjectLoadError(f"{key}: the adapter returned {type(subject).__name__}, not a Subject")
        _LOADED[key] = subject
    return _LOADED[key]
