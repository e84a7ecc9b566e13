"""ONNX exporter: IR -> ``onnx.ModelProto`` (opset 17), so an optimized graph runs wherever ONNX runs.

Every IR op maps to standard ONNX ops; fused ops are expanded back (a conv with a fused activation becomes Conv
followed by the activation; ``conv2d_pool`` becomes Conv, activation, pool). RNN weights go back to ONNX's gate
order (LSTM iofc, GRU zrh) and multi-layer RNNs become one ONNX node per layer. Params become initializers. The
output list is the flattened output structure. The exported model is checked with ``onnx.checker``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from passes.ir.graph import Graph, IRError
from passes.ir.ops import conv_operands, expand_dw_convs

OPSET = 17
_ELEM = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "int32": TensorProto.INT32,
         "int8": TensorProto.INT8, "uint8": TensorProto.UINT8, "bool": TensorProto.BOOL,
         "float16": TensorProto.FLOAT16, "float64": TensorProto.DOUBLE, "bfloat16": TensorProto.BFLOAT16}


class ExportError(IRError):
    """An op configuration with no ONNX equivalent; names the node and its origin."""


class _Exporter:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.names: dict[tuple[str, int], str] = {}
        self.counter = 0
        self.node = ""

    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}__{self.counter}"

    def const(self, array, hint: str = "c") -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def add(self, op: str, inputs: list[str], outputs: int | list[str] = 1, **attrs) -> list[str]:
        outs = [self.fresh(f"{self.node}_{op}") for _ in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.fresh(f"{self.node}/{op}"), **attrs))
        return outs

    def one(self, op: str, inputs: list[str], **attrs) -> str:
        return self.add(op, inputs, 1, **attrs)[0]

    def fail(self, why: str) -> ExportError:
        return ExportError(f"cannot export {self.graph.describe(self.node)} to ONNX: {why}")

    def run(self) -> onnx.ModelProto:
        g = self.graph
        inputs = []
        for name in g.inputs:
            t = g.nodes[name]["out_types"][0]
            self.names[(name, 0)] = name
            inputs.append(helper.make_tensor_value_info(name, _ELEM[t.dtype], list(t.shape)))
        for node in g.topo_order():
            data = g.nodes[node]
            if data["op"] == "input":
                continue
            self.node = node
            exporter = EXPORTERS.get(data["op"])
            if exporter is None:
                raise self.fail("no ONNX mapping for this op")
            xs = [self.names[(v.node, v.index)] for v in g.operands(node)]
            outs = exporter(self, xs, data["attrs"], data["params"])
            for i, name in enumerate(outs if isinstance(outs, (list, tuple)) else [outs]):
                self.names[(node, i)] = name
        outputs = []
        for i, value in enumerate(g.output_values()):
            t = g.value_type(value)
            name = f"output_{i}"
            self.nodes.append(helper.make_node("Identity", [self.names[(value.node, value.index)]], [name]))
            outputs.append(helper.make_tensor_value_info(name, _ELEM[t.dtype], list(t.shape)))
        model = helper.make_model(helper.make_graph(self.nodes, g.name, inputs, outputs, self.initializers),
                                  opset_imports=[helper.make_opsetid("", OPSET)], producer_name="passes")
        onnx.checker.check_model(model)
        return model


Exporter = Callable[[_Exporter, list[str], dict, dict], object]
EXPORTERS: dict[str, Exporter] = {}


def exports(*ops: str):
    def register(fn: Exporter) -> Exporter:
        for op in ops:
            EXPORTERS[op] = fn
        return fn
    return register


def _activation(ex: _Exporter, x: str, name: str, params: tuple) -> str:
    if name == "none":
        return x
    if name in ("relu", "sigmoid", "tanh"):
        return ex.one(name.capitalize(), [x])
    if name == "relu6":
        return ex.one("Clip", [x, ex.const(np.float32(0)), ex.const(np.float32(6))])
    if name == "clamp":
        lo, hi = params
        return ex.one("Clip", [x, "" if math.isinf(lo) else ex.const(np.float32(lo)),
                               "" if math.isinf(hi) else ex.const(np.float32(hi))])
    if name == "leaky_relu":
        return ex.one("LeakyRelu", [x], alpha=float(params[0]))
    if name == "elu":
        return ex.one("Elu", [x], alpha=float(params[0]))
    if name == "hardswish":
        return ex.one("HardSwish", [x])
    if name == "hardsigmoid":
        return ex.one("HardSigmoid", [x], alpha=1 / 6, beta=0.5)
    if name == "silu":
        return ex.one("Mul", [x, ex.one("Sigmoid", [x])])
    if name == "mish":
        return ex.one("Mul", [x, ex.one("Tanh", [ex.one("Softplus", [x])])])
    if name == "gelu":  # 0.5 x (1 + erf(x / sqrt 2))
        erf = ex.one("Erf", [ex.one("Mul", [x, ex.const(np.float32(1 / math.sqrt(2)))])])
        return ex.one("Mul", [ex.one("Mul", [x, ex.const(np.float32(0.5))]),
                              ex.one("Add", [erf, ex.const(np.float32(1))])])
    if name == "gelu_tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = ex.one("Mul", [ex.one("Mul", [x, x]), x])
        inner = ex.one("Mul", [ex.one("Add", [x, ex.one("Mul", [cube, ex.const(np.float32(0.044715))])]),
                               ex.const(np.float32(math.sqrt(2 / math.pi)))])
        return ex.one("Mul", [ex.one("Mul", [x, ex.const(np.float32(0.5))]),
                              ex.one("Add", [ex.one("Tanh", [inner]), ex.const(np.float32(1))])])
    raise ex.fail(f"activation {name!r}")


def _bias(params: dict) -> np.ndarray:
    """The bias in the weight's dtype: ONNX's Conv/Gemm take one type (mixed-precision keeps our biases float32)."""
    return np.asarray(params["bias"]).astype(np.asarray(params["weight"]).dtype)


def _conv_node(ex: _Exporter, x: str, attrs: dict, params: dict, op: str = "Conv") -> str:
    inputs = [x, ex.const(params["weight"], "weight")]
    if "bias" in params:
        inputs.append(ex.const(_bias(params), "bias"))
    nd = len(attrs["stride"])
    extra = {"output_padding": list(attrs["output_padding"])} if op == "ConvTranspose" else {}
    return ex.one(op, inputs, strides=list(attrs["stride"]), pads=list(attrs["padding"]) * 2,
                  dilations=list(attrs["dilation"]), group=int(attrs["groups"]),
                  kernel_shape=list(np.shape(params["weight"])[2:2 + nd]), **extra)


@exports("layout_transform")
def _layout_transform(ex, xs, a, p):
    """ONNX tensors are logical (NCHW): a memory layout chosen by alter-layout exports as nothing, and
    ``conv2d_nchwc`` as the plain Conv below."""
    return xs[0]


@exports("conv1d", "conv2d", "conv2d_nchwc")
def _conv(ex, xs, a, p):
    x, residual, scale = conv_operands(xs, a)
    if scale is not None:  # fold-channel-scale: x * s per input channel (s: N, C, 1, 1)
        x = ex.one("Mul", [x, scale])
    y = _conv_node(ex, x, a, p)
    if residual is not None:  # residual operand (fuse-conv-add)
        y = ex.one("Add", [y, residual])
    return _activation(ex, y, a["activation"], a["activation_params"])


@exports("conv_transpose1d", "conv_transpose2d")
def _conv_transpose(ex, xs, a, p):
    return _conv_node(ex, xs[0], a, p, "ConvTranspose")


@exports("conv2d_expand_dw")
def _conv_expand_dw(ex, xs, a, p):
    """fuse-expand-depthwise's op: its two convs again (1x1, then depthwise), each with its activation."""
    y = xs[0]
    for attrs, params in expand_dw_convs(a, p):
        y = _activation(ex, _conv_node(ex, y, attrs, params), attrs["activation"], attrs["activation_params"])
    return y


