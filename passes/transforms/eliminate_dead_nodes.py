"""eliminate-dead-nodes: delete nodes no graph output depends on (graph inputs are kept: they are the signature)."""

from __future__ import annotations

from dataclasses import dataclass

from passes.core.pass_base import Decisions, Pass, PassContext, PassResult
from passes.ir.graph import Graph


@dataclass(frozen=True)
class EliminateDeadNodes(Pass):
    name = "eliminate-dead-nodes"
    summary = "delete nodes that no output depends on"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decide = Decisions(self, graph, ctx, work=("removed",))
        live = graph.live_nodes()
        dead = [n for n in graph.topo_order() if n not in live]
        for node in dead:
            decide.done(node, "removed")
        graph.remove_nodes_from(dead)
        return decide.result()
