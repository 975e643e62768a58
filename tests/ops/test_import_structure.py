"""Imports go downward: no import cycle in linmix, even through imports inside functions; kernels never
import the dispatchers above them; ops import no layer or model code and layers no model code."""

import ast
from pathlib import Path

import linmix

PACKAGE = Path(linmix.__file__).parent
DISPATCHERS = {"linmix.ops.wkv", "linmix.ops.linear_attention", "linmix.ops.sliding_window", "linmix.ops.q_shift"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("linmix",) + path.relative_to(PACKAGE).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _import_graph() -> dict[str, set[str]]:
    """Module -> the linmix modules it imports anywhere in its source (top level or inside functions)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        # A submodule importing its own package (``from linmix.ops import dispatch``) is Python's package
        # idiom, not a cycle.
        graph[name] = {m for m in imported if m in modules and m != name and not name.startswith(m + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_even_lazy_ones():
    assert _cycles(_import_graph()) == []


def test_the_cycle_finder_finds_a_lazy_cycle():
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_kernels_do_not_import_their_dispatchers():
    graph = _import_graph()
    kernels = [m for m in graph if m.startswith(("linmix.ops.triton", "linmix.ops.native"))]
    assert kernels
    assert {m: graph[m] & DISPATCHERS for m in kernels if graph[m] & DISPATCHERS} == {}


def test_tiers_import_only_downward():
    graph = _import_graph()
    above_ops = ("linmix.layers", "linmix.lm", "linmix.sam", "linmix.mqar", "linmix.cli", "linmix.serve", "linmix.training")
    upward = {(m, d) for m, deps in graph.items() for d in deps
              if (m.startswith("linmix.ops") and d.startswith(above_ops))
              or (m.startswith("linmix.layers") and d.startswith(above_ops[1:]))}
    assert upward == set()