@exports("conv2d_pool")
def _conv_pool(ex, xs, a, p):
    y = _activation(ex, _conv_node(ex, xs[0], a, p), a["activation"], a["activation_params"])
    pool = "MaxPool" if a["pool"] == "max" else "AveragePool"
    return ex.one(pool, [y], kernel_shape=list(a["pool_kernel"]), strides=list(a["pool_stride"]),
                  pads=list(a["pool_padding"]) * 2, ceil_mode=int(a["pool_ceil_mode"]))


@exports("batch_norm")
def _batch_norm(ex, xs, a, p):
    c = len(p["running_mean"])
    return ex.one("BatchNormalization", [xs[0], ex.const(p.get("weight", np.ones(c, np.float32))),
                                         ex.const(p.get("bias", np.zeros(c, np.float32))),
                                         ex.const(p["running_mean"]), ex.const(p["running_var"])],
                  epsilon=float(a["eps"]))


@exports("linear")
def _linear(ex, xs, a, p):
    rank = ex.graph.value_type(ex.graph.operands(ex.node)[0]).rank
    if rank == 2:
        inputs = [xs[0], ex.const(p["weight"], "weight")] + ([ex.const(_bias(p), "bias")] if "bias" in p else [])
        y = ex.one("Gemm", inputs, transB=1)
    else:
        y = ex.one("MatMul", [xs[0], ex.const(np.ascontiguousarray(p["weight"].T), "weight_t")])
        if "bias" in p:
            y = ex.one("Add", [y, ex.const(_bias(p), "bias")])
    return _activation(ex, y, a["activation"], a["activation_params"])


