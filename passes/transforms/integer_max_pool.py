"""integer-max-pool: a max pool of a dequantized integer tensor runs on the integer tensor instead.

``dequantize(q) -> max_pool2d`` becomes ``max_pool2d(q) -> dequantize`` (same params). Exact: a per-tensor
dequantize ``x = (q - z) s`` with ``s > 0`` is monotone, so max commutes with it, and a real value's integer is never
below the pool's integer padding (the dtype's minimum). A ``quantize`` of the pooled tensor with the dequantize's
params then reads the integer pool directly (``quantize(dequantize(q)) = q``), so ResNet's stem pools uint8 after
``quantize`` and its first conv reads the pool without a round trip through float. The backends lower an 8-bit
max pool to a vectorized integer kernel.

Runs in the default pipeline after ``fold-qdq``; ``quantize`` followed by ``default`` gives the graph ``quantize``
produced when it moved the pools itself. Refusals (the pool stays float): ``per_channel`` (a per-axis dequantize;
the moved dequantize is rebuilt per tensor), ``scale`` (a non-positive scale: dequantize is not increasing). Pools
of float tensors are not candidates and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from passes.core.pass_base import Decisions, Pass, PassContext, PassResult
from passes.core.rewrite import remove_unused, replace_node
from passes.ir.graph import Graph, Value
from passes.transforms.quantization import dequantize_after, same_quant_params


def refusal(graph: Graph, dequantize: str) -> tuple[str, str] | None:
    """Why the pool reading ``dequantize`` stays float; None if it can run on the integer tensor."""
    data = graph.nodes[dequantize]
    if data["attrs"].get("axis") is not None:
        return "per_channel", f"{dequantize} dequantizes per channel (axis {data['attrs']['axis']})"
    if not float(data["params"]["scale"]) > 0:
        return "scale", f"{dequantize} has scale {float(data['params']['scale'])}: dequantize is not increasing"
    return None


def move_pool(graph: Graph, pool: str) -> None:
    """Rewrite one ``dequantize -> max_pool2d`` into ``max_pool2d -> dequantize`` and drop a matching quantize."""
    x = graph.operands(pool)[0]
    data, params = graph.nodes[pool], graph.nodes[x.node]["params"]
    q_y = replace_node(graph, pool, "max_pool2d", [graph.operands(x.node)[0]], dict(data["attrs"]),
                       dict(data["params"]), data["origin"])
    y = dequantize_after(graph, q_y, dict(params), data["origin"], f"{pool}_dequantize")
    for user, _ in graph.users(y):
        user_data = graph.nodes[user]
        if user_data["op"] == "quantize" and user_data["attrs"].get("axis") is None and \
                user_data["attrs"]["dtype"] == graph.value_type(q_y).dtype and \
                same_quant_params(user_data, float(params["scale"]), int(params["zero_point"])):
            graph.replace_all_uses(Value(user, 0), q_y)
            graph.remove_node(user)
    remove_unused(graph, [x.node, y.node])


@dataclass(frozen=True)
class IntegerMaxPool(Pass):
    name = "integer-max-pool"
    summary = "run max pools of dequantized integer tensors on the integer tensor (exact)"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decide = Decisions(self, graph, ctx, work=("moved",))
        for pool in graph.op_nodes("max_pool2d"):
            producer = graph.operands(pool)[0].node
            if graph.nodes[producer]["op"] != "dequantize":
                continue  # a float pool: not a candidate
            why = refusal(graph, producer)
            if why is not None:
                decide.skip(pool, *why)
                continue
            move_pool(graph, pool)
            decide.done(pool, "moved", f"pools {graph.value_type(graph.operands(pool)[0])} instead of float")
        return decide.result()
