"""eliminate-common-subexpressions: merge nodes that compute the same thing from the same operands.

Two nodes are the same computation when op, attrs, params (compared by content) and operand values are equal;
ops are pure, so the later node's users can read the earlier node. Graph inputs are never merged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from passes.core.pass_base import Decisions, Pass, PassContext, PassResult
from passes.ir.graph import Graph, Value
from passes.ir.ops import describe_attrs


def _params_digest(params: dict) -> str:
    digest = hashlib.sha1()
    for key in sorted(params):
        array = np.ascontiguousarray(params[key])
        digest.update(f"{key}:{array.dtype}:{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class EliminateCommonSubexpressions(Pass):
    name = "eliminate-common-subexpressions"
    summary = "merge nodes computing the same op on the same operands"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decide = Decisions(self, graph, ctx, work=("merged",))
        seen: dict[tuple, str] = {}
        for node in graph.topo_order():
            data = graph.nodes[node]
            if data["op"] == "input":
                continue
            key = (data["op"], describe_attrs(data["attrs"]), _params_digest(data["params"]),
                   tuple(graph.operands(node)))
            first = seen.setdefault(key, node)
            if first == node:
                continue
            for index in range(len(data["out_types"])):
                graph.replace_all_uses(Value(node, index), Value(first, index))
            decide.done(node, "merged", f"same as {first}")
            graph.remove_node(node)
        return decide.result()
