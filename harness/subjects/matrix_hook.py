"""How the matrix runner treats an axis of ``kind = "subject"`` (harness/matrix.py): the hook runner.py calls.

A subject axis is resolved against the package index like any other (``unsloth_zoo = "latest"`` -> the newest
release), but its package is not installed into the cell venv (its declared dependencies would pull torchvision, trl,
a torch, ...). Instead `prepare` fetches the released wheel into the subject cache (harness/subjects/wheel.py) during
the cell's install phase, and the cell's pytest runs with ``MOE_COMPAT_SUBJECT=<package>==<version>``: the subject
checks (tests/subjects) load that version from the cache in the cell's own interpreter, next to the cell's PEFT and
transformers.
"""

from __future__ import annotations

from collections.abc import Mapping

from harness.subjects import registry
from harness.subjects.interface import SubjectLoadError


def split(subjects: frozenset[str], resolution) -> tuple[list[str], dict[str, str]]:
    """(requirements to install in the cell venv, {subject package: version}) from a cell's `matrix.Resolution`."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    names = {canonicalize_name(p) for p in subjects}
    install = [r for r in resolution.requirements() if canonicalize_name(Requirement(r).name) not in names]
    return install, {p: v for p, v in resolution.resolved.items() if p in subjects}


def prepare(subject_versions: Mapping[str, str]) -> dict[str, str]:
    """Fetch each subject's wheel (cached) and return the cell's environment: ``MOE_COMPAT_SUBJECT``.

    Raises SubjectLoadError (the cell becomes ``error`` with the cause) for an unknown subject, several subject axes in
    one cell, or a failed download.
    """
    if not subject_versions:
        return {}
    if len(subject_versions) > 1:
        raise SubjectLoadError(f"a cell checks one subject; this one has {dict(subject_versions)}")
    (name, version), = subject_versions.items()
    spec = registry.parse(f"{name}=={version}")
    registry.prefetch(spec)
    return {registry.ENV: str(spec)}
