"""fold-constants: evaluate nodes whose operands are all constants and replace them by ``constant`` nodes.

Correct because every op's meaning is its torch reference, which we run here on the constant values. The old
constant operands may become dead: ``eliminate-dead-nodes`` removes them (this pass does not run it).

Refusals: ``multi_output`` (folding split/lstm is rare and would need several constants), ``too_large`` (the
result would add more than ``max_elements`` values to the model: folding must not bloat it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from passes.core.pass_base import Decisions, Pass, PassContext, PassResult
from passes.core.rewrite import constant_of, replace_node
from passes.ir.graph import Graph
from passes.ir.ops import get_op


@dataclass(frozen=True)
class FoldConstants(Pass):
    name = "fold-constants"
    summary = "evaluate nodes whose operands are all constants"
    max_elements: int = 1 << 20

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decide = Decisions(self, graph, ctx, work=("folded",))
        for node in graph.topo_order():
            data = graph.nodes[node]
            if data["op"] in ("input", "constant"):
                continue
            operands = graph.operands(node)
            values = [constant_of(graph, v) for v in operands]
            if not operands or any(v is None for v in values):
                continue
            if len(data["out_types"]) != 1:
                decide.skip(node, "multi_output")
                continue
            if data["out_types"][0].numel > self.max_elements:
                decide.skip(node, "too_large", f"{data['out_types'][0].numel} elements > {self.max_elements}")
                continue
            params = {k: torch.as_tensor(v) for k, v in data["params"].items()}
            with torch.no_grad():
                result = get_op(data["op"]).reference([torch.as_tensor(v) for v in values], data["attrs"], params)
            decide.done(node, "folded")
            replace_node(graph, node, "constant", [], {}, {"value": result.numpy().copy()}, data["origin"])
        return decide.result()
