"""fuse-conv-add: ``act(conv2d(x) + r)`` (a residual connection) becomes one conv2d with ``r`` as a second operand.

The backend adds the residual in the conv kernel's epilogue, after bias and before the activation, so neither the
conv output nor the sum is written and re-read: ResNet-style blocks lose one full-tensor kernel per add (two with
the ReLU that follows). Exact: the same float additions are performed.

Refusals, each counted as ``skipped.<reason>``:
- ``no_producer``: neither operand of the add is a conv2d output.
- ``shared_output``: the conv output has other users or is a graph output (it must be materialized anyway).
- ``already_fused``: the conv already carries an activation or a residual (act(conv) + r is not conv + r).
- ``broadcast``: the residual's shape differs from the conv output's (the epilogue adds elementwise).
"""

from __future__ import annotations

from dataclasses import dataclass

from passes.core.pass_base import Decisions, Pass, PassContext, PassResult
from passes.core.pattern import Pattern
from passes.core.rewrite import bypass, join_origin
from passes.ir.graph import Graph, Value
from passes.ir.ops import activation_of

CONV_ADD = Pattern(roles={"conv": "conv2d", "add": "add"}, edges=(("conv", "add", None),), anchor="add",
                   private=("conv",))


def refusal(graph: Graph, conv: str, add: str) -> tuple[str, str] | None:
    data = graph.nodes[conv]
    if data["attrs"]["activation"] != "none" or len(graph.operands(conv)) > 1:
        return "already_fused", f"{conv} already has an activation or a residual"
    residual = next(v for v in graph.operands(add) if v != Value(conv, 0))
    if graph.value_type(residual) != data["out_types"][0]:
        return "broadcast", f"residual {graph.value_type(residual)} vs conv output {data['out_types'][0]}"
    return None


def following_activation(graph: Graph, add: str) -> str | None:
    """The activation consuming the add's only use, to absorb as well (None if there is none to take)."""
    users = graph.users(Value(add, 0))
    if len(users) != 1 or graph.is_graph_output(Value(add, 0)):
        return None
    user = users[0][0]
    return user if activation_of(graph.nodes[user]["op"], graph.nodes[user]["attrs"]) else None


@dataclass(frozen=True)
class FuseConvAdd(Pass):
    name = "fuse-conv-add"
    summary = "fuse a residual add (and the activation after it) into the conv2d that feeds it"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decide = Decisions(self, graph, ctx, work=("fused",))
        matches = CONV_ADD.scan(graph, decide, lambda m: refusal(graph, m["conv"], m["add"]))
        for match in matches:
            conv, add = match["conv"], match["add"]
            residual = next(v for v in graph.operands(add) if v != Value(conv, 0))
            data = graph.nodes[conv]
            act = following_activation(graph, add)
            origins = [data["origin"], graph.nodes[add]["origin"]]
            if act is not None:
                name, params = activation_of(graph.nodes[act]["op"], graph.nodes[act]["attrs"])
                data["attrs"] = {**data["attrs"], "activation": name, "activation_params": params}
                origins.append(graph.nodes[act]["origin"])
            data["origin"] = join_origin(*origins)
            graph.set_operands(conv, [graph.operands(conv)[0], residual])
            decide.done(add, "fused", f"into {conv}" + (f" with {act}" if act else ""))
            bypass(graph, add, Value(conv, 0))
            if act is not None:
                bypass(graph, act, Value(conv, 0))
        return decide.result()
