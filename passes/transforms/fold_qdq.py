"""fold-qdq: fold an imported QDQ / QLinear layer, ``quantize(layer(dequantize(q_x)))``, into ``qconv2d``/``qlinear``.

ONNX QDQ models (``quantize_static(..., QuantFormat.QDQ)``) and QLinearConv/QLinearMatMul models import as
``q_x -> dequantize -> conv2d | linear [-> relu | relu6 | clamp] -> quantize`` with the weights (and bias)
dequantized to float constants at import. The ONNX meaning of such a layer is integer: ``x = (q_x - z_x) s_x``,
``W = q_w s_w`` (int8, symmetric), ``b = q_b s_x s_w`` (int32), ``q_y = clamp(z_y + round((conv(x, W) + b) / s_y))``.
So ``acc = sum (q_x - z_x) q_w + q_b`` is the exact int32 accumulator and ``q_y = z_y + acc s_x s_w / s_y``: the same
integer layer the ``quantize`` pass builds (``quantize.integer_layer``'s parameters: int8 weights, int32 bias at
``s_x s_w``, fixed-point ``M 2^-shift`` multiplier, uint8 output with its zero point, a fused relu/relu6/clamp as
the output clamp range). The layer reads ``q_x`` directly; a ``dequantize`` left without users is removed.

Recovering the integers: each float weight is ``fl32(q_w s_w)``. ONNX Runtime's symmetric scale is
``s_w = max |W| / 127`` per tensor or per output channel, so the scale is taken from the largest weight (trying a few
float32 neighbours of that quotient) and accepted only if every weight is reproduced bit for bit by
``fl32(round(W / s_w) s_w)`` with ``|q_w| <= 127``; otherwise the layer is refused. The bias is
``q_b = round(b / (s_x s_w))``, as ``quantize`` rounds it.

Exactness: integer up to the requantize rounding, which rounds once, half up, in fixed point, where ONNX Runtime
rounds half to even in float: outputs agree within one quantization step, differing only at .5 ties.

Refusals (counted ``skipped.<reason>``, the layer stays float): ``shared_output`` (the float layer/activation output
has other users), ``residual`` (a fused residual add), ``activation`` (a fused or following activation that is not a
clamp of the output), ``activation_dtype`` (a per-axis activation scale: the integer ops read and write per-tensor
uint8 or int8; ONNX Runtime's default ``QInt8`` activations fold like ``QUInt8`` ones), ``weights_not_int8`` (the
weights are not symmetric int8 multiples of a per-tensor or per-channel scale: asymmetric or unquantized weights),
``accumulator_overflow``, ``requantize_range``.
Run it first: before ``fuse-conv-activation`` sees the float layer (it also accepts a layer with a fused clamp).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from passes.core.pass_base import Decisions, Pass, PassContext, PassResult
from passes.core.pattern import Match, Pattern
from passes.core.rewrite import join_origin, remove_unused, replace_node
from passes.ir.graph import Graph, Value
from passes.ir.ops import activation_of
from passes.transforms.quantization import ACTIVATION_RANGE, INTEGER_OP, INTEGER_RANGE, WEIGHT_MAX, integer_params

LAYER_OPS = ("conv2d", "linear")
CLAMP_OPS = ("relu", "relu6", "clamp")
QDQ_LAYER = Pattern(roles={"dequantize": "dequantize", "layer": LAYER_OPS, "quantize": "quantize"},
                    edges=(("dequantize", "layer", 0), ("layer", "quantize", 0)), anchor="quantize",
                    private=("layer",))
QDQ_LAYER_CLAMP = Pattern(roles={"dequantize": "dequantize", "layer": LAYER_OPS, "act": CLAMP_OPS,
                                 "quantize": "quantize"},
                          edges=(("dequantize", "layer", 0), ("layer", "act", 0), ("act", "quantize", 0)),
                          anchor="quantize", private=("layer", "act"))
SCALE_NEIGHBOURS = 2  # float32 ulps tried either side of max|W| / 127


def symmetric_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(q_w int8, s_w float64 per output channel) with ``weight == fl32(q_w * s_w)`` exactly, a per-tensor scale
    tried before per-channel ones; None if the weights are no such int8 tensor."""
    weight = np.asarray(weight, np.float32)
    rows = weight.reshape(weight.shape[0], -1)
    whole = _exact_scale(rows.reshape(-1))
    if whole is not None:
        scales = np.full(len(rows), whole, np.float32)
    else:
        found = [_exact_scale(row) for row in rows]
        if any(s is None for s in found):
            return None
        scales = np.asarray(found, np.float32)
    q_w = np.round(rows / scales[:, None].astype(np.float64)).astype(np.int8)
    return q_w.reshape(weight.shape), scales.astype(np.float64)


