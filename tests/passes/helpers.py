"""Pass-test helpers: run a pass with verify before/after, compare graph text with a readable diff."""

from __future__ import annotations

import difflib

import torch

from frontend.torch_fx import from_torch
from passes.core.pass_base import Pass, PassContext, PassResult
from passes.ir.graph import Graph
from passes.ir.interpret import run_reference
from passes.ir.text import graph_text
from passes.ir.verify import verify
from tests.helpers import assert_outputs_close


def run_pass(p: Pass, graph: Graph, ctx: PassContext | None = None) -> PassResult:
    verify(graph)
    result = p.run(graph, ctx or PassContext())
    verify(graph)
    return result


def assert_graph_text(graph: Graph, expected: str) -> None:
    actual = graph_text(graph)
    if actual.strip() != expected.strip():
        diff = "\n".join(difflib.unified_diff(expected.strip().splitlines(), actual.strip().splitlines(),
                                              "expected", "actual", lineterm=""))
        raise AssertionError(f"graph differs:\n{diff}")


def assert_idempotent(p: Pass, graph: Graph) -> None:
    before = graph_text(graph)
    again = run_pass(p, graph)
    assert not again.changed, again.stats
    assert graph_text(graph) == before


def check_numerics(p: Pass | list[Pass], model: torch.nn.Module, inputs: tuple, rtol=1e-5, atol=1e-6) -> Graph:
    """Import ``model``, run the pass(es), and compare the interpreter before and after (and with PyTorch)."""
    graph = from_torch(model.eval(), inputs)
    before = run_reference(graph, inputs)
    for each in p if isinstance(p, list) else [p]:
        run_pass(each, graph)
    after = run_reference(graph, inputs)
    with torch.no_grad():
        assert_outputs_close(model(*inputs), after, rtol=rtol, atol=atol)
    assert_outputs_close(before, after, rtol=rtol, atol=atol)
    return graph
