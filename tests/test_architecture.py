"""House rules from DESIGN.md, checked on the source: who may import tvm, torch, frontend and backends."""

from __future__ import annotations

import ast
from pathlib import Path

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
