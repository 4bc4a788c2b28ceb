"""The subject machinery without network: spec parsing, the wheel cache and stub loader, the subject axis of a matrix
and its runner hook (the subject is fetched, not installed, and reaches the cell's tests as MOE_COMPAT_SUBJECT)."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness.matrix import MatrixError, Resolution, load_matrix
from harness.runner import Progress, RunOptions, run_cell
from harness.subjects import matrix_hook, registry, wheel
from harness.subjects.interface import SubjectLoadError
from tests.harness.conftest import fake_source
from tests.harness.test_runner import fake_build

# --- registry ------------------------------------------------------------------------------------------------------


def test_spec_parsing():
    assert registry.parse("unsloth_zoo==2026.9.8") == registry.SubjectSpec("unsloth_zoo", "2026.9.8")
    assert registry.parse(" unsloth-zoo == 2026.9.8 ") == registry.SubjectSpec("unsloth_zoo", "2026.9.8")
    assert registry.parse("impl") == registry.SubjectSpec("impl", None)
    assert registry.parse("pkg.mod:load==1.0").name == "pkg.mod:load"
    for bad in ("nosuch==1.0", "unsloth_zoo==", "unsloth_zoo>=2026.9", "unsloth_zoo==1.0,2.0", ""):
        with pytest.raises(SubjectLoadError):
            registry.parse(bad)


def test_default_subject_is_impl(monkeypatch):
    monkeypatch.delenv(registry.ENV, raising=False)
    assert registry.current_spec() == registry.SubjectSpec("impl", None)


def test_adapter_must_return_a_subject(monkeypatch):
    monkeypatch.setitem(registry.ADAPTERS, "notasubject", f"{__name__}:_not_a_subject")
    with pytest.raises(SubjectLoadError, match="not a Subject"):
        registry.load("notasubject==1")


def _not_a_subject(version):
    return object()


# --- wheel cache and loader -----------------------------------------------------------------------------------------


def make_wheel(tmp: Path, pkg: str, version: str, files: dict[str, str]) -> Path:
    path = tmp / f"{pkg}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{pkg}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {pkg}\nVersion: {version}\n")
        for name, text in files.items():
            zf.writestr(f"{pkg}/{name}", text)
    return path


FILES = {
    "__init__.py": "raise RuntimeError('the package __init__ (GPU init) must not run')\n",
    "patches/__init__.py": "raise RuntimeError('import-time patching must not run')\n",
    "device.py": "raise RuntimeError('the device module must be stubbed')\n",
    "helpers.py": "TWO = 2\n",
    "patches/ops.py": "from .. import helpers\nfrom ..device import DEVICE_TYPE\n"
                      "def double(x):\n    return x * helpers.TWO\n",  # fmt: skip
    "patches/needs_more.py": "from ..device import NOT_STUBBED\n",
}


@pytest.fixture
def fake_tree(tmp_path):
    pkg = f"fakezoo_{tmp_path.name.replace('-', '_')}"
    tree = tmp_path / "tree"
    wheel.unpack(make_wheel(tmp_path, pkg, "1.0", FILES), tree)
    yield pkg, tree
    for name in [m for m in sys.modules if m == pkg or m.startswith(pkg + ".")]:
        del sys.modules[name]


def _load(pkg, tree, modules):
    return wheel.load_modules(tree, pkg, modules, stub_packages={pkg: {"__version__": "1.0"}, f"{pkg}.patches": {}},
                              stub_modules={f"{pkg}.device": {"DEVICE_TYPE": "cpu"}})  # fmt: skip


def test_load_runs_only_the_selected_modules_with_stubs(fake_tree):
    pkg, tree = fake_tree
    wheel.check_version(tree, pkg, "1.0")
    mods = _load(pkg, tree, [f"{pkg}.patches.ops"])
    ops = mods[f"{pkg}.patches.ops"]
    assert ops.double(3) == 6 and ops.DEVICE_TYPE == "cpu"
    assert Path(ops.__file__).resolve().is_relative_to(tree.resolve())  # the wheel's code, not a copy
    assert sys.modules[pkg].__version__ == "1.0"


def test_a_name_missing_from_a_stub_is_loud(fake_tree):
    pkg, tree = fake_tree
    with pytest.raises(SubjectLoadError, match="NOT_STUBBED"):
        _load(pkg, tree, [f"{pkg}.patches.needs_more"])


def test_one_tree_per_process(fake_tree, tmp_path):
    pkg, tree = fake_tree
    _load(pkg, tree, [f"{pkg}.helpers"])
    _load(pkg, tree, [f"{pkg}.helpers"])  # the same tree again is fine
    other = tmp_path / "other"
    wheel.unpack(make_wheel(tmp_path, pkg, "1.0", FILES), other)
    with pytest.raises(SubjectLoadError, match="one subject version per process"):
        _load(pkg, other, [f"{pkg}.helpers"])


def test_wrong_version_and_unsafe_members_are_refused(tmp_path):
    tree = tmp_path / "t"
    wheel.unpack(make_wheel(tmp_path, "zz", "1.0", {"__init__.py": ""}), tree)
    with pytest.raises(SubjectLoadError, match="Version '1.0', expected '2.0'"):
        wheel.check_version(tree, "zz", "2.0")
    evil = tmp_path / "evil.whl"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../outside.py", "")
    with pytest.raises(SubjectLoadError, match="outside"):
        wheel.unpack(evil, tmp_path / "e")


def test_fetch_uses_the_cache_and_reports_download_failures(tmp_path, monkeypatch):
    done = tmp_path / "zz-1.0"
    done.mkdir()
    (done / ".complete").write_text("ok\n")
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a) or subprocess.CompletedProcess(
        a, 1, "", "ERROR: No matching distribution found for zz==2.0"))  # fmt: skip
    assert wheel.fetch("zz", "1.0", cache=tmp_path) == done and not calls
    with pytest.raises(SubjectLoadError, match="No matching distribution"):
        wheel.fetch("zz", "2.0", cache=tmp_path)
    assert calls and "--no-deps" in calls[0][0] and not (tmp_path / "zz-2.0").exists()


def test_concurrent_fetches_of_one_version_download_once(tmp_path, monkeypatch):
    """Cells are threads of one process and share subject versions (seen: a cell's fetch deleted another's download,
    'exit 0, wheels []'): concurrent fetches of one version download it once and all get the unpacked tree."""
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        time.sleep(0.2)  # the other threads arrive while this download runs
        out = Path(cmd[cmd.index("-d") + 1])
        shutil.copy(make_wheel(tmp_path, "zz", "3.0", {"__init__.py": ""}), out)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: wheel.fetch("zz", "3.0", cache=cache), range(4)))
    assert len(calls) == 1 and set(got) == {cache / "zz-3.0"}
    assert (cache / "zz-3.0" / ".complete").exists() and (cache / "zz-3.0" / "zz" / "__init__.py").exists()
    assert sorted(p.name for p in cache.iterdir()) == ["zz-3.0"]  # no temporary directory left behind


# --- the subject axis ---------------------------------------------------------------------------------------------

CELL_TEST = """
import os
def test_subject_env():
    assert os.environ["MOE_COMPAT_SUBJECT"] == "fake_subject==1.5"
