"""Synthetic upstream releases for the harness's offline tests: installed distributions re-packed as wheels (optionally
under another version and with one line changed), and a PEP 503 "simple" directory index that pip and uv read
through a ``file://`` URL.

A wheel is a zip of the files a distribution installed (its ``RECORD``, minus byte code and files outside
site-packages) with a ``*.dist-info`` that names the new version; ``RECORD`` is rewritten with the new hashes. No build
backend is involved, so re-packing transformers (60 MB, stored uncompressed) takes about a second.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
import sysconfig
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name

SKIP_DIST_FILES = {"INSTALLER", "REQUESTED", "direct_url.json", "RECORD"}


@dataclass(frozen=True)
class Patch:
    """Replace ``old`` by ``new`` in the file ``path`` (relative to site-packages); ``old`` must occur exactly once."""

    path: str
    old: str
    new: str


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _wheel_tags(wheel_text: str) -> str:
    """``py3-none-any`` (or the compressed tag set ``cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64``) from the
    ``Tag:`` lines of a WHEEL file."""
    tags = [ln.split(":", 1)[1].strip() for ln in wheel_text.splitlines() if ln.startswith("Tag:")]
    if not tags:
        raise ValueError(f"WHEEL file without Tag lines:\n{wheel_text}")
    parts = [dict.fromkeys(t.split("-")[i] for t in tags) for i in range(3)]
    return "-".join(".".join(p) for p in parts)


def repack(dist_name: str, out_dir: Path, *, version: str | None = None, patches: tuple[Patch, ...] = (),
           path: list[str] | None = None) -> Path:
    """Write ``out_dir/<name>-<version>-<tags>.whl`` from the installed distribution ``dist_name``.

    ``path``: where to look for the distribution (default: ``sys.path``). ``patches`` must each apply exactly once,
    otherwise ``ValueError`` names the file and the text (a silently unpatched "regression" would prove nothing).
    """
    dists = list(metadata.distributions(name=dist_name, path=path)) if path else [metadata.distribution(dist_name)]
    if not dists:
        raise ValueError(f"distribution {dist_name} not found in {path}")
    dist = dists[0]
    old_version = dist.version
    version = version or old_version
    name = dist.metadata["Name"]
    norm = re.sub(r"[-_.]+", "_", name)
    info_dirs = {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0].endswith(".dist-info")}
    if len(info_dirs) != 1:
        raise ValueError(f"{name}: expected one .dist-info directory in RECORD, got {sorted(info_dirs)}")
    old_info = info_dirs.pop()
    new_info = f"{norm}-{version}.dist-info"
    pending = {p.path: p for p in patches}
    records: list[str] = []
    wheel_text = ""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{name}-{version}.partial"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for f in dist.files or []:
            rel = f.as_posix()
            if rel.startswith("..") or "__pycache__" in f.parts or rel.endswith(".pyc"):
                continue  # console scripts outside site-packages are regenerated from entry_points.txt
            if f.parts[0] == old_info:
                if f.name in SKIP_DIST_FILES:
                    continue
                arc = f"{new_info}/{'/'.join(f.parts[1:])}"
            else:
                arc = rel
            data = Path(dist.locate_file(f)).read_bytes()
            if f.parts[0] == old_info and f.name == "METADATA":
                text, n = re.subn(r"(?m)^Version: .*$", f"Version: {version}", data.decode())
                if n != 1:
                    raise ValueError(f"{name}: METADATA has {n} Version lines")
                data = text.encode()
            if f.parts[0] == old_info and f.name == "WHEEL":
                wheel_text = data.decode()
            if rel in pending:
                p = pending.pop(rel)
                text = data.decode()
                if text.count(p.old) != 1:
                    raise ValueError(f"{name} {old_version}: {rel} contains {p.old!r} {text.count(p.old)} times, "
                                     f"expected exactly once")
                data = text.replace(p.old, p.new).encode()
            zf.writestr(arc, data)
            records.append(f"{arc},{_record_hash(data)},{len(data)}")
        records.append(f"{new_info}/RECORD,,")
        zf.writestr(f"{new_info}/RECORD", "\n".join(records) + "\n")
    if pending:
        tmp.unlink()
        raise ValueError(f"{name} {old_version}: patched files not in the distribution: {sorted(pending)}")
    wheel = out_dir / f"{norm}-{version}-{_wheel_tags(wheel_text)}.whl"
    tmp.replace(wheel)
    return wheel


def broken_wheel(name: str, version: str, out_dir: Path, *, error: str = "synthetic import failure") -> Path:
    """A minimal pure-Python wheel of ``name`` whose import raises ImportError(``error``) (a release that installs
    but cannot be imported)."""
    norm = re.sub(r"[-_.]+", "_", name)
    info = f"{norm}-{version}.dist-info"
    files = {
        f"{norm}/__init__.py": f"raise ImportError({error!r})\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: wheelkit\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"{norm}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        records = []
        for arc, text in files.items():
            zf.writestr(arc, text)
            records.append(f"{arc},{_record_hash(text.encode())},{len(text.encode())}")
        zf.writestr(f"{info}/RECORD", "\n".join([*records, f"{info}/RECORD,,"]) + "\n")
    return wheel


def write_index(root: Path, wheels: list[Path]) -> Path:
    """A PEP 503 index ``root/simple/<project>/index.html`` linking (absolute ``file://`` URLs with ``#sha256=``) to
    ``wheels`` where they lie. Returns ``root/simple`` (its ``.as_uri()`` is the index URL)."""
    projects: dict[str, list[Path]] = {}
    for w in wheels:
        projects.setdefault(canonicalize_name(w.name.split("-")[0]), []).append(w.resolve())
    simple = root / "simple"
    for project, paths in projects.items():
        d = simple / project
        d.mkdir(parents=True, exist_ok=True)
        links = "\n".join(
            f'<a href="{html.escape(p.as_uri())}#sha256={hashlib.sha256(p.read_bytes()).hexdigest()}">'
            f"{html.escape(p.name)}</a><br/>" for p in sorted(paths))
        (d / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{links}\n</body></html>\n")
    (simple / "index.html").write_text("<!DOCTYPE html>\n<html><body>\n" + "\n".join(
        f'<a href="{p}/">{p}</a><br/>' for p in sorted(projects)) + "\n</body></html>\n")
    return simple


def environment_wheels(out_dir: Path, *, skip: tuple[str, ...] = ("pip", "setuptools")) -> list[Path]:
    """Every distribution of the running interpreter's own site-packages (the ``tests`` venv: transformers, PEFT,
    accelerate and their dependencies; not the shared base) re-packed as a wheel into ``out_dir``."""
    site = sysconfig.get_paths()["purelib"]
    names = sorted({d.metadata["Name"] for d in metadata.distributions(path=[site]) if d.metadata["Name"]})
    return [repack(n, out_dir, path=[site]) for n in names if canonicalize_name(n) not in skip]


def isolated_index_env(monkeypatch, index_url: str, *, var: str = "PIP_INDEX_URL") -> None:
    """Make ``index_url`` the only package source for the harness and both installers: no pip.conf or uv.toml, no
    find-links or extra indexes from the machine, uv offline (a test must not reach the network)."""
    import os

    for key in list(os.environ):
        if key.startswith(("PIP_", "UV_")) and key not in ("UV_CACHE_DIR",):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # pip then reads no configuration file at all
    monkeypatch.setenv("UV_NO_CONFIG", "1")
    monkeypatch.setenv("UV_OFFLINE", "1")
    monkeypatch.setenv(var, index_url)
