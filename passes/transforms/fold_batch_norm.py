"""fold-batch-norm: fold an inference batch norm into the conv or linear layer that feeds it.

Math (per output channel c): batch_norm(y) = s_c * y + t_c with s = gamma / sqrt(var + eps), t = beta - mean * s.
For y = W x + b this is (s * W) x + (s * b + t): scale the weight's output-channel slices by s and replace the
bias with s * b + t (b = 0 when the layer has no bias). Exact up to float rounding.

Preconditions (each refusal counted as ``skipped.<reason>``):
- ``no_producer``: the norm's input is not a conv1d/conv2d/conv_transpose{1,2}d/linear output.
- ``shared_output``: the layer's output has other users (they need the un-normalized values) or is a graph output.
- ``activation_first``: the layer already carries a fused activation or residual; the norm comes after it, and
  neither commutes with the per-channel affine map.
- ``channel_axis``: a linear's features are not on dim 1 of its output (rank != 2), but the norm normalizes dim 1.
- ``grouped_transpose``: grouped transposed convolutions (weight slices interleave groups; rare, not folded).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from passes.core.pass_base import Decisions, Pass, PassContext, PassResult
from passes.core.pattern import Pattern
from passes.core.rewrite import bypass, join_origin
from passes.ir.graph import Graph, Value

FOLDABLE = ("conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d", "linear")
LAYER_NORM = Pattern(roles={"layer": FOLDABLE, "norm": "batch_norm"}, edges=(("layer", "norm", 0),),
                     anchor="norm", private=("layer",))


def affine_of(norm_params: dict, eps: float, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) with batch_norm(y) = s * y + t per channel, computed in float64."""
    var = np.asarray(norm_params["running_var"], np.float64)
    gamma = np.asarray(norm_params.get("weight", np.ones(channels)), np.float64)
    beta = np.asarray(norm_params.get("bias", np.zeros(channels)), np.float64)
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - np.asarray(norm_params["running_mean"], np.float64) * scale


def folded_params(op: str, params: dict, scale: np.ndarray, shift: np.ndarray) -> dict:
    weight = np.asarray(params["weight"], np.float64)
    channel_axis = 1 if op.startswith("conv_transpose") else 0  # transposed weights are (in, out/groups, k...)
    shape = [1] * weight.ndim
    shape[channel_axis] = -1
    bias = np.asarray(params.get("bias", np.zeros(len(scale))), np.float64)
    return {"weight": (weight * scale.reshape(shape)).astype(np.float32),
            "bias": (bias * scale + shift).astype(np.float32)}


def refusal(graph: Graph, layer: str) -> tuple[str, str] | None:
    """Why the layer's attributes prevent folding, or None."""
    data = graph.nodes[layer]
    if data["attrs"].get("activation", "none") != "none" or len(graph.operands(layer)) > 1:
        return "activation_first", f"{layer} applies {data['attrs']['activation']} first"
    if data["op"] == "linear" and data["out_types"][0].rank != 2:
        return "channel_axis", f"{layer} output is {data['out_types'][0]}"
    if data["op"].startswith("conv_transpose") and data["attrs"]["groups"] != 1:
        return "grouped_transpose", f"{layer} has groups={data['attrs']['groups']}"
    return None


@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    name = "fold-batch-norm"
    summary = "fold inference batch norms into the preceding conv/linear weights"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decide = Decisions(self, graph, ctx, work=("folded",))
        matches = LAYER_NORM.scan(graph, decide, lambda match: refusal(graph, match["layer"]))
        folds = [(m["layer"], m["norm"]) for m in matches]
        for layer, norm in folds:
            data, norm_data = graph.nodes[layer], graph.nodes[norm]
            scale, shift = affine_of(norm_data["params"], norm_data["attrs"]["eps"], data["out_types"][0].shape[1])
            data["params"] = folded_params(data["op"], data["params"], scale, shift)
            data["origin"] = join_origin(data["origin"], norm_data["origin"])
            decide.done(norm, "folded", f"into {layer}")
            bypass(graph, norm, Value(layer, 0))
        return decide.result()