"""

MATRIX = """
[matrix]
tests = ["{tests}"]
[[axis]]
package = "fake_subject"
prefix = "z"
kind = "subject"
values = [{{ id = "1.5", spec = "==1.5" }}, {{ id = "9", spec = "==9.0" }}]
[[axis]]
package = "pytest"
prefix = "p"
values = [{{ id = "any", spec = "" }}]
"""

FETCHED: list = []


def fetch(version):
    """The fake adapter's fetch (registry.prefetch calls it in the runner's install phase)."""
    if version == "9.0":
        raise SubjectLoadError("fake_subject 9.0: no wheel on the index")
    FETCHED.append(version)


def test_matrix_subject_axis(tmp_path):
    def write_matrix(text: str) -> Path:
        (tmp_path / "m.toml").write_text(text)
        return tmp_path / "m.toml"

    m = load_matrix(write_matrix(MATRIX.format(tests="t.py")))
    assert m.subjects == {"fake_subject"} and [c.id for c in m.cells()] == ["z1.5-pany", "z9-pany"]
    res = Resolution({"fake_subject": "1.5", "pytest": "9.0"}, {})
    assert matrix_hook.split(m.subjects, res) == (["pytest==9.0"], {"fake_subject": "1.5"})
    with pytest.raises(MatrixError, match=r"axis\[0\]\.kind: must be one of"):
        load_matrix(write_matrix(MATRIX.format(tests="t.py").replace('kind = "subject"', 'kind = "wheel"')))
    assert load_matrix("subjects").subjects == {"unsloth_zoo"}
    assert "unsloth_zoo" not in load_matrix("default").subjects and not load_matrix("default").subjects


def test_runner_fetches_the_subject_and_passes_it_to_the_tests(tmp_path, monkeypatch):
    import pytest as _pytest

    monkeypatch.setitem(registry.ADAPTERS, "fake_subject", f"{__name__}:_not_a_subject")
    (tmp_path / "test_cell.py").write_text(CELL_TEST)
    (tmp_path / "m.toml").write_text(MATRIX.format(tests=tmp_path / "test_cell.py"))
    matrix = load_matrix(tmp_path / "m.toml")
    src = fake_source({"fake_subject": ["1.5", "9.0"], "pytest": [_pytest.__version__]})
    calls: list = []
    opts = RunOptions(envs_dir=tmp_path / "envs", pytest_args=("--rootdir", str(tmp_path), "-c", "/dev/null"))
    quiet = Progress(io.StringIO(), heartbeat_s=0)
    FETCHED.clear()
    rec = run_cell(matrix, matrix.cell("z1.5-pany"), source=src, run_dir=tmp_path / "r", opts=opts,
                   build_env=fake_build(calls), progress=quiet)  # fmt: skip
    assert rec["status"] == "pass", rec["message"] + rec.get("log_tail", "")
    assert FETCHED == ["1.5"] and calls == [("z1.5-pany", [f"pytest=={_pytest.__version__}"])]  # not installed
    assert rec["resolved"]["fake_subject"] == "1.5" and rec["installed"]["fake_subject"] == "1.5"
    bad = run_cell(matrix, matrix.cell("z9-pany"), source=src, run_dir=tmp_path / "r", opts=opts,
                   build_env=fake_build(calls), progress=quiet)  # fmt: skip
    assert bad["status"] == "error" and "subject fetch failed" in bad["message"] and "no wheel" in bad["message"]
