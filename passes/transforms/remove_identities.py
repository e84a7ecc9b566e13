"""remove-identities: drop ops that return their input unchanged at inference.

Removed: ``dropout`` and ``identity``; ``reshape``/``flatten`` to the same shape; ``permute`` by the identity
permutation; ``cast`` to the same dtype; ``slice`` covering the whole dim; ``concat``/``stack`` of one operand are
not identities (stack adds a dim) so only ``concat`` of one operand is removed.
"""

from __future__ import annotations

from dataclasses import dataclass

from passes.core.pass_base import Decisions, Pass, PassContext, PassResult
from passes.core.rewrite import bypass
from passes.ir.graph import Graph


def is_identity(graph: Graph, node: str) -> bool:
    data = graph.nodes[node]
    op, attrs = data["op"], data["attrs"]
    if op in ("dropout", "identity"):
        return True
    operands = graph.operands(node)
    if len(operands) != 1 or len(data["out_types"]) != 1:
        return False
    same_type = graph.value_type(operands[0]) == data["out_types"][0]
    if op in ("reshape", "flatten", "cast", "concat"):
        return same_type
    if op == "permute":
        return tuple(attrs["dims"]) == tuple(range(len(attrs["dims"])))
    if op == "slice":
        return same_type and attrs["step"] == 1
    return False


@dataclass(frozen=True)
class RemoveIdentities(Pass):
    name = "remove-identities"
    summary = "drop dropout, identity and no-op reshape/permute/cast/slice/concat"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decide = Decisions(self, graph, ctx, work=("removed",))
        for node in [n for n in graph.topo_order() if is_identity(graph, n)]:
            decide.done(node, "removed")
            bypass(graph, node, graph.operands(node)[0])
        return decide.result()