_SIMPLE = {"matmul": "MatMul", "add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "maximum": "Max",
           "minimum": "Min", "exp": "Exp", "sqrt": "Sqrt", "neg": "Neg", "abs": "Abs", "erf": "Erf",
           "dropout": "Identity", "identity": "Identity"}


@exports(*_SIMPLE)
def _simple(ex, xs, a, p):
    return ex.one(_SIMPLE[ex.graph.nodes[ex.node]["op"]], xs)


@exports("relu", "relu6", "leaky_relu", "elu", "gelu", "silu", "mish", "sigmoid", "tanh", "hardswish",
         "hardsigmoid", "clamp")
def _activation_op(ex, xs, a, p):
    from passes.ir.ops import activation_of

    name, params = activation_of(ex.graph.nodes[ex.node]["op"], a)
    return _activation(ex, xs[0], name, params)


@exports("softmax", "log_softmax")
def _softmax(ex, xs, a, p):
    return ex.one("Softmax" if ex.graph.nodes[ex.node]["op"] == "softmax" else "LogSoftmax", xs, axis=a["dim"])


@exports("cast")
def _cast(ex, xs, a, p):
    return ex.one("Cast", xs, to=_ELEM[a["dtype"]])


@exports("constant")
def _constant(ex, xs, a, p):
    return ex.const(p["value"], ex.node)


@exports("max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d")
def _pool(ex, xs, a, p):
    op = ex.graph.nodes[ex.node]["op"]
    attrs = {"kernel_shape": list(a["kernel_size"]), "strides": list(a["stride"]),
             "pads": list(a["padding"]) * 2, "ceil_mode": int(a["ceil_mode"])}
    if op.startswith("max"):
        return ex.one("MaxPool", xs, dilations=list(a["dilation"]), **attrs)
    return ex.one("AveragePool", xs, count_include_pad=int(a["count_include_pad"]), **attrs)


@exports("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d")
def _adaptive(ex, xs, a, p):
    kind = "Average" if "avg" in ex.graph.nodes[ex.node]["op"] else "Max"
    out = a["output_size"]
    spatial = ex.graph.value_type(ex.graph.operands(ex.node)[0]).shape[2:]
    if all(o == 1 for o in out):
        return ex.one(f"Global{kind}Pool", xs)
    if any(s % o for s, o in zip(spatial, out)):
        raise ex.fail(f"adaptive pooling {spatial} -> {out} with uneven windows")
    kernel = [s // o for s, o in zip(spatial, out)]
    return ex.one(f"{kind}Pool" if kind == "Max" else "AveragePool", xs, kernel_shape=kernel, strides=kernel)


@exports("reshape", "flatten")
def _reshape(ex, xs, a, p):
    shape = ex.graph.nodes[ex.node]["out_types"][0].shape
    return ex.one("Reshape", [xs[0], ex.const(np.array(shape, np.int64), "shape")])


@exports("permute")
def _permute(ex, xs, a, p):
    return ex.one("Transpose", xs, perm=list(a["dims"]))


@exports("concat")
def _concat(ex, xs, a, p):
    return ex.one("Concat", xs, axis=a["dim"])


@exports("stack")
def _stack(ex, xs, a, p):
    axes = ex.const(np.array([a["dim"]], np.int64), "axes")
    return ex.one("Concat", [ex.one("Unsqueeze", [x, axes]) for x in xs], axis=a["dim"])


@exports("split")
def _split(ex, xs, a, p):
    sizes = ex.const(np.array(a["split_sizes"], np.int64), "split")
    return ex.add("Split", [xs[0], sizes], len(a["split_sizes"]), axis=a["dim"])


@exports("slice")
def _slice(ex, xs, a, p):
    c = lambda v: ex.const(np.array([v], np.int64))  # noqa: E731
    return ex.one("Slice", [xs[0], c(a["start"]), c(a["end"]), c(a["dim"]), c(a["step"])])


@exports("select")
def _select(ex, xs, a, p):
    return ex.one("Gather", [xs[0], ex.const(np.array(a["index"], np.int64))], axis=a["dim"])


@exports("quantize", "dequantize")
def _quantization(ex, xs, a, p):
    op = "QuantizeLinear" if ex.graph.nodes[ex.node]["op"] == "quantize" else "DequantizeLinear"
    zero_dtype = a["dtype"] if op == "QuantizeLinear" else str(np.asarray(p["zero_point"]).dtype)
    extra = {} if a["axis"] is None else {"axis": int(a["axis"])}
    return ex.one(op, [xs[0], ex.const(np.asarray(p["scale"], np.float32), "scale"),
                       ex.const(np.asarray(p["zero_point"]).astype(zero_dtype), "zero_point")], **extra)


@exports("gather")
def _gather(ex, xs, a, p):
    return ex.one("Gather", [xs[0], ex.const(p["indices"])], axis=a["dim"])


@exports("pad")
def _pad(ex, xs, a, p):
    rank = ex.graph.value_type(ex.graph.operands(ex.node)[0]).rank
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(a["pad"]) // 2):
        begins[rank - 1 - i], ends[rank - 1 - i] = a["pad"][2 * i], a["pad"][2 * i + 1]
    mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}.get(a["mode"])
    if mode is None:
        raise ex.fail(f"pad mode {a['mode']!r} (ONNX opset {OPSET} has no circular padding)")
    return ex.one("Pad", [xs[0], ex.const(np.array(begins + ends, np.int64)), ex.const(np.float32(a["value"]))],
                  mode=mode)


