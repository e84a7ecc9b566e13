"""House rules from DESIGN.md, checked on the source: who may import tvm, torch, frontend and backends."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _module_imports(path: Path) -> set[str]:
    """Dotted names of the modules ``path`` imports anywhere (also inside functions: a lazy import is an edge too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_only_backends_import_tvm():
    offenders = [str(p.relative_to(ROOT)) for pkg in ("passes", "frontend") for p in _sources(pkg)
                 if "tvm" in _imports(p)]
    assert not offenders


def test_frontend_never_imports_backends():
    assert not [p for p in _sources("frontend") if "backends" in _imports(p)]


def test_core_reaches_frontend_and_backends_only_through_api():
    offenders = [str(p.relative_to(ROOT)) for p in _sources("passes")
                 if {"frontend", "backends"} & _imports(p) and p.name not in ("api.py", "cli.py")]
    assert not offenders


def test_backends_do_not_import_frontends():
    assert not [p for p in _sources("backends") if "frontend" in _imports(p)]


def test_no_import_cycle_in_the_ir():
    """graph.py needs no torch and ops.py is torch semantics: shared types live in types.py, below both."""
    modules = {_module_name(p): p for p in _sources("passes/ir")}
    edges = nx.DiGraph((name, imported) for name, path in modules.items()
                       for imported in _module_imports(path) if imported in modules)
    with pytest.raises(nx.NetworkXNoCycle):
        nx.find_cycle(edges)


def test_tuning_does_not_import_the_lowerer():
    """Kernel choices live in select.py, which lowering and tuning both read: the tuner never asks the lowerer."""
    assert "backends.tvm.lower" not in _module_imports(ROOT / "backends/tvm/tune.py")
