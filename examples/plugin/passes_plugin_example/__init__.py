"""relu6-to-clamp: an example plug-in pass, installed as its own package and found through an entry point.

relu6(x) = min(max(x, 0), 6) = clamp(x, 0, 6), so the rewrite is exact. It shows the whole plug-in contract: a
frozen dataclass with a kebab-case ``name``, a ``run`` that counts work (``rewritten``) with ``Decisions`` and
returns a ``PassResult``; the entry point in pyproject.toml does the registration.
"""

from __future__ import annotations

from dataclasses import dataclass

from passes import Pass, PassResult
from passes.core.pass_base import Decisions, PassContext
from passes.core.rewrite import replace_node
from passes.ir.graph import Graph


@dataclass(frozen=True)
class Relu6ToClamp(Pass):
    name = "relu6-to-clamp"
    summary = "rewrite relu6 as clamp(0, 6) (example plug-in)"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decide = Decisions(self, graph, ctx, work=("rewritten",))
        for node in graph.op_nodes("relu6"):
            decide.done(node, "rewritten")
            data = graph.nodes[node]
            replace_node(graph, node, "clamp", graph.operands(node), {"min": 0.0, "max": 6.0}, {}, data["origin"])
        return decide.result()