@exports("mean", "amax")
def _reduce_attr(ex, xs, a, p):
    op = "ReduceMean" if ex.graph.nodes[ex.node]["op"] == "mean" else "ReduceMax"
    return ex.one(op, xs, axes=list(a["dim"]), keepdims=int(a["keepdim"]))


@exports("sum")
def _reduce_sum(ex, xs, a, p):
    return ex.one("ReduceSum", [xs[0], ex.const(np.array(a["dim"], np.int64))], keepdims=int(a["keepdim"]))


@exports("embedding")
def _embedding(ex, xs, a, p):
    return ex.one("Gather", [ex.const(p["weight"], "table"), xs[0]], axis=0)


@exports("lrn")
def _lrn(ex, xs, a, p):
    return ex.one("LRN", xs, size=int(a["size"]), alpha=float(a["alpha"]), beta=float(a["beta"]), bias=float(a["k"]))


def _affine(ex: _Exporter, name: str, p: dict, shape: tuple[int, ...], fill: float) -> str:
    return ex.const(np.reshape(p.get(name, np.full(shape, fill, np.float32)), shape).astype(np.float32), name)


@exports("layer_norm")
def _layer_norm(ex, xs, a, p):
    shape = tuple(a["normalized_shape"])
    scale, bias = _affine(ex, "weight", p, shape, 1.0), _affine(ex, "bias", p, shape, 0.0)
    return ex.one("LayerNormalization", [xs[0], scale, bias], axis=-len(shape), epsilon=float(a["eps"]))


@exports("group_norm")
def _group_norm(ex, xs, a, p):
    """Opset 17 has no GroupNormalization: InstanceNormalization over (N, groups, rest), then the channel affine."""
    shape = ex.graph.value_type(ex.graph.operands(ex.node)[0]).shape
    groups = a["num_groups"]
    grouped = ex.one("Reshape", [xs[0], ex.const(np.array([shape[0], groups, -1], np.int64))])
    normed = ex.one("InstanceNormalization", [grouped, ex.const(np.ones(groups, np.float32)),
                                              ex.const(np.zeros(groups, np.float32))], epsilon=float(a["eps"]))
    y = ex.one("Reshape", [normed, ex.const(np.array(shape, np.int64))])
    channel = (shape[1],) + (1,) * (len(shape) - 2)
    y = ex.one("Mul", [y, _affine(ex, "weight", p, channel, 1.0)])
    return ex.one("Add", [y, _affine(ex, "bias", p, channel, 0.0)])


# torch mode -> ONNX Resize (mode, coordinate_transformation_mode, nearest_mode); see the op's coordinate maps
_RESIZE = {"nearest": ("nearest", "asymmetric", "floor"),
           "nearest-exact": ("nearest", "half_pixel", "round_prefer_ceil"),
           "bilinear": ("linear", "pytorch_half_pixel", "floor")}


