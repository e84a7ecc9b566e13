"""fuse-conv-activation: give a conv/linear the activation that follows it, as one op (one kernel epilogue).

``act(conv(x) + b)`` becomes ``conv(x)`` with attrs ``activation``/``activation_params`` (see
``passes.ir.ops.ACTIVATIONS``); the backend applies the activation in the conv kernel's epilogue, so the conv
output is never written and re-read. Exact: the same function is computed.

Refusals: ``shared_output`` (the pre-activation values have other users or are a graph output),
``already_fused`` (the layer already carries an activation).
"""

from __future__ import annotations

from dataclasses import dataclass

from passes.core.pass_base import Decisions, Pass, PassContext, PassResult
from passes.core.pattern import Pattern
from passes.core.rewrite import bypass, join_origin
from passes.ir.graph import Graph, Value
from passes.ir.ops import activation_of

ACTIVATION_OPS = ("relu", "relu6", "leaky_relu", "elu", "gelu", "silu", "mish", "sigmoid", "tanh", "hardswish",
                  "hardsigmoid", "clamp")
LAYER_ACTIVATION = Pattern(roles={"layer": ("conv1d", "conv2d", "linear"), "act": ACTIVATION_OPS},
                           edges=(("layer", "act", 0),), anchor="act", private=("layer",))


@dataclass(frozen=True)
class FuseConvActivation(Pass):
    name = "fuse-conv-activation"
    summary = "fuse relu/relu6/silu/... into the preceding conv or linear"
    preserves = ("shapes", "inference", "float")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decide = Decisions(self, graph, ctx, work=("fused",))
        matches = LAYER_ACTIVATION.scan(graph, decide, lambda match: (
            ("already_fused", "") if graph.nodes[match["layer"]]["attrs"]["activation"] != "none" else None))
        fusions = [(m["layer"], m["act"]) for m in matches]
        for layer, act in fusions:
            name, params = activation_of(graph.nodes[act]["op"], graph.nodes[act]["attrs"])
            data = graph.nodes[layer]
            data["attrs"] = {**data["attrs"], "activation": name, "activation_params": params}
            data["origin"] = join_origin(data["origin"], graph.nodes[act]["origin"])
            decide.done(act, "fused", f"into {layer}")
            bypass(graph, act, Value(layer, 0))
        return decide.result()
