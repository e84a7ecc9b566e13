"""Graph-level cost statistics: FLOPs (a multiply-add counts 2) and parameter counts, from the op table."""

from __future__ import annotations

from collections import Counter

from passes.ir.graph import Graph
from passes.ir.ops import get_op


def node_flops(graph: Graph, node: str) -> int:
    d = graph.nodes[node]
    if d["op"] == "input":
        return 0
    in_types = [graph.value_type(v) for v in graph.operands(node)]
    return int(get_op(d["op"]).flops(in_types, d["out_types"], d["attrs"], d["params"]))


def graph_flops(graph: Graph) -> int:
    return sum(node_flops(graph, n) for n in graph.nodes)


def graph_params(graph: Graph) -> int:
    """Number of parameter elements (constants included)."""
    return graph.num_params()


def op_histogram(graph: Graph) -> dict[str, int]:
    return dict(sorted(Counter(d["op"] for _, d in graph.nodes(data=True) if d["op"] != "input").items()))
