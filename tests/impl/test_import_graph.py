"""The import graph of `impl/` has no circle (read with `ast`, nothing is imported).

An edge A -> B is any ``import impl.B`` / ``from impl.B import ...`` / ``from impl import B`` in A, at module level or
inside a function. The graph without the edges listed in ALLOWED_UPWARD must be acyclic, and every listed edge must
exist and be function-level (so a stale entry, or one that became a module-level import, fails here).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMPL = ROOT / "impl"

# The documented upward calls: installing the PEFT hooks from the modules whose classes the hooks check for.
ALLOWED_UPWARD = {
    ("impl.quant_experts", "impl.peft_integration"),  # QuantizedExperts.__init__: install()
    ("impl.fp8_linear", "impl.peft_integration"),  # FP8Linear.__init__: install()
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(IMPL.rglob("*.py"))}


def _edges(name: str, path: Path, known: set[str]) -> dict[str, bool]:
    """``{imported impl module: at module level}`` for the module ``name``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(n) for n in tree.body}
    out: dict[str, bool] = {}

    def add(target: str, node) -> None:
        while target and target not in known:  # impl.ops.glue.silu_mul -> impl.ops.glue
            target = target.rpartition(".")[0]
        if target and target != name:
            out[target] = out.get(target, False) or id(node) in top

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("impl"):
                    add(a.name, node)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("impl"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                add(sub if sub in known else node.module, node)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; impl uses absolute imports")
    return out


def _graph() -> dict[str, dict[str, bool]]:
    mods = _modules()
    return {name: _edges(name, path, set(mods)) for name, path in mods.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_impl_import_graph_has_no_cycle():
    graph = _graph()
    assert "impl.storage" in graph and "impl.ops.kloop" in graph, sorted(graph)  # the walk found the modules
    for a, b in ALLOWED_UPWARD:
        assert b in graph[a], f"allowed upward edge {a} -> {b} no longer exists: remove it from ALLOWED_UPWARD"
        assert not graph[a][b], f"{a} -> {b} must stay a function-level import (the one documented upward call)"
    plain = {a: {b for b in bs if (a, b) not in ALLOWED_UPWARD} for a, bs in graph.items()}
    cycle = _find_cycle(plain)
    assert cycle is None, "import cycle in impl/: " + " -> ".join(cycle)


@pytest.mark.parametrize("layer, forbidden", [
    ("impl.storage", ("impl.forward", "impl.backends", "impl.quant_experts", "impl.peft_integration", "impl.ops")),
    ("impl.ops.formats", ("impl.ops.kloop", "impl.ops.dispatch", "impl.ops.nf4_decode", "impl.ops.backend")),
    ("impl.ops.kloop", ("impl.ops.dispatch", "impl.ops.grouped_lora", "impl.ops.backend")),
    ("impl.ops.nf4_decode", ("impl.ops.dispatch", "impl.ops.kloop", "impl.ops.backend")),
])  # fmt: skip
def test_layers_import_one_way(layer, forbidden):
    """storage below everything; in impl/ops: formats <- kernels (kloop, nf4_decode) <- dispatch <- layer/backend."""
    graph = _graph()
    reach, todo = set(), [layer]
    while todo:
        for m in graph[todo.pop()]:
            if m not in reach:
                reach.add(m)
                todo.append(m)
    bad = sorted(m for m in reach if any(m == f or m.startswith(f + ".") for f in forbidden))
    assert not bad, f"{layer} reaches {bad}"


def test_cycle_finder_finds_a_planted_cycle():
    """The check above can fail: a two-module circle and a three-module circle are found."""
    assert _find_cycle({"a": {"b"}, "b": {"a"}}) is not None
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
