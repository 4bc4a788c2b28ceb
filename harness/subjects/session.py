"""``nox -s subject -- <name>==<version> [harness.cli run options]``: the subjects matrix for one subject version.

Writes a copy of ``matrices/subjects.toml`` whose subject axis holds only ``<version>`` (any released version, not
only the axis values; the PEFT axis and packages are kept) to ``.envs/subject-matrices/<name>-<version>.toml`` and
runs ``python -m harness.cli run --matrix <that file> ...``: one cell per PEFT value, the normal report in
``reports/runs/<run-id>/`` and ``reports/latest``. ``impl`` (no version) checks this checkout's impl the same way.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from harness.matrix import MATRICES_DIR, ROOT, load_matrix
from harness.subjects import registry

OUT_DIR = ROOT / ".envs" / "subject-matrices"  # generated, not versioned (like the cell venvs)


def _toml_value(v) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def _dump(data: dict) -> str:
    """The subset of TOML the matrix files use: tables of scalars/lists/inline tables and arrays of tables."""
    out = []
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            for item in value:
                out.append(f"\n[[{key}]]")
                out += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
        else:
            out.append(f"\n[{key}]")
            out += [f"{k} = {_toml_value(v)}" for k, v in value.items()]
    return "\n".join(out).lstrip() + "\n"


def subject_matrix(spec: str, base: str | Path = MATRICES_DIR / "subjects.toml", out_dir: Path = OUT_DIR) -> Path:
    """Write the one-subject-version matrix for ``spec`` and return its path."""
    s = registry.parse(spec)
    base = Path(base)
    data = tomllib.loads(base.read_text())
    subject_axes = [ax for ax in data.get("axis", []) if ax.get("kind") == "subject"]
    if len(subject_axes) != 1:
        raise SystemExit(f"{base}: expected exactly one axis with kind = \"subject\", found {len(subject_axes)}")
    ax = subject_axes[0]
    ax["package"] = s.name
    ax["values"] = [{"id": s.version or "checkout", "spec": f"=={s.version}" if s.version else "latest",
                     "note": f"nox -s subject -- {s}"}]  # fmt: skip
    if s.name == "impl":
        data["axis"] = [a for a in data["axis"] if a is not ax]  # impl is this checkout (the default subject)
    data["matrix"]["name"] = f"subject-{s.name}-{s.version or 'checkout'}"
    data["matrix"]["description"] = f"{s} x the PEFT axis of {base.name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{s.name}-{s.version or 'checkout'}.toml"
    path.write_text(f"# written by harness/subjects/session.py from {base.name} for `nox -s subject -- {spec}`\n"
                    + _dump(data))  # fmt: skip
    load_matrix(path)  # validate before running
    return path


def main(argv: list[str] | None = None) -> int:
    from harness import cli

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        print("usage: nox -s subject -- NAME==VERSION [harness.cli run options], e.g. unsloth_zoo==2026.10.9",
              file=sys.stderr)  # fmt: skip
        return 2
    path = subject_matrix(args[0])
    print(f"subject matrix: {path}", flush=True)
    return cli.main(["run", "--matrix", str(path), *args[1:]])


if __name__ == "__main__":
    sys.exit(main())