def _exact_scale(values: np.ndarray) -> np.float32 | None:
    """The float32 scale s with ``values == fl32(round(values / s) * s)``, ``|round(values / s)| <= 127`` and the
    largest magnitude at 127 (1 for all zeros), or None."""
    peak = np.float32(np.abs(values).max())
    if peak == 0:
        return np.float32(1.0)
    guess = np.float32(np.float64(peak) / WEIGHT_MAX)
    for ulps in sorted(range(-SCALE_NEIGHBOURS, SCALE_NEIGHBOURS + 1), key=abs):
        scale = np.float32(guess + ulps * np.spacing(guess))
        q = np.round(values.astype(np.float64) / np.float64(scale))
        if np.abs(q).max() <= WEIGHT_MAX and np.array_equal(q.astype(np.float32) * scale, values):
            return scale
    return None


def _activation(graph: Graph, match: Match) -> dict | str:
    """``{"activation", "activation_params"}`` of the layer's output clamp, or the unsupported activation's name."""
    attrs = graph.nodes[match["layer"]]["attrs"]
    fused = (attrs.get("activation", "none"), tuple(attrs.get("activation_params", ())))
    if "act" in match:
        if fused[0] != "none":
            return f"{fused[0]} then {graph.nodes[match['act']]['op']}"
        fused = activation_of(graph.nodes[match["act"]]["op"], graph.nodes[match["act"]]["attrs"])
    if fused[0] not in ACTIVATION_RANGE and fused[0] != "clamp":
        return fused[0]
    return {"activation": fused[0], "activation_params": fused[1]}


def integer_form(graph: Graph, match: Match) -> tuple[dict, dict] | tuple[str, str]:
    """(attrs, params) of the integer op for a matched layer, or a (reason, detail) refusal."""
    layer, dq, q = (graph.nodes[match[r]] for r in ("layer", "dequantize", "quantize"))
    if len(graph.operands(match["layer"])) > 1:
        return "residual", "a fused residual add; run fold-qdq before fuse-conv-add"
    activation = _activation(graph, match)
    if isinstance(activation, str):
        return "activation", f"{activation} is not a clamp of the integer output"
    in_dtype = graph.value_type(graph.operands(match["dequantize"])[0]).dtype
    if in_dtype not in INTEGER_RANGE or q["attrs"]["dtype"] not in INTEGER_RANGE \
            or np.ndim(dq["params"]["scale"]) or np.ndim(q["params"]["scale"]):
        return "activation_dtype", (f"{in_dtype} -> {q['attrs']['dtype']}; the integer ops take per-tensor uint8 or "
                                    "int8 activations")
    recovered = symmetric_int8(layer["params"]["weight"])
    if recovered is None:
        return "weights_not_int8", "weights are not symmetric int8 multiples of a per-tensor or per-channel scale"
    input_q = (float(dq["params"]["scale"]), int(dq["params"]["zero_point"]))
    output_q = (float(q["params"]["scale"]), int(q["params"]["zero_point"]))
    return integer_params(layer, input_q, output_q, *recovered, activation, out_dtype=q["attrs"]["dtype"])


@dataclass(frozen=True)
class FoldQdq(Pass):
    name = "fold-qdq"
    summary = "fold imported dequantize -> conv/linear -> quantize layers (ONNX QDQ, QLinear*) into integer ops"
    preserves = ("shapes", "inference")
    lossy = True  # float compute becomes the integer arithmetic the ONNX model specifies (ties round differently)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decide = Decisions(self, graph, ctx, work=("folded",))
        plans = []
        for anchor in graph.op_nodes(("quantize",)):
            producer = graph.nodes[graph.operands(anchor)[0].node]["op"]
            if producer not in LAYER_OPS + CLAMP_OPS:
                continue  # quantizing something other than a layer's output: nothing to fold
            pattern = QDQ_LAYER_CLAMP if producer in CLAMP_OPS else QDQ_LAYER
            match = pattern.match_at(graph, anchor)
            if match is None:
                continue  # a float layer whose input is not dequantized: not a quantized layer
            shared = pattern.private_violations(graph, match)
            built = ("shared_output", ", ".join(match[r] for r in shared)) if shared else integer_form(graph, match)
            if isinstance(built[0], str):
                decide.skip(match["layer"], *built)
            else:
                plans.append((match, *built))
        for match, attrs, params in plans:
            layer = graph.nodes[match["layer"]]
            origin = join_origin(layer["origin"], *(graph.nodes[match[r]]["origin"] for r in ("act", "quantize")
                                                    if r in match))
            meta = dict(layer["meta"])
            # the quantize's users read the layer, then the integer op replaces the layer under its name
            graph.replace_all_uses(Value(match["quantize"], 0), Value(match["layer"], 0))
            removed = tuple(match[r] for r in ("act", "quantize") if r in match)
            new = replace_node(graph, match["layer"], INTEGER_OP[layer["op"]],
                               graph.operands(match["dequantize"]), attrs, params, origin, removed=removed)
            graph.nodes[new.node]["meta"] = meta
            decide.done(new.node, "folded", f"{match['layer']} -> {INTEGER_OP[layer['op']]}")
            remove_unused(graph, [match["dequantize"]])
        return decide.result()
