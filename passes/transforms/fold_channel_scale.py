"""fold-channel-scale: a per-channel scale of a conv's input (squeeze-excite's ``x * s``) moves into its weights.

Why: EfficientNet, MobileNetV3 and RegNet blocks end with ``conv(x * s)``, ``s = sigmoid(...)`` of shape (1, C, 1,
1): the product is a whole pass over ``x`` (read and written: 3.6 MB of traffic at 144x56x56) between the
squeeze-excite and the project conv. The conv is linear in each input channel, so

    conv(x * s, W) = conv(x, W'),   W'[o, c, i, j] = W[o, c, i, j] * s[c]

(zero padding stays zero). The backend scales the packed weight at run time: OC*C*KH*KW products instead of
C*H*W, so the pass applies only where that is fewer, OC*KH*KW < H*W (the early, large maps; at 7x7 the weight is
the bigger tensor and the product stays). Exact up to one rounding: ``(w s) x`` instead of ``w (s x)``.

Runs after alter-layout, on its ``conv2d_nchwc`` (the CPU kernels): the conv gets ``input_scale`` and takes ``s``
as its last operand; the product node is removed. Part of ``optimize()``'s default pipeline.

Refusals, each counted as ``skipped.<reason>``:
- ``no_gate``: the conv's input is not the product of a tensor and its per-channel gate (N, C, 1, 1).
- ``shared``: the product has other users or is a graph output (it must be materialized anyway).
- ``grouped``: groups != 1 (the packed weight is scaled along its input-channel axes, which grouped and depthwise
  packings lay out differently).
- ``batch``: N > 1 (one weight per call; the gate differs per sample).
- ``cost``: OC*KH*KW >= H*W: scaling the weight would cost more than scaling the activation.
- ``dtype``: not float32.
"""

from __future__ import annotations

from dataclasses import dataclass

from passes.core.pass_base import Decisions, Pass, PassContext, PassResult
from passes.core.rewrite import join_origin
from passes.ir.graph import Graph, Value


def gate_operands(graph: Graph, product: str) -> tuple[Value, Value] | None:
    """(x, s) when ``product`` is ``mul(x, s)`` or ``mul(s, x)`` with s x's per-channel gate: (N, C, 1, 1), or
    its blocked form (N, C/b, 1, 1, b) beside a blocked x; None otherwise."""
    data = graph.nodes[product]
    if data["op"] != "mul" or len(graph.operands(product)) != 2:
        return None
    a, b = graph.operands(product)
    for x, s in ((a, b), (b, a)):
        xt, st = graph.value_type(x), graph.value_type(s)
        if (xt.rank == st.rank and xt.rank in (4, 5) and st.shape[:2] == xt.shape[:2] and st.shape[2:4] == (1, 1)
                and st.shape[4:] == xt.shape[4:] and xt.shape[2:4] != (1, 1)):
            return x, s
    return None


def refusal(graph: Graph, conv: str, found: tuple[Value, Value] | None) -> tuple[str, str] | None:
    """Why ``conv`` (a conv2d_nchwc reading a product; ``found``: that product's ``gate_operands``) keeps the product
    as a separate op, or None."""
    data = graph.nodes[conv]
    a, weight = data["attrs"], data["params"]["weight"]
    product = graph.operands(conv)[0]
    if a.get("input_scale") or found is None:
        return "no_gate", f"{product.node} is not a tensor times its per-channel gate"
    if len(graph.users(product)) != 1 or graph.is_graph_output(product):
        return "shared", f"{product.node} has other users"
    if a["groups"] != 1:
        return "grouped", f"groups={a['groups']}"
    x = graph.value_type(found[0])
    if x.shape[0] != 1:
        return "batch", f"batch {x.shape[0]}: the gate differs per sample"
    if x.dtype != "float32" or str(weight.dtype) != "float32":
        return "dtype", f"{x.dtype} data, {weight.dtype} weight"
    oc, _, kh, kw = weight.shape
    height, width = x.shape[2:4]
    if oc * kh * kw >= height * width:
        return "cost", f"{oc}x{kh}x{kw} weight products per channel >= {height}x{width} activations"
    return None


@dataclass(frozen=True)
class FoldChannelScale(Pass):
    name = "fold-channel-scale"
    summary = "fold a squeeze-excite gate (x * s per channel) into the weights of the conv that reads the product"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decide = Decisions(self, graph, ctx, work=("folded",))
        chosen = []
        for conv in graph.op_nodes("conv2d_nchwc"):
            product = graph.operands(conv)[0].node
            if graph.nodes[product]["op"] != "mul":  # not a candidate: nothing to explain
                continue
            found = gate_operands(graph, product)
            why = refusal(graph, conv, found)
            if why is None:
                chosen.append((conv, product, *found))
            else:
                decide.skip(conv, *why)
        for conv, product, x, scale in chosen:
            data = graph.nodes[conv]
            data["attrs"] = {**data["attrs"], "input_scale": True}
            data["origin"] = join_origin(graph.nodes[product]["origin"], data["origin"])
            graph.set_operands(conv, [x, *graph.operands(conv)[1:], scale])
            graph.remove_node(product)
            decide.done(conv, "folded", f"{product} into its weights")
        return decide.result()
