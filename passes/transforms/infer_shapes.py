"""infer-shapes: recompute every node's ``out_types`` from the op table (an analysis; establishes ``shapes``).

Passes that change params (pruning) or attrs leave downstream types stale; this pass brings them back in line,
in topological order, so each node sees its operands' new types.
"""

from __future__ import annotations

from dataclasses import dataclass

from passes.core.pass_base import Decisions, Pass, PassContext, PassResult
from passes.ir.graph import Graph
from passes.ir.ops import get_op


@dataclass(frozen=True)
class InferShapes(Pass):
    name = "infer-shapes"
    summary = "recompute every node's output types from the op table"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decide = Decisions(self, graph, ctx, work=("updated",))
        for node in graph.topo_order():
            data = graph.nodes[node]
            if data["op"] == "input":
                continue
            in_types = [graph.value_type(v) for v in graph.operands(node)]
            inferred = get_op(data["op"]).infer(in_types, data["attrs"], data["params"], graph.describe(node))
            if inferred != data["out_types"]:
                data["out_types"] = inferred
                decide.done(node, "updated")
        return decide.result()