@exports("interpolate")
def _interpolate(ex, xs, a, p):
    """Resize by ``scales`` when the model gave a scale_factor (ONNX maps coordinates with it, as torch does),
    else by ``sizes``."""
    mode, coords, nearest = _RESIZE[a["mode"]]
    if a["mode"] == "bilinear" and a["align_corners"]:
        coords = "align_corners"
    shape = ex.graph.value_type(ex.graph.operands(ex.node)[0]).shape
    if a["scale_factor"] is not None:
        scales = ex.const(np.array((1.0, 1.0) + tuple(a["scale_factor"]), np.float32), "scales")
        inputs = [xs[0], "", scales]
    else:
        inputs = [xs[0], "", "", ex.const(np.array(shape[:2] + tuple(a["size"]), np.int64), "sizes")]
    return ex.one("Resize", inputs, mode=mode, coordinate_transformation_mode=coords, nearest_mode=nearest)


_TO_ONNX_GATES = {"lstm": [0, 3, 1, 2], "gru": [1, 0, 2], "rnn": [0]}  # torch ifgo -> iofg(c); rzn -> zrn


@exports("lstm", "gru", "rnn")
def _recurrent(ex, xs, a, p):
    kind = ex.graph.nodes[ex.node]["op"]
    hidden, layers = a["hidden_size"], a["num_layers"]
    dirs = 2 if a["bidirectional"] else 1
    gates = len(_TO_ONNX_GATES[kind])
    order = np.concatenate([np.arange(g * hidden, (g + 1) * hidden) for g in _TO_ONNX_GATES[kind]])
    x = ex.one("Transpose", [xs[0]], perm=[1, 0, 2]) if a["batch_first"] else xs[0]
    steps_batch = ex.graph.value_type(ex.graph.operands(ex.node)[0]).shape[:2]
    steps, batch = steps_batch[::-1] if a["batch_first"] else steps_batch
    hs, cs = [], []
    for layer in range(layers):
        suffixes = [f"_l{layer}" + ("_reverse" if d else "") for d in range(dirs)]
        zeros = np.zeros(gates * hidden, np.float32)
        w = np.stack([p["weight_ih" + s][order] for s in suffixes])
        r = np.stack([p["weight_hh" + s][order] for s in suffixes])
        b = np.stack([np.concatenate([p.get("bias_ih" + s, zeros)[order], p.get("bias_hh" + s, zeros)[order]])
                      for s in suffixes])
        inputs = [x, ex.const(w, "W"), ex.const(r, "R"), ex.const(b, "B"), ""]
        for slot in (1, 2)[: 2 if kind == "lstm" else 1]:
            if len(xs) > slot:
                start = ex.const(np.array([layer * dirs], np.int64))
                end = ex.const(np.array([(layer + 1) * dirs], np.int64))
                inputs.append(ex.one("Slice", [xs[slot], start, end, ex.const(np.array([0], np.int64))]))
            else:
                inputs.append("")
        while inputs and inputs[-1] == "":
            inputs.pop()
        attrs = {"hidden_size": hidden, "direction": "bidirectional" if dirs == 2 else "forward"}
        if kind == "gru":
            attrs["linear_before_reset"] = 1
        if kind == "rnn":
            act = "Relu" if a.get("nonlinearity") == "relu" else "Tanh"
            attrs["activations"] = [act] * dirs
        outs = ex.add(kind.upper(), inputs, 3 if kind == "lstm" else 2, **attrs)
        # ONNX Y (T, D, B, H) -> (T, B, D*H), the next layer's input
        y = ex.one("Transpose", [outs[0]], perm=[0, 2, 1, 3])
        x = ex.one("Reshape", [y, ex.const(np.array([steps, batch, dirs * hidden], np.int64))])
        hs.append(outs[1])
        if kind == "lstm":
            cs.append(outs[2])
    y = ex.one("Transpose", [x], perm=[1, 0, 2]) if a["batch_first"] else x
    h = hs[0] if layers == 1 else ex.one("Concat", hs, axis=0)
    if kind != "lstm":
        return [y, h]
    return [y, h, cs[0] if layers == 1 else ex.one("Concat", cs, axis=0)]


def to_onnx(graph: Graph) -> onnx.ModelProto:
    """The graph as a checked ONNX model (opset 17)."""
    for node, data in graph.nodes(data=True):
        if data["op"] != "cast" and any(t.dtype == "bfloat16" for t in data["out_types"]):
            raise ExportError(f"{graph.describe(node)} computes in bfloat16, which ONNX opset {OPSET} types only "
                              "for casts (export the float32 or float16 graph instead)")
    return _Exporter(graph).run()


def export_onnx(graph: Graph, path: str | os.PathLike) -> Path:
    """Write ``graph`` as an ONNX file, atomically (a temporary file renamed at the end)."""
    path = Path(path)
    model = to_onnx(graph)
    tmp = path.with_name(path.name + ".partial")
    onnx.save_model(model, str(tmp))
    tmp.replace(path)
    return path
