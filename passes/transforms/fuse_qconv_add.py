"""fuse-qconv-add: an integer residual add, ``quantize(act(dequantize(qconv2d(x)) + dequantize(r)))``, becomes one
``qconv2d`` with ``r`` as a second operand, added inside the conv's requantization.

The integer counterpart of ``fuse-conv-add``. After ``quantize`` (or ``fold-qdq`` on an ONNX QDQ model) a ResNet
block ends with its last conv requantized to uint8 (int8 in ONNX Runtime's default QDQ) at its own scale ``s_c``,
dequantized, added in float to the dequantized shortcut ``r`` (scale ``s_r``, zero point ``z_r``), relu'd and
quantized again (``s_y``, ``z_y``) for the next block: two roundings and a separate full-tensor kernel. Fused,
with ``A[c] = s_x s_w[c]`` the accumulator's scale (``= M_c 2^-shift_c s_c``, read back from the conv's fixed-point
multiplier)::

    q_y = clamp(z_y + round(acc A[c] / s_y + (r - z_r) s_r / s_y), out_min, out_max)
        = clamp(z_y + ((acc M + 2^(shift-1) + (r - z_r) R) >> shift), ...)

with ``(M, shift) = fixed_point(A / s_y)`` and ``R = round(s_r / s_y 2^shift)`` (int64): one rounding, integer only,
in the conv kernel's epilogue; a relu after the add becomes ``out_min = z_y``. Not bit-identical to the unfused
integer graph (which rounds twice): the result differs by at most one output step, and is the closer one to the
real-valued sum. Float users of the sum (the next block's shortcut) read ``dequantize(q_y)`` instead.

Refusals (counted ``skipped.<reason>``; the add stays float):
- ``no_producer`` / ``shared_output``: the add's operand is not a private ``dequantize(qconv2d)``.
- ``already_fused``: the conv already has a residual or clamps its output (``act(conv) + r`` is not ``conv + r``):
  a clamp range narrower than its dtype's, or one starting at real zero (a relu, even where the zero point makes
  the clamp look like the dtype's own bound).
- ``shortcut``: the other operand is not a per-tensor ``dequantize`` of an 8-bit tensor of the output's shape.
- ``activation``: the add is followed by an activation other than relu.
- ``float_output``: no per-tensor ``quantize`` reads the sum (its scale and dtype are what the fused conv writes).
- ``requantize_range``: ``A / s_y`` or ``s_r / s_y`` outside what the 64-bit fixed point encodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from passes.core.pass_base import Decisions, Pass, PassContext, PassResult
from passes.core.pattern import Match, Pattern
from passes.core.rewrite import join_origin, remove_unused
from passes.ir.graph import Graph, Value
from passes.ir.ops import activation_of
from passes.transforms.quantization import INTEGER_RANGE, fixed_point, quant_params

QCONV_ADD = Pattern(roles={"conv": "qconv2d", "dequantize": "dequantize", "add": "add"},
                    edges=(("conv", "dequantize", 0), ("dequantize", "add", None)), anchor="add",
                    private=("conv", "dequantize"))
RESIDUAL_MULTIPLIER_MAX = 2 ** 54  # 255 * R + acc * M + rounding stays below 2^63


def per_tensor_qparams(graph: Graph, node: str) -> tuple[float, int] | None:
    """(scale, zero_point) of a per-tensor uint8/int8 quantize/dequantize node, else None."""
    data = graph.nodes[node]
    scale, zero_point = data["params"]["scale"], data["params"]["zero_point"]
    if np.ndim(scale) or np.ndim(zero_point) or np.asarray(zero_point).dtype.name not in INTEGER_RANGE:
        return None
    return float(scale), int(zero_point)


def add_result(graph: Graph, add: str) -> tuple[Value, bool] | None:
    """(the value the fusion produces, whether a relu is absorbed): the add's output, or the relu that is its only
    user; None for another activation."""
    out = Value(add, 0)
    users = graph.users(out)
    if len(users) == 1 and not graph.is_graph_output(out):
        user = graph.nodes[users[0][0]]
        activation = activation_of(user["op"], user["attrs"])
        if activation is not None:
            return (Value(users[0][0], 0), True) if activation[0] == "relu" else None
    return out, False


@dataclass(frozen=True)
class Fusion:
    """A checked match: the output's quantize nodes and params, the shortcut, and the fused conv's new params."""

    result: Value
    relu: str | None
    quantizes: list[str]
    shortcut: Value
    shortcut_dequantize: str
    output_q: tuple[float, int]
    attrs: dict
    params: dict


def plan(graph: Graph, match: Match) -> Fusion | tuple[str, str]:
    conv, dequantize, add = match["conv"], match["dequantize"], match["add"]
    data = graph.nodes[conv]
    a = data["attrs"]
    low, high = INTEGER_RANGE[a["out_dtype"]]
    clamped = a["out_min"] > low or a["out_max"] < high or a["out_min"] == a["output_zero_point"]  # incl. relu at z
    if len(graph.operands(conv)) > 1 or clamped:
        return "already_fused", f"{conv} already has a residual or clamps its output (an activation)"
    conv_q = per_tensor_qparams(graph, dequantize)
    other = next(v for v in graph.operands(add) if v != Value(dequantize, 0))
    shortcut_node = other.node
    if (conv_q is None or graph.nodes[shortcut_node]["op"] != "dequantize"
            or per_tensor_qparams(graph, shortcut_node) is None
            or graph.value_type(graph.operands(shortcut_node)[0]) != graph.value_type(Value(conv, 0))):
        return "shortcut", f"{shortcut_node} is no per-tensor dequantize of a {graph.value_type(Value(conv, 0))}"
    found = add_result(graph, add)
    if found is None:
        return "activation", f"{graph.users(Value(add, 0))[0][0]} is not a relu"
    result, relu = found
    quantizes = [user for user, _ in graph.users(result) if graph.nodes[user]["op"] == "quantize"
                 and per_tensor_qparams(graph, user)]
    if not quantizes:
        return "float_output", f"no per-tensor quantize reads {result.node}"
    output_q, out_dtype = per_tensor_qparams(graph, quantizes[0]), graph.nodes[quantizes[0]]["attrs"]["dtype"]
    quantizes = [q for q in quantizes if per_tensor_qparams(graph, q) == output_q
                 and graph.nodes[q]["attrs"]["dtype"] == out_dtype]
    (s_c, _), (s_r, z_r), (s_y, z_y) = conv_q, per_tensor_qparams(graph, shortcut_node), output_q
    acc_scale = data["params"]["multiplier"].astype(np.float64) * np.exp2(-data["params"]["shift"].astype(np.float64))
    multiplier, shift = fixed_point(acc_scale * s_c / s_y)
    residual_multiplier = np.round(s_r / s_y * np.exp2(shift.astype(np.float64)))
    if shift.min() < 1 or shift.max() > 62 or residual_multiplier.max() >= RESIDUAL_MULTIPLIER_MAX:
        return "requantize_range", f"s_r / s_y = {s_r / s_y:.3g} with shifts up to {shift.max()}"
    low, high = INTEGER_RANGE[out_dtype]
    attrs = a | {"residual_zero_point": z_r, "output_zero_point": z_y, "out_dtype": out_dtype,
                 "out_min": max(low, z_y) if relu else low, "out_max": high}
    params = data["params"] | {"multiplier": multiplier, "shift": shift,
                               "residual_multiplier": residual_multiplier.astype(np.int64)}
    return Fusion(result, result.node if relu else None, quantizes, graph.operands(shortcut_node)[0],
                  shortcut_node, output_q, attrs, params)


@dataclass(frozen=True)
class FuseQConvAdd(Pass):
    name = "fuse-qconv-add"
    summary = "fuse an integer residual add (dequantize + add [+ relu] + quantize) into the qconv2d that feeds it"
    lossy = True  # rounds once where the unfused integer graph rounds twice: at most one output step apart

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Matches are rewritten as they are found, in topological order: a block's shortcut is the previous
        block's sum, which is a ``dequantize`` of an integer tensor only once that block has been fused."""
        decide = Decisions(self, graph, ctx, work=("fused",))
        plans: dict[str, Fusion] = {}

        def check(match: Match) -> tuple[str, str] | None:
            planned = plan(graph, match)
            if isinstance(planned, tuple):
                return planned
            plans[match["add"]] = planned
            return None

        def rewrite(match: Match) -> None:
            conv, add, fusion = match["conv"], match["add"], plans[match["add"]]
            data = graph.nodes[conv]
            absorbed = [match["dequantize"], add] + ([fusion.relu] if fusion.relu else [])
            data["origin"] = join_origin(data["origin"], *(graph.nodes[n]["origin"] for n in absorbed[1:]))
            data["attrs"], data["params"] = fusion.attrs, fusion.params
            graph.set_operands(conv, [graph.operands(conv)[0], fusion.shortcut])
            for quantize in fusion.quantizes:  # readers of the integer sum now read the conv
                graph.replace_all_uses(Value(quantize, 0), Value(conv, 0))
                graph.remove_node(quantize)
            if graph.users(fusion.result) or graph.is_graph_output(fusion.result):  # float readers: dequantize
                scale, zero_point = fusion.output_q
                deq = graph.add_op("dequantize", [Value(conv, 0)], attrs={"axis": None},
                                   params=quant_params(scale, zero_point, fusion.attrs["out_dtype"]),
                                   name=f"{conv}_dequantize", origin=data["origin"])
                graph.replace_all_uses(fusion.result, deq)
            for node in reversed(absorbed):
                graph.remove_node(node)
            remove_unused(graph, [fusion.shortcut_dequantize])  # the shortcut's float copy, if nothing reads it
            decide.done(add, "fused", f"into {conv}" + (" with relu" if fusion.relu else ""))

        QCONV_ADD.scan(graph, decide, check, rewrite)
        return decide.result()
