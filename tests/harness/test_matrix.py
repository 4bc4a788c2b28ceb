"""Matrix files: cell ids, spec resolution (including `unreleased`), known-broken entries keyed on versions."""

from __future__ import annotations

import pytest

from harness.matrix import CellSpec, Known, MatrixError, load_matrix, resolve_cell, resolve_spec
from tests.harness.conftest import fake_source

VERSIONS = ["4.56.2", "4.57.0", "4.57.6", "5.0.0rc1", "5.0.0", "5.1.0", "5.24.0", "5.25.0.dev0", "6.0.0a1"]


@pytest.mark.parametrize(("spec", "want"), [
    ("==4.57.*", "4.57.6"),       # newest of a series
    ("==5.0.0", "5.0.0"),         # exact
    ("==5.*", "5.24.0"),          # newest 5.x, pre/dev releases ignored
    ("latest", "5.24.0"),         # newest final release
    ("", "5.24.0"),
    ("==4.58.*", None),           # no release: `unreleased`
    ("==6.*", None),              # only a pre-release exists
])
def test_resolve_spec(spec, want):
    assert resolve_spec(spec, VERSIONS) == want


def test_resolve_cell_reports_unreleased_with_newest():
    cell = CellSpec("t4.58-p0.18", {"transformers": "==4.58.*", "peft": "==0.18.*"}, {})
    res = resolve_cell(cell, fake_source({"transformers": VERSIONS, "peft": ["0.18.0", "0.18.1", "0.19.0"]}))
    assert not res.ok
    assert res.resolved == {"peft": "0.18.1"}
    assert "==4.58.*" in res.unreleased["transformers"] and "5.24.0" in res.unreleased["transformers"]


def test_default_matrix_cells_and_tests():
    m = load_matrix("default")
    ids = [c.id for c in m.cells()]
    assert len(ids) == 16 and ids[0] == "t4.57-p0.18" and "t5.x-platest" in ids and "t4.58-p0.19.0" in ids
    assert m.tests == ("tests/oracles", "tests/impl", "tests/checks")
    c = m.cell("t5.0-p0.19.0")
    assert c.specs["transformers"] == "==5.0.0" and c.specs["peft"] == "==0.19.0" and "accelerate" in c.specs
    assert "torch" not in c.specs and "bitsandbytes" not in c.specs


def test_extended_matrix_adds_axes():
    ids = {c.id for c in load_matrix("extended").cells()}
    assert {"t5.2-p0.20", "t5.22-platest", "t5.13-p0.19.0", "t4.57-p0.18"} <= ids
    assert len(ids) == 11 * 5


def test_known_entries_follow_installed_versions():
    m = load_matrix("default")

    def reasons(t, p):
        return " | ".join(k.reason for k in m.known_for("tX", {"transformers": t, "peft": p}))

    assert "distributed_operation" in reasons("5.24.0", "0.19.1")
    assert "loading_info" in reasons("5.0.0", "0.19.0") and "loading_info" in reasons("5.0.0", "0.21.2")
    assert "loading_info" not in reasons("5.0.0", "0.18.1")
    assert "PEFT 0.22" in reasons("5.24.0", "0.21.2")
    assert "0.18.2" in reasons("5.8.1", "0.18.1")          # extended cells are covered by version ranges
    assert reasons("4.57.6", "0.18.1") == ""
    assert "distributed_operation" not in reasons("5.24.0", "0.20.0")


def test_known_entry_matching_by_name_node_and_family():
    k = next(k for k in load_matrix("default").known if k.match == "distributed_operation")
    node = "tests/checks/test_layout.py::test_layout_roundtrip_from_pretrained[qwen3_moe-2i_eq_h]"
    assert k.matches_check(name="layout", node_id=node, family="qwen3_moe", variant="2i_eq_h:roundtrip")
    assert not k.matches_check(name="layout", node_id=node, family="gpt_oss", variant="2i_eq_h:roundtrip")
    assert not k.matches_check(name="save_reload_with_sidecar", node_id="x", family=None, variant=None)
    fam = Known(checks=("oracle_*",), reason="r", link="l", cells=("*",), families=("qwen3_moe*",))
    assert fam.matches_check(name="oracle_x", node_id="n", family="qwen3_moe", variant=None)
    assert not fam.matches_check(name="oracle_x", node_id="n", family="gpt_oss", variant=None)
    assert not fam.matches_check(name="oracle_x", node_id="n", family=None, variant=None)
    node = Known(checks=("tests/a.py::test_*",), reason="r", link="l", cells=("*",))   # globs match node ids too
    assert node.matches_check(name="other", node_id="tests/a.py::test_y[p]", family=None, variant=None)


@pytest.mark.parametrize(("body", "needle"), [
    ('[[pin]]\ncells = "*"\npackages = { torch = "==2.9.*" }', "torch cannot be pinned"),
    ('[[known]]\nchecks = ["x"]\nreason = "r"\nlink = "l"', "needs `cells` or `when`"),
    ('[[known]]\nchecks = ["x"]\nreason = "r"\nlink = "l"\ncells = ["*"]\nexpect = "maybe"', "expect must be"),
    ('[[known]]\nchecks = ["x"]\nreason = "r"\nlink = "l"\nwhen = { peft = "0.19" }', "invalid version spec"),
    ('[bogus]\nx = 1', "unknown top-level keys"),
])
def test_malformed_matrix_is_an_error_naming_the_cause(write_matrix, body, needle):
    path = write_matrix('[[axis]]\npackage = "transformers"\nvalues = [{ id = "a", spec = "" }]\n' + body)
    with pytest.raises(MatrixError, match=needle):
        load_matrix(path)
