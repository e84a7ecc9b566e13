"""quantize: post-training static int8 quantization of conv2d and linear layers, calibrated on real inputs.

For a layer ``y = act(conv(x, W) + b)`` (linear alike), with observed clipping ranges for ``x`` and ``y``
(``calibrate.py``: minmax, percentile or entropy):

- activations: per-tensor affine uint8, ``x = (q_x - z_x) s_x``, ``y = (q_y - z_y) s_y``;
- weights: per output channel symmetric int8, ``s_w[c] = max |W_c| / 127``, ``q_w = round(W / s_w)`` (zero point 0,
  so the accumulator has no weight-zero-point cross term);
- bias: int32 at the accumulator's scale, ``q_b = round(b / (s_x s_w[c]))``;
- ``acc[c] = sum (q_x - z_x) q_w + q_b`` (int32) ``= (conv(x, W) + b)[c] / (s_x s_w[c])`` up to rounding, so
  ``q_y = z_y + acc * s_x s_w[c] / s_y``: the real multiplier becomes a fixed-point ``M 2^-shift`` applied with
  integer arithmetic only (``passes.ir.ops.requantize``); a fused relu/relu6/clamp becomes the output clamp range.

The layer becomes ``quantize(x) -> qconv2d | qlinear -> dequantize``. Where a quantized layer feeds another one
directly, both observed the same tensor, so their params agree and the dequantize/quantize pair between them is
dropped (exact: ``quantize(dequantize(q)) = q`` for equal params): the integer tensor passes straight through.

Why uint8 activations: x86's VNNI dot product (``vpdpbusd``) multiplies unsigned by signed bytes, so u8 x s8 is
the native form on this CPU (ONNX Runtime's x86 default too); and an affine uint8 range spends all 256 levels on
a post-ReLU tensor, where symmetric int8 would leave half of them unused.

``mode=dynamic`` (linear and LSTM/GRU/RNN layers, no calibration): weights as above, x quantized per tensor at run
time over its own range, ``y = (sum (q_x - z_x) q_w) s_x s_w + b`` in float (``qlinear_dynamic``). An RNN keeps its
float gates and state and does both matrix products that way (``qlstm_dynamic``, ``qgru_dynamic``,
``qrnn_dynamic``): ``W_ih`` and ``W_hh`` int8 per gate row, the layer's whole input sequence quantized per tensor
(one integer GEMM), h quantized per row at every step (a fixed scale would need |h| <= 1, which a given h0 or a
relu RNN breaks). Convs are refused there (``dynamic_conv``), RNNs in static mode (``static_recurrent``: their
outputs are float gates, not a calibrated integer tensor).

A max pool of a dequantized integer output is moved onto the integer tensor by the next pass of the default
pipeline, ``integer-max-pool``, so ResNet's stem pools uint8 and its first conv reads the pool directly.

Run it after ``fold-batch-norm`` and ``fuse-conv-activation`` and before ``fuse-conv-add``/``fuse-conv-pool``.
Refusals (the layer stays float): ``fused_pool`` (a ``conv2d_pool``), ``residual`` (a fused residual add),
``activation`` (a fused activation other than relu/relu6/clamp, which are not clamps of the integer output),
``not_float`` (input not float32), ``accumulator_overflow`` (``K * 255 * 127 + |q_b|`` could exceed int32),
``requantize_range`` (``s_x s_w / s_y`` outside what a shift of 1..62 encodes); for RNNs ``not_float`` and
``accumulator_overflow`` (``K * 255 * 127`` over the widest of the input and hidden sizes).

Accuracy-aware (``metric``, ``tolerance``; see ``Quantize``): the most sensitive layers go back to float until
the metric is within tolerance of the float graph's; ``keep_float`` names layers to leave float up front.

Under ``torchrun`` (``passes.core.distributed``) each rank calibrates on its shard of the data and the observers,
SQNR sums and metric totals are reduced over the ranks: every rank takes the same decisions, with the scales one
process would choose from all the data.

Reports: stats ``quantized``, ``skipped.*``, ``sqnr_db.min`` (the worst
layer, floored) and ``layer_sqnr_db.<node>`` (every quantized layer, floored; ``Report.to_dict()["sqnr_db"]``
gathers them); node meta ``quantize.sqnr_db`` (the layer's dequantized output against the float model's, over
the calibration data, with every earlier layer quantized too), ``quantize.input``/``quantize.output`` ((scale,
zero_point)) and ``quantize.observer``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from passes.core import distributed
from passes.core.pass_base import Decisions, Pass, PassContext, PassError, PassResult
from passes.core.rewrite import remove_unused, replace_node
from passes.ir.graph import Graph, Value
from passes.transforms.calibrate import (
    OBSERVERS,
    affine_params,
    clipping_range,
    evaluate,
    observe,
    run_probe,
    split_items,
    sqnr_db,
)
from passes.transforms.quantization import (
    ACTIVATION_RANGE,
    INT32_MAX,
    INTEGER_OP,
    QMAX,
    QMIN,
    RECURRENT,
    WEIGHT_MAX,
    dequantize_after,
    integer_layer,
    per_channel_int8,
    quant_params,
    reduction_size,
    same_quant_params,
)

MODES = ("static", "dynamic")
CANDIDATES = ("conv2d", "conv2d_pool", "linear", *RECURRENT)
DYNAMIC_OP = {"linear": "qlinear_dynamic", "lstm": "qlstm_dynamic", "gru": "qgru_dynamic", "rnn": "qrnn_dynamic"}


def refusal(graph: Graph, node: str, mode: str) -> tuple[str, str] | None:
    """Why ``node`` cannot be quantized in ``mode``, judged before calibration; None if it can."""
    data = graph.nodes[node]
    operands = graph.operands(node)
    if data["op"] in RECURRENT:
        return recurrent_refusal(graph, node, mode)
    if mode == "dynamic" and data["op"] != "linear":
        return "dynamic_conv", "dynamic mode quantizes linear layers; convs need calibrated static int8"
    if data["op"] == "conv2d_pool":
        return "fused_pool", "the pool is fused into the conv kernel; run quantize before fuse-conv-pool"
    if len(operands) > 1:
        return "residual", "a fused residual add; run quantize before fuse-conv-add"
    activation = data["attrs"]["activation"]
    if mode == "static" and activation not in ACTIVATION_RANGE and activation != "clamp":
        return "activation", f"fused {activation} is not a clamp of the integer output"
    if graph.value_type(operands[0]).dtype != "float32":
        return "not_float", f"input is {graph.value_type(operands[0])}"
    if reduction_size(data) * QMAX * WEIGHT_MAX > INT32_MAX:
        return "accumulator_overflow", f"{reduction_size(data)} products per output"
    return None


def recurrent_refusal(graph: Graph, node: str, mode: str) -> tuple[str, str] | None:
    """``refusal`` for an LSTM/GRU/RNN: dynamic mode only, float32 operands (x and initial states), and int32
    accumulators that cannot overflow (uint8 x int8 products, K of them)."""
    if mode != "dynamic":
        return "static_recurrent", "LSTM/GRU/RNN weights quantize with mode=dynamic (float gates, run-time scales)"
    dtypes = {graph.value_type(v).dtype for v in graph.operands(node)}
    if dtypes != {"float32"}:
        return "not_float", f"operands are {', '.join(sorted(dtypes))}"
    if reduction_size(graph.nodes[node]) * QMAX * WEIGHT_MAX > INT32_MAX:
        return "accumulator_overflow", f"{reduction_size(graph.nodes[node])} products per output"
    return None


def dynamic_layer(data: dict) -> tuple[dict, dict]:
    """(attrs, params) of ``qlinear_dynamic`` for a float linear node: int8 weights, float scales and bias; the
    fused activation stays (it applies to the float output). An RNN: every ``weight_*`` int8 per gate row with
    its ``scale_*``, biases float."""
    if data["op"] in RECURRENT:
        params = {}
        for name, value in data["params"].items():
            if name.startswith("weight_"):
                params[name], s_w = per_channel_int8(value)
                params[name.replace("weight_", "scale_", 1)] = s_w.astype(np.float32)
            else:
                params[name] = np.asarray(value, np.float32)
        return dict(data["attrs"]), params
    q_w, s_w = per_channel_int8(data["params"]["weight"])
    params = {"weight": q_w, "weight_scale": s_w.astype(np.float32)}
    if "bias" in data["params"]:
        params["bias"] = np.asarray(data["params"]["bias"], np.float32)
    return {k: data["attrs"][k] for k in ("activation", "activation_params")}, params


@dataclass(frozen=True)
class LayerPlan:
    node: str
    input_q: tuple[float, int] | None  # None: dynamic (quantized at run time, float output)
    output_q: tuple[float, int] | None
    attrs: dict
    params: dict


def rewrite_layer(graph: Graph, plan: LayerPlan, quantized: dict[tuple, Value]) -> str:
    """quantize -> integer op (keeping the node's name) -> dequantize (returned); an input that is the dequantized
    output of an integer layer with the same params is read as the integer tensor directly."""
    data = graph.nodes[plan.node]
    x = graph.operands(plan.node)[0]
    producer = graph.nodes[x.node]
    if producer["op"] == "dequantize" and same_quant_params(producer, *plan.input_q):
        q_x = graph.operands(x.node)[0]
    else:
        key = (x, plan.input_q)
        if key not in quantized:
            quantized[key] = graph.add_op("quantize", [x], attrs={"dtype": "uint8"}, params=quant_params(*plan.input_q),
                                          origin=data["origin"], name=f"{plan.node}_quantize")
        q_x = quantized[key]
    meta, origin = dict(data["meta"]), data["origin"]
    q_y = replace_node(graph, plan.node, INTEGER_OP[data["op"]], [q_x], plan.attrs, plan.params, origin)
    graph.nodes[q_y.node]["meta"] = meta
    return dequantize_after(graph, q_y, quant_params(*plan.output_q), origin, f"{plan.node}_dequantize").node


def apply_plans(graph: Graph, plans: list[LayerPlan]) -> None:
    """Rewrite the planned layers of ``graph`` in place: integer ops (static) or ``DYNAMIC_OP`` (dynamic)."""
    if plans and plans[0].input_q is None:
        for plan in plans:
            data = graph.nodes[plan.node]
            meta = dict(data["meta"])
            replace_node(graph, plan.node, DYNAMIC_OP[data["op"]], graph.operands(plan.node), plan.attrs,
                         plan.params, data["origin"])
            graph.nodes[plan.node]["meta"] = meta
        return
    quantized: dict[tuple, Value] = {}
    remove_unused(graph, [rewrite_layer(graph, plan, quantized) for plan in plans])


def layer_sqnr(float_graph: Graph, graph: Graph, plans: list[LayerPlan], batches: list[tuple]) -> dict[str, float]:
    """Per layer: SQNR of the (dequantized) quantized output against the float layer output, over all batches
    (of every rank under ``torchrun``)."""
    values = [Value(plan.node, 0) for plan in plans]
    signal, noise = np.zeros(len(plans)), np.zeros(len(plans))
    for ref, out in zip(run_probe(float_graph, values, batches), run_probe(graph, values, batches)):
        for i, plan in enumerate(plans):
            scale, zero_point = plan.output_q or (1.0, 0)
            dequantized = (out[i] - zero_point) * np.float64(np.float32(scale))
            signal[i] += np.sum(ref[i] ** 2)
            noise[i] += np.sum((ref[i] - dequantized) ** 2)
    signal, noise = distributed.all_reduce([signal, noise], "sum", distributed.world())
    return {plan.node: sqnr_db(s, n) for plan, s, n in zip(plans, signal, noise)}


def annotate(graph: Graph, decide: Decisions, plans: list[LayerPlan], sqnr: dict[str, float], notes: dict) -> None:
    for plan in plans:
        meta = graph.nodes[plan.node]["meta"]
        meta |= notes | ({"quantize.sqnr_db": round(sqnr[plan.node], 2)} if sqnr else {})
        if plan.input_q is not None:
            meta |= {"quantize.input": plan.input_q, "quantize.output": plan.output_q}
        decide.done(plan.node, "quantized", f"SQNR {sqnr[plan.node]:.1f} dB" if sqnr else "")
    if sqnr:
        decide.stats["sqnr_db.min"] = math.floor(min(sqnr.values()))
        for node, value in sqnr.items():
            decide.stats[f"layer_sqnr_db.{node}"] = math.floor(value)


def sensitivity(float_graph: Graph, plans: list[LayerPlan], batches: list[tuple]) -> dict[str, float]:
    """Per layer: its SQNR when it alone is quantized (float input). The cumulative SQNR of ``layer_sqnr`` also
    charges a layer with every earlier layer's noise, so ranking by it would put the last layers back first."""
    alone = {}
    for plan in plans:
        trial = float_graph.copy_graph()
        apply_plans(trial, [plan])
        alone |= layer_sqnr(float_graph, trial, [plan], batches)
    return alone


@dataclass(frozen=True)
class Quantize(Pass):
    """``mode=static``: calibrated integer layers (above). ``mode=dynamic``: linear and LSTM/GRU/RNN layers,
    weights int8 per channel (gate row), activations quantized at run time (``qlinear_dynamic``,
    ``qlstm_dynamic``...); no calibration needed, SQNR (of an RNN: of its output sequence) reported when ``data``
    is given.

    ``keep_float``: node names or origins (fnmatch patterns) that stay float (``skipped.kept_float``).

    Accuracy-aware (Python only): ``metric(outputs, labels or None) -> float`` (higher is better), evaluated on
    every ``data`` item (inputs, optionally followed by labels) through the reference interpreter, and
    ``tolerance``, the allowed drop of the metric from the float graph. While the quantized graph's metric is
    more than ``tolerance`` below the float graph's, the most sensitive quantized layer (lowest SQNR when
    quantized alone) goes back to float. Calibration ranges are observed on the float graph, so the remaining
    layers keep their params; a layer between two kept ones quantizes its float input afresh. Stats
    ``kept_for_accuracy``, ``metric_float_milli``, ``metric_int8_milli`` (every candidate quantized) and
    ``metric_final_milli`` (metric x 1000); kept layers get meta ``quantize.kept_float = "accuracy"`` and
    ``quantize.sqnr_db_alone``, and a later quantize run leaves them float (``skipped.kept_float``)."""

    name = "quantize"
    summary = "int8: static (calibrated uint8 activations, per-channel int8 weights, integer ops) or dynamic"
    requires = ("shapes", "inference")
    preserves = ("shapes", "inference")
    mode: str = "static"
    observer: str = "minmax"
    percentile: float = 99.99
    keep_float: tuple[str, ...] = ()
    metric: Callable | None = None
    tolerance: float = 0.0

    def __post_init__(self):
        if isinstance(self.keep_float, str) or not all(isinstance(k, str) for k in self.keep_float):
            raise PassError(f"quantize: keep_float must be a tuple of node names or origin patterns, got "
                            f"{self.keep_float!r}")
        if self.metric is not None and not callable(self.metric):
            raise PassError(f"quantize: metric must be a function (outputs, labels) -> float, got {self.metric!r}")
        if not (isinstance(self.tolerance, (int, float)) and math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise PassError(f"quantize: tolerance must be a finite number >= 0, got {self.tolerance!r}")
        if self.tolerance and self.metric is None:
            raise PassError("quantize: tolerance needs a metric (a Python function: Quantize(metric=..., "
                            "tolerance=...))")

    def spec(self) -> str:
        """As ``Pass.spec``, with the metric named by its function name (a function has no text form)."""
        text = super().spec()
        if self.metric is None:
            return text
        return text.replace(f"metric={self.metric}", f"metric={getattr(self.metric, '__qualname__', 'function')}")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if self.mode not in MODES or self.observer not in OBSERVERS:
            raise PassError(f"quantize: mode={self.mode!r}, observer={self.observer!r}; modes: {', '.join(MODES)}; "
                            f"observers: {', '.join(OBSERVERS)}")
        decide = Decisions(self, graph, ctx, work=("quantized",))
        accepted = []
        for node in graph.op_nodes(CANDIDATES):
            why = self._kept(graph, node) or refusal(graph, node, self.mode)
            if why is not None:
                decide.skip(node, *why)
            else:
                accepted.append(node)
        if not accepted:
            return decide.result()
        items = split_items(ctx.data, graph, "quantize") if ctx.data is not None else []
        local = distributed.shard(items, distributed.world())  # this rank's items; observations are reduced
        batches = [inputs for inputs, _ in local]
        if self.metric is not None and not items:
            raise PassError(f"quantize: the accuracy metric needs data to evaluate on for {graph.name!r}: pass "
                            "data=[(x,), (x, labels), ...] to optimize()")
        float_graph = graph.copy_graph()
        if self.mode == "dynamic":
            plans = [LayerPlan(node, None, None, *dynamic_layer(graph.nodes[node])) for node in accepted]
        elif not items:
            raise PassError(f"quantize needs calibration inputs for {len(accepted)} layers of {graph.name!r}: "
                            "pass data=[(x,), ...] to optimize() or --data NPZ to the CLI")
        else:
            plans = self._static_plans(graph, accepted, batches, decide, progress=ctx.progress is not None)
        if self.metric is not None and plans:
            plans = self._accuracy_search(graph, float_graph, plans, local, decide)
        apply_plans(graph, plans)
        sqnr = layer_sqnr(float_graph, graph, plans, batches) if items and plans else {}
        notes = {"quantize.mode": "dynamic"} if self.mode == "dynamic" else {"quantize.observer": self.observer}
        annotate(graph, decide, plans, sqnr, notes)
        # kept layers and metric values are reported, not work: the graph changed only if a layer was quantized
        return PassResult(decide.stats["quantized"] > 0, dict(decide.stats))

    def _kept(self, graph: Graph, node: str) -> tuple[str, str] | None:
        data = graph.nodes[node]
        if data["meta"].get("quantize.kept_float") == "accuracy":
            return "kept_float", "kept float by an earlier accuracy-aware quantize"
        if graph.matches(node, self.keep_float):
            return "kept_float", f"{node} matches keep_float={list(self.keep_float)}"
        return None

    def _accuracy_search(self, graph: Graph, float_graph: Graph, plans: list[LayerPlan], items: list[tuple],
                         decide: Decisions) -> list[LayerPlan]:
        """The plans to apply: every plan, less the most sensitive layers until the metric is within tolerance."""
        baseline = evaluate(float_graph, self.metric, items)
        alone = sensitivity(float_graph, plans, [inputs for inputs, _ in items])
        order = sorted(plans, key=lambda plan: alone[plan.node])  # most sensitive first
        final, kept = baseline, []
        for count in range(len(plans)):
            active = [plan for plan in plans if plan.node not in kept]
            trial = float_graph.copy_graph()
            apply_plans(trial, active)
            final = evaluate(trial, self.metric, items)
            if count == 0:
                decide.stats["metric_int8_milli"] = round(1000 * final)
            if baseline - final <= self.tolerance:
                break
            kept.append(order[count].node)
        else:
            final = baseline  # every layer is back in float: the float graph itself
        for node in kept:
            graph.nodes[node]["meta"] |= {"quantize.kept_float": "accuracy",
                                          "quantize.sqnr_db_alone": round(alone[node], 2)}
            decide.done(node, "kept_for_accuracy", f"SQNR {alone[node]:.1f} dB alone; metric "
                        f"{baseline:.4g} float, {final:.4g} with it kept")
        for plan in plans:
            graph.nodes[plan.node]["meta"]["quantize.sqnr_db_alone"] = round(alone[plan.node], 2)
        decide.stats.setdefault("kept_for_accuracy", 0)  # reported even when nothing had to be kept
        decide.stats["metric_float_milli"] = round(1000 * baseline)
        decide.stats["metric_final_milli"] = round(1000 * final)
        return [plan for plan in plans if plan.node not in kept]

    def _static_plans(self, graph: Graph, accepted: list[str], batches: list[tuple], decide: Decisions,
                      progress: bool = False) -> list[LayerPlan]:
        """Calibrate every accepted layer's input and output, then build its integer form (or refuse it)."""
        values = list(dict.fromkeys(v for node in accepted for v in (graph.operands(node)[0], Value(node, 0))))
        seen = observe(graph, values, batches, self.observer, progress=progress)
        qparams = {v: affine_params(*clipping_range(seen[v], self.observer, self.percentile), QMIN, QMAX)
                   for v in values}
        plans = []
        for node in accepted:
            input_q, output_q = qparams[graph.operands(node)[0]], qparams[Value(node, 0)]
            built = integer_layer(graph.nodes[node], input_q, output_q)
            if isinstance(built[0], str):
                decide.skip(node, *built)
            else:
                plans.append(LayerPlan(node, input_q, output_q, *built))
        return plans
