"""Lower IR graphs to a Relax ``IRModule`` through ``relax.BlockBuilder``, one lowering per op.

We build Relax ourselves (rather than through TVM's torch/ONNX importers) so every op of ``passes.ir.ops`` has
exactly our semantics, RNNs of any depth and direction lower, and fused or quantized ops introduced by passes
have a place to go. Params become ``relax.const``s, folded into the executable at build time; weights are laid
out for the kernel once, here (e.g. ``linear`` keeps ``W^T`` so the kernel is a plain ``matmul``).

The generated function ``main`` takes the graph inputs in order and returns a flat tuple of the graph outputs
(depth-first order of ``graph.outputs``); ``CompiledModule`` rebuilds the structure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax import op as R

from backends.tvm.kernels import ConvSpec, DenseSpec, conv_kernel, dense_kernel, dense_spec, supports
from backends.tvm.qdynamic import DEPTH, dense_layout, dynamic_dense_kernel, pack_int8
from backends.tvm.qkernels import (
    QConvSpec,
    depthwise_kernel,
    integer_max_pool2d_kernel,
    pack_depthwise_weight,
    qconv_kernel,
)
from backends.tvm.recurrent import (
    GATES,
    integer_layout,
    integer_recurrent_kernel,
    pack_integer_weights,
    recurrent_kernel,
)
from passes.ir.graph import Graph, IRError, TensorType, Value
from passes.ir.ops import activation_of

FLOAT_MAX = 3.4028234663852886e38


class LoweringError(IRError):
    """An op, or an op configuration, that this backend cannot lower; names the node and its origin."""


@dataclass
class LowerContext:
    """What a lowering sees: the block builder, the graph and the node being lowered."""

    bb: relax.BlockBuilder
    graph: Graph
    node: str
    target_kind: str = "llvm"
    cores: int = 1
    tiles: Mapping[Any, Any] = field(default_factory=dict)  # kernel spec -> tuned Tile (backends.tvm.tune)
    vnni: bool = False  # the CPU target has AVX-512 VNNI (integer kernels use vpdpbusd)
    nhwc: frozenset = frozenset()  # values held NHWC between our integer conv kernels (``nhwc_values``)

    @property
    def data(self) -> dict:
        return self.graph.nodes[self.node]

    @property
    def attrs(self) -> dict:
        return self.data["attrs"]

    @property
    def params(self) -> dict:
        return self.data["params"]

    def out_type(self, index: int = 0) -> TensorType:
        return self.data["out_types"][index]

    def in_type(self, slot: int) -> TensorType:
        return self.graph.value_type(self.graph.operands(self.node)[slot])

    def emit(self, expr: relax.Expr) -> relax.Var:
        return self.bb.emit(expr)

    def const(self, array: Any, dtype: str | None = None) -> relax.Constant:
        array = np.asarray(array).astype(dtype) if dtype else np.asarray(array)
        return relax.const(array, str(array.dtype))  # explicit: relax.const narrows int64 data otherwise

    def scalar(self, value: float, like: relax.Expr | None = None) -> relax.Constant:
        """A 0-d constant of ``like``'s dtype (float32 without it): Relax binary ops need equal dtypes, so a
        constant next to a bfloat16/float16 operand must be one too."""
        return relax.const(float(value), "float32" if like is None else str(like.ty.dtype))

    def fail(self, why: str) -> LoweringError:
        return LoweringError(f"TVM backend cannot lower {self.graph.describe(self.node)}: {why}")


Lowering = Callable[[LowerContext, list[relax.Expr]], Any]
LOWERINGS: dict[str, Lowering] = {}


def lowering(*ops: str):
    def register(fn: Lowering) -> Lowering:
        for op in ops:
            LOWERINGS[op] = fn
        return fn
    return register


def static_shape(expr: relax.Expr) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.ty.shape)


def _channel_bias(ctx: LowerContext, y: relax.Expr, bias: np.ndarray | None, rank: int) -> relax.Expr:
    if bias is None:
        return y
    return ctx.emit(R.add(y, ctx.const(np.reshape(bias, (1, -1) + (1,) * (rank - 2)))))


# ------------------------------------------------------------------------------------------------ layers
@lowering("constant")
def _constant(ctx, xs):
    return ctx.const(ctx.params["value"])


def conv_spec_of(graph: Graph, node: str) -> ConvSpec:
    """The kernel spec of a conv2d / conv2d_pool node (also what the tuner tunes, so the keys agree)."""
    d = graph.nodes[node]
    a, p = d["attrs"], d["params"]
    operands = graph.operands(node)
    return ConvSpec(in_shape=graph.value_type(operands[0]).shape, weight_shape=tuple(p["weight"].shape),
                    stride=a["stride"], padding=a["padding"], dilation=a["dilation"], groups=a["groups"],
                    has_bias="bias" in p, activation=a["activation"], activation_params=tuple(a["activation_params"]),
                    residual=len(operands) > 1, pool=a.get("pool"), pool_kernel=a.get("pool_kernel", (1, 1)),
                    pool_stride=a.get("pool_stride", (1, 1)), dtype=graph.value_type(operands[0]).dtype)


KERNEL_DTYPES = ("float32", "bfloat16", "float16")  # our kernels store these and accumulate in fp32


def _kernel_dtype(graph: Graph, node: str) -> bool:
    """The node's float operands and params all have one dtype our kernels take (mixed-precision graphs)."""
    d = graph.nodes[node]
    dtypes = {graph.value_type(v).dtype for v in graph.operands(node)}
    dtypes |= {str(p.dtype) for k, p in d["params"].items() if k in ("weight", "bias")}
    return len(dtypes) == 1 and dtypes.pop() in KERNEL_DTYPES


def uses_conv_kernel(graph: Graph, node: str, target_kind: str) -> ConvSpec | None:
    """The spec when ``node`` lowers to our conv kernel on ``target_kind`` (CPU conv2d, any conv2d_pool)."""
    d = graph.nodes[node]
    if d["op"] not in ("conv2d", "conv2d_pool") or not _kernel_dtype(graph, node):
        return None
    if d["op"] == "conv2d" and target_kind != "llvm":
        return None
    spec = conv_spec_of(graph, node)
    return spec if supports(spec) else None


def uses_dense_kernel(graph: Graph, node: str, target_kind: str) -> DenseSpec | None:
    """The spec when a ``linear`` node lowers to our dense kernel on ``target_kind`` (CPU; the tuner asks too)."""
    d = graph.nodes[node]
    if d["op"] != "linear" or target_kind != "llvm" or not _kernel_dtype(graph, node):
        return None
    x = graph.value_type(graph.operands(node)[0])
    return dense_spec(x.shape, d["params"]["weight"].shape, "bias" in d["params"], d["attrs"]["activation"],
                      d["attrs"]["activation_params"], x.dtype)


def call_conv_kernel(ctx: LowerContext, x: relax.Expr, spec: ConvSpec, residual: relax.Expr | None = None
                     ) -> relax.Expr:
    """``call_tir`` of our scheduled conv kernel, weights and bias as constants."""
    name = ("conv2d_pool_" if spec.pool else "conv2d_") + ctx.node
    func = conv_kernel(spec, ctx.target_kind, ctx.tiles.get(spec)).with_attr("global_symbol", name)
    gv = ctx.bb.add_func(func, name)
    args = [x, ctx.const(spec.pack_weight(ctx.params["weight"]), spec.dtype)]
    if spec.has_bias:
        args.append(ctx.const(ctx.params["bias"], spec.dtype))
    if residual is not None:
        args.append(residual)
    return ctx.emit(R.call_tir(gv, relax.Tuple(args), out_ty=relax.TensorType(spec.out_shape, spec.dtype)))


@lowering("conv2d_pool")
def _conv2d_pool(ctx, xs):
    """Always our single fused kernel: the point of the op is that the conv output is never materialized."""
    spec = conv_spec_of(ctx.graph, ctx.node)
    if not supports(spec):
        raise ctx.fail(f"no fused kernel for activation {spec.activation!r} / pool {spec.pool!r}")
    return call_conv_kernel(ctx, xs[0], spec)


@lowering("conv1d", "conv2d")
def _conv(ctx, xs):
    a, p = ctx.attrs, ctx.params
    nd = len(a["stride"])
    spec = uses_conv_kernel(ctx.graph, ctx.node, ctx.target_kind) if nd == 2 else None
    if spec is not None:
        return call_conv_kernel(ctx, xs[0], spec, xs[1] if len(xs) > 1 else None)
    conv = R.nn.conv1d if nd == 1 else R.nn.conv2d
    padding = tuple(a["padding"]) * 2  # (lo..., hi...) symmetric
    y = ctx.emit(conv(xs[0], ctx.const(p["weight"]), strides=a["stride"], padding=padding,
                      dilation=a["dilation"], groups=a["groups"]))
    y = _channel_bias(ctx, y, p.get("bias"), nd + 2)
    if len(xs) > 1:  # residual operand (fuse-conv-add)
        y = ctx.emit(R.add(y, xs[1]))
    return apply_activation(ctx, y)


@lowering("conv_transpose1d", "conv_transpose2d")
def _conv_transpose(ctx, xs):
    a, p = ctx.attrs, ctx.params
    nd = len(a["stride"])
    convt = R.nn.conv1d_transpose if nd == 1 else R.nn.conv2d_transpose
    y = ctx.emit(convt(xs[0], ctx.const(p["weight"]), strides=a["stride"], padding=tuple(a["padding"]) * 2,
                       output_padding=a["output_padding"], dilation=a["dilation"], groups=a["groups"]))
    return _channel_bias(ctx, y, p.get("bias"), nd + 2)


@lowering("batch_norm")
def _batch_norm(ctx, xs):
    """Inference batch norm is an affine map per channel: y = x * s + t, s = w / sqrt(var + eps), t = b - mean*s."""
    p = ctx.params
    var = p["running_var"].astype(np.float64)
    weight = p.get("weight", np.ones_like(var))
    bias = p.get("bias", np.zeros_like(var))
    scale = weight / np.sqrt(var + ctx.attrs["eps"])
    shift = bias - p["running_mean"] * scale
    shape = (1, -1) + (1,) * (ctx.in_type(0).rank - 2)
    y = ctx.emit(R.multiply(xs[0], ctx.const(scale.reshape(shape), "float32")))
    return ctx.emit(R.add(y, ctx.const(shift.reshape(shape), "float32")))


def call_dense_kernel(ctx: LowerContext, x: relax.Expr, in_shape: tuple[int, ...], weight: np.ndarray,
                      bias: np.ndarray | None, activation: str = "none", activation_params: tuple = (),
                      dtype: str = "float32") -> relax.Expr:
    """``act(x W^T + b)`` through our dense kernel; leading dims of ``x`` are flattened into rows."""
    spec = dense_spec(in_shape, weight.shape, bias is not None, activation, activation_params, dtype)
    m, k, n = spec.m, spec.k, spec.n
    name = f"dense_{ctx.node}_{len(ctx.bb.get().functions)}"
    func = dense_kernel(spec, ctx.cores, ctx.tiles.get(spec)).with_attr("global_symbol", name)
    gv = ctx.bb.add_func(func, name)
    args = [ctx.emit(R.reshape(x, (m, k))), ctx.const(np.ascontiguousarray(weight.T), dtype)]
    if bias is not None:
        args.append(ctx.const(bias, dtype))
    y = ctx.emit(R.call_tir(gv, relax.Tuple(args), out_ty=relax.TensorType((m, n), dtype)))
    return ctx.emit(R.reshape(y, (*in_shape[:-1], n)))


@lowering("lrn")
def _lrn(ctx, xs):
    """x / (k + alpha/size * sum of x^2 over a channel window of ``size``)^beta, the window sum as an avg pool."""
    a = ctx.attrs
    shape = ctx.in_type(0).shape
    n, c, spatial = shape[0], shape[1], int(np.prod(shape[2:]))
    square = ctx.emit(R.reshape(R.multiply(xs[0], xs[0]), (n, 1, c, spatial)))
    padded = ctx.emit(R.nn.pad(square, [0, 0, 0, 0, a["size"] // 2, (a["size"] - 1) // 2, 0, 0]))
    window = ctx.emit(R.nn.avg_pool2d(padded, pool_size=(a["size"], 1), strides=(1, 1), count_include_pad=True))
    scale = ctx.emit(R.add(ctx.scalar(a["k"], xs[0]), R.multiply(ctx.scalar(a["alpha"], xs[0]),
                                                                 R.reshape(window, shape))))
    return ctx.emit(R.divide(xs[0], R.power(scale, ctx.scalar(a["beta"], xs[0]))))


@lowering("linear")
def _linear(ctx, xs):
    if uses_dense_kernel(ctx.graph, ctx.node, ctx.target_kind) is not None:
        return call_dense_kernel(ctx, xs[0], ctx.in_type(0).shape, ctx.params["weight"], ctx.params.get("bias"),
                                 ctx.attrs["activation"], ctx.attrs["activation_params"], ctx.in_type(0).dtype)
    weight_t = np.ascontiguousarray(ctx.params["weight"].T)  # packed once: the kernel is x @ W^T
    y = ctx.emit(R.matmul(xs[0], ctx.const(weight_t)))
    bias = ctx.params.get("bias")
    return apply_activation(ctx, y if bias is None else ctx.emit(R.add(y, ctx.const(bias))))


@lowering("matmul")
def _matmul(ctx, xs):
    return ctx.emit(R.matmul(xs[0], xs[1]))


@lowering("embedding")
def _embedding(ctx, xs):
    return ctx.emit(R.take(ctx.const(ctx.params["weight"]), xs[0], axis=0))


# ------------------------------------------------------------------------------------------------ elementwise
_BINARY = {"add": R.add, "sub": R.subtract, "mul": R.multiply, "div": R.divide, "maximum": R.maximum,
           "minimum": R.minimum}


@lowering(*_BINARY)
def _binary(ctx, xs):
    return ctx.emit(_BINARY[ctx.data["op"]](xs[0], xs[1]))


def _clip(ctx, x, lo: float, hi: float):
    """min(max(x, lo), hi): when lo > hi every value becomes hi, as in torch.clamp and ONNX Clip."""
    lo, hi = max(float(lo), -FLOAT_MAX), min(float(hi), FLOAT_MAX)
    if lo <= hi:
        return ctx.emit(R.clip(x, lo, hi))
    return ctx.emit(R.minimum(R.maximum(x, ctx.scalar(lo, x)), ctx.scalar(hi, x)))


def _elu(ctx, x, alpha: float):
    """elu(x) = x if x > 0 else alpha * (exp(x) - 1)."""
    negative = R.multiply(ctx.scalar(alpha, x), R.subtract(R.exp(x), ctx.scalar(1.0, x)))
    return ctx.emit(R.where(R.greater(x, ctx.scalar(0.0, x)), x, negative))


def _mish(ctx, x):
    """mish(x) = x * tanh(softplus(x)), softplus with torch's threshold 20 (linear above it)."""
    return ctx.emit(R.multiply(x, R.tanh(R.nn.softplus(x, 1.0, 20.0))))


def _hardswish(ctx, x):
    """hardswish(x) = x * relu6(x + 3) / 6."""
    gate = _clip(ctx, ctx.emit(R.add(x, ctx.scalar(3.0, x))), 0.0, 6.0)
    return ctx.emit(R.divide(R.multiply(x, gate), ctx.scalar(6.0, x)))


def _hardsigmoid(ctx, x):
    """hardsigmoid(x) = relu6(x + 3) / 6."""
    return ctx.emit(R.divide(_clip(ctx, ctx.emit(R.add(x, ctx.scalar(3.0, x))), 0.0, 6.0), ctx.scalar(6.0, x)))


# Activation lowerings f(ctx, x, params), shared by standalone activation ops and fused conv/linear epilogues.
ACTIVATION_LOWERINGS: dict[str, Callable[[LowerContext, relax.Expr, tuple], relax.Expr]] = {
    "none": lambda ctx, x, p: x,
    "relu": lambda ctx, x, p: ctx.emit(R.nn.relu(x)),
    "relu6": lambda ctx, x, p: _clip(ctx, x, 0.0, 6.0),
    "leaky_relu": lambda ctx, x, p: ctx.emit(R.nn.leakyrelu(x, p[0])),
    "elu": lambda ctx, x, p: _elu(ctx, x, p[0]),
    "gelu": lambda ctx, x, p: ctx.emit(R.nn.gelu(x)),
    "gelu_tanh": lambda ctx, x, p: ctx.emit(R.nn.gelu_tanh(x)),
    "silu": lambda ctx, x, p: ctx.emit(R.nn.silu(x)),
    "mish": lambda ctx, x, p: _mish(ctx, x),
    "sigmoid": lambda ctx, x, p: ctx.emit(R.sigmoid(x)),
    "tanh": lambda ctx, x, p: ctx.emit(R.tanh(x)),
    "hardswish": lambda ctx, x, p: _hardswish(ctx, x),
    "hardsigmoid": lambda ctx, x, p: _hardsigmoid(ctx, x),
    "clamp": lambda ctx, x, p: _clip(ctx, x, p[0], p[1]),
}


def apply_activation(ctx: LowerContext, x: relax.Expr) -> relax.Expr:
    return ACTIVATION_LOWERINGS[ctx.attrs["activation"]](ctx, x, ctx.attrs["activation_params"])


@lowering("relu", "relu6", "leaky_relu", "elu", "gelu", "silu", "mish", "sigmoid", "tanh", "hardswish",
          "hardsigmoid", "clamp")
def _activation(ctx, xs):
    name, params = activation_of(ctx.data["op"], ctx.attrs)
    return ACTIVATION_LOWERINGS[name](ctx, xs[0], params)


_UNARY = {"exp": R.exp, "sqrt": R.sqrt, "neg": R.negative, "abs": R.abs, "erf": R.erf}


@lowering(*_UNARY)
def _unary(ctx, xs):
    return ctx.emit(_UNARY[ctx.data["op"]](xs[0]))


@lowering("softmax")
def _softmax(ctx, xs):
    return ctx.emit(R.nn.softmax(xs[0], axis=ctx.attrs["dim"]))


@lowering("log_softmax")
def _log_softmax(ctx, xs):
    return ctx.emit(R.nn.log_softmax(xs[0], axis=ctx.attrs["dim"]))


@lowering("dropout", "identity")
def _identity(ctx, xs):
    return xs[0]


@lowering("cast")
def _cast(ctx, xs):
    return ctx.emit(R.astype(xs[0], ctx.attrs["dtype"]))


# ------------------------------------------------------------------------------------------------ pools
@lowering("max_pool1d", "max_pool2d", "avg_pool1d", "avg_pool2d")
def _pool(ctx, xs):
    a = ctx.attrs
    nd = len(a["kernel_size"])
    kind = ctx.data["op"][:3]
    fn = getattr(R.nn, f"{kind}_pool{nd}d")
    kwargs = {"pool_size": a["kernel_size"], "strides": a["stride"], "padding": tuple(a["padding"]) * 2,
              "ceil_mode": a["ceil_mode"]}
    if kind == "max":
        kwargs["dilation"] = a["dilation"]
    else:
        kwargs["count_include_pad"] = a["count_include_pad"]
    dtype = ctx.in_type(0).dtype
    if kind == "max" and dtype in ("uint8", "int8") and nd == 2 and ctx.target_kind == "llvm":
        return _integer_max_pool2d(ctx, xs[0])
    if kind == "max" and dtype in ("uint8", "int8"):  # LLVM scalarizes an 8-bit max pool; in float (exact) not
        y = ctx.emit(R.astype(fn(R.astype(xs[0], "float32"), **kwargs), dtype))
    else:
        y = ctx.emit(fn(xs[0], **kwargs))
    if static_shape(y) != ctx.out_type().shape:
        raise ctx.fail(f"TVM's pooling gives shape {static_shape(y)}, torch {ctx.out_type().shape}")
    return y


def _integer_max_pool2d(ctx: LowerContext, x: relax.Expr) -> relax.Expr:
    """8-bit max pool as our vectorized kernel (``qkernels.integer_max_pool2d_kernel``)."""
    a, out = ctx.attrs, ctx.out_type()
    func = integer_max_pool2d_kernel(ctx.in_type(0).shape, out.shape, out.dtype, a["kernel_size"], a["stride"],
                                     a["padding"], a["dilation"], ctx.cores)
    name = f"max_pool2d_{ctx.node}"
    gv = ctx.bb.add_func(func.with_attr("global_symbol", name), name)
    return ctx.emit(R.call_tir(gv, relax.Tuple([x]), out_ty=relax.TensorType(out.shape, out.dtype)))


@lowering("adaptive_avg_pool1d", "adaptive_avg_pool2d")
def _adaptive_avg(ctx, xs):
    nd = len(ctx.attrs["output_size"])
    fn = R.nn.adaptive_avg_pool1d if nd == 1 else R.nn.adaptive_avg_pool2d
    return ctx.emit(fn(xs[0], output_size=ctx.attrs["output_size"]))


@lowering("adaptive_max_pool1d", "adaptive_max_pool2d")
def _adaptive_max(ctx, xs):
    """Adaptive max pooling when windows do not overlap: a global max, or a max pool of kernel = stride = in/out."""
    out = ctx.attrs["output_size"]
    spatial = ctx.in_type(0).shape[-len(out):]
    if all(o == 1 for o in out):
        axes = list(range(ctx.in_type(0).rank - len(out), ctx.in_type(0).rank))
        return ctx.emit(R.max(xs[0], axis=axes, keepdims=True))
    if any(s % o for s, o in zip(spatial, out)):
        raise ctx.fail(f"adaptive max pooling {spatial} -> {out} with uneven windows")
    kernel = tuple(s // o for s, o in zip(spatial, out))
    fn = R.nn.max_pool1d if len(out) == 1 else R.nn.max_pool2d
    return ctx.emit(fn(xs[0], pool_size=kernel, strides=kernel))


# ------------------------------------------------------------------------------------------------ data movement
@lowering("concat")
def _concat(ctx, xs):
    return ctx.emit(R.concat(xs, axis=ctx.attrs["dim"]))


@lowering("stack")
def _stack(ctx, xs):
    dim = ctx.attrs["dim"]
    return ctx.emit(R.concat([R.expand_dims(x, dim) for x in xs], axis=dim))


@lowering("split")
def _split(ctx, xs):
    indices = np.cumsum(ctx.attrs["split_sizes"])[:-1].tolist()
    parts = ctx.emit(R.split(xs[0], indices_or_sections=[int(i) for i in indices], axis=ctx.attrs["dim"]))
    return tuple(ctx.emit(relax.TupleGetItem(parts, i)) for i in range(len(ctx.attrs["split_sizes"])))


def _quant_param(ctx: LowerContext, name: str, dtype: str = "float32") -> relax.Expr:
    value = np.asarray(ctx.params[name], dtype=dtype)
    axis = ctx.attrs["axis"]
    if value.ndim == 1 and axis is not None:
        shape = [1] * ctx.in_type(0).rank
        shape[axis] = -1
        value = value.reshape(shape)
    return ctx.const(value)


@lowering("quantize")
def _quantize(ctx, xs):
    lo, hi = {"int8": (-128, 127), "uint8": (0, 255)}[ctx.attrs["dtype"]]
    q = ctx.emit(R.add(R.round(R.divide(xs[0], _quant_param(ctx, "scale"))), _quant_param(ctx, "zero_point")))
    return ctx.emit(R.astype(R.clip(q, float(lo), float(hi)), ctx.attrs["dtype"]))


@lowering("dequantize")
def _dequantize(ctx, xs):
    centered = R.subtract(R.astype(xs[0], "float32"), _quant_param(ctx, "zero_point"))
    return ctx.emit(R.multiply(centered, _quant_param(ctx, "scale")))


def _integer_spec(ctx: LowerContext) -> QConvSpec:
    """qconv2d as itself; qlinear over rows x[M, K] as a 1x1 conv on (M, K, 1, 1)."""
    a, weight = ctx.attrs, ctx.params["weight"]
    common = {"input_zero_point": a["input_zero_point"], "output_zero_point": a["output_zero_point"],
              "out_min": a["out_min"], "out_max": a["out_max"], "in_dtype": ctx.in_type(0).dtype,
              "out_dtype": a["out_dtype"], "vnni": ctx.vnni}
    if ctx.data["op"] == "qconv2d":
        operands = ctx.graph.operands(ctx.node)
        layout = lambda value: "NHWC" if value in ctx.nhwc else "NCHW"  # noqa: E731
        common |= {"in_layout": layout(operands[0]), "out_layout": layout(Value(ctx.node, 0))}
        if len(operands) > 1:
            common |= {"residual_zero_point": a["residual_zero_point"], "residual_dtype": ctx.in_type(1).dtype,
                       "residual_layout": layout(operands[1])}
        return QConvSpec(ctx.in_type(0).shape, weight.shape, a["stride"], a["padding"], a["dilation"], **common)
    rows = int(np.prod(ctx.in_type(0).shape[:-1]))
    return QConvSpec((rows, weight.shape[1], 1, 1), (*weight.shape, 1, 1), (1, 1), (0, 0), (1, 1), **common)


def _requantize(ctx: LowerContext, acc: relax.Expr, channel_axis: int, residual: relax.Expr | None = None
                ) -> relax.Expr:
    """``passes.ir.ops.requantize`` in Relax integer ops: (acc * M + 2^(shift-1) [+ (r - z_r) R]) >> shift in
    int64."""
    shape = [1] * len(ctx.out_type().shape)
    shape[channel_axis] = -1
    multiplier = ctx.const(ctx.params["multiplier"].astype(np.int64).reshape(shape))
    shift = ctx.params["shift"].astype(np.int64).reshape(shape)
    scaled = R.add(R.multiply(R.astype(acc, "int64"), multiplier), ctx.const(np.left_shift(1, shift - 1)))
    int64 = lambda value: ctx.const(np.asarray(value, np.int64))  # noqa: E731
    if residual is not None:
        centered = R.subtract(R.astype(residual, "int64"), int64(ctx.attrs["residual_zero_point"]))
        residual_multiplier = ctx.params["residual_multiplier"].astype(np.int64).reshape(shape)
        scaled = R.add(scaled, R.multiply(centered, ctx.const(residual_multiplier)))
    shifted = R.add(R.right_shift(scaled, ctx.const(shift)), int64(ctx.attrs["output_zero_point"]))
    clamped = R.minimum(R.maximum(shifted, int64(ctx.attrs["out_min"])), int64(ctx.attrs["out_max"]))
    return ctx.emit(R.astype(clamped, ctx.attrs["out_dtype"]))


def is_depthwise(graph: Graph, node: str) -> bool:
    """A ``qconv2d`` with one group per channel (groups = C = OC) and no fused residual."""
    data = graph.nodes[node]
    channels = graph.value_type(graph.operands(node)[0]).shape[1]
    return (data["op"] == "qconv2d" and data["attrs"]["groups"] == channels == data["params"]["weight"].shape[0]
            and channels > 1 and len(graph.operands(node)) == 1)


def uses_integer_kernel(graph: Graph, node: str, target_kind: str) -> bool:
    """Whether ``qconv2d``/``qlinear`` lowers to our kernels (``qkernels.py``: dense-reduction or depthwise) rather
    than Relax integer ops (other grouped convs, cuda)."""
    data = graph.nodes[node]
    return target_kind == "llvm" and (data["op"] == "qlinear" or (data["op"] == "qconv2d" and (
        data["attrs"]["groups"] == 1 or is_depthwise(graph, node))))


def nhwc_values(graph: Graph, target_kind: str) -> frozenset[Value]:
    """Integer conv outputs that only our integer conv kernels read (as input or fused residual): those stay NHWC
    in memory. The graph's semantics are NCHW; between two of our kernels NHWC is the better layout: the
    producer's epilogue stores 16 channels of a pixel as one contiguous vector, and the consumer's padding stage
    (``qkernels.qconv_compute``) copies channel vectors instead of gathering each pixel's channels across planes."""
    def reads_nhwc(user: str) -> bool:  # as its input or its fused residual
        return graph.nodes[user]["op"] == "qconv2d" and uses_integer_kernel(graph, user, target_kind)

    chosen = set()
    for node in graph.op_nodes("qconv2d"):
        value = Value(node, 0)
        users = graph.users(value)
        if (uses_integer_kernel(graph, node, target_kind) and users and not graph.is_graph_output(value)
                and all(reads_nhwc(user) for user, _ in users)):
            chosen.add(value)
    return frozenset(chosen)


@lowering("qconv2d", "qlinear")
def _integer_layer(ctx, xs):
    """uint8/int8 x int8 -> int32 -> requantized, integer arithmetic throughout. CPU, groups = 1: our kernel
    (``qkernels.py``, vpdpbusd where the CPU has VNNI); CPU depthwise: our depthwise kernel; otherwise (other
    grouped convs, cuda) Relax integer ops."""
    a, p = ctx.attrs, ctx.params
    if a["out_dtype"] not in ("uint8", "int8"):
        raise ctx.fail(f"out_dtype {a['out_dtype']!r} (the integer lowering writes uint8 or int8)")
    is_conv = ctx.data["op"] == "qconv2d"
    if uses_integer_kernel(ctx.graph, ctx.node, ctx.target_kind):
        spec = _integer_spec(ctx)
        weight = p["weight"] if is_conv else p["weight"][:, :, None, None]
        if is_depthwise(ctx.graph, ctx.node):
            func, packed = depthwise_kernel(spec, ctx.cores), pack_depthwise_weight(weight)
            name = f"qconv2d_depthwise_{ctx.node}"
        else:
            func, packed = qconv_kernel(spec, ctx.cores), spec.pack_weight(weight)
            name = f"{ctx.data['op']}_{ctx.node}"
        gv = ctx.bb.add_func(func.with_attr("global_symbol", name), name)
        x = xs[0] if is_conv else ctx.emit(R.reshape(xs[0], spec.in_shape))
        args = [x, ctx.const(packed, "int8"), ctx.const(spec.fold_bias(weight, p["bias"]), "int32"),
                ctx.const(p["multiplier"], "int32"), ctx.const(p["shift"], "int32")]
        if spec.residual_zero_point is not None:
            args += [xs[1], ctx.const(p["residual_multiplier"], "int64")]
        out_shape = spec.physical(spec.out_layout, spec.out_shape)
        y = ctx.emit(R.call_tir(gv, relax.Tuple(args), out_ty=relax.TensorType(out_shape, spec.out_dtype)))
        return y if is_conv else ctx.emit(R.reshape(y, ctx.out_type().shape))
    x = ctx.emit(R.subtract(R.astype(xs[0], "int32"), ctx.const(np.asarray(a["input_zero_point"], np.int32))))
    weight = ctx.const(p["weight"].astype(np.int32))
    if is_conv:
        acc = ctx.emit(R.nn.conv2d(x, weight, strides=a["stride"], padding=tuple(a["padding"]) * 2,
                                   dilation=a["dilation"], groups=a["groups"], out_dtype="int32"))
        acc = ctx.emit(R.add(acc, ctx.const(p["bias"].astype(np.int32).reshape(1, -1, 1, 1))))
        return _requantize(ctx, acc, channel_axis=1, residual=xs[1] if len(xs) > 1 else None)
    acc = ctx.emit(R.add(R.matmul(x, R.permute_dims(weight), out_dtype="int32"), ctx.const(p["bias"], "int32")))
    return _requantize(ctx, acc, channel_axis=len(ctx.out_type().shape) - 1)


def dynamic_dense(ctx: LowerContext, x: relax.Expr, weight: np.ndarray, weight_scale: np.ndarray,
                  bias: np.ndarray | None, name: str) -> relax.Expr:
    """``passes.ir.ops.dynamic_int8_product`` (+ bias): ``dynamic_uint8`` at run time (a min and a max over x),
    then the integer product of the uint8 rows with the int8 weights, scaled once by s_x * s_w in float. CPU: our
    kernel (``qdynamic.py``, vpdpbusd on VNNI); elsewhere an int32 Relax matmul of the centered rows. Shared by
    ``qlinear_dynamic`` and the input projection of the dynamic int8 RNNs; ``name`` names the kernel."""
    zero = ctx.scalar(0.0, x)
    low, high = ctx.emit(R.minimum(R.min(x), zero)), ctx.emit(R.maximum(R.max(x), zero))
    scale = ctx.emit(R.divide(R.subtract(high, low), ctx.scalar(255.0, x)))
    scale = ctx.emit(R.where(R.greater(scale, zero), scale, ctx.scalar(1.0, x)))
    zero_point = ctx.emit(R.clip(R.round(R.divide(R.negative(low), scale)), 0.0, 255.0))
    q = ctx.emit(R.clip(R.add(R.round(R.divide(x, scale)), zero_point), 0.0, 255.0))
    if ctx.target_kind == "llvm":
        scale_zero = ctx.emit(R.concat([R.reshape(scale, (1,)), R.reshape(zero_point, (1,))]))
        return _dynamic_dense_kernel(ctx, q, scale_zero, weight, weight_scale, bias, name)
    centered = ctx.emit(R.subtract(R.astype(q, "int32"), R.astype(zero_point, "int32")))
    weight_t = ctx.const(np.ascontiguousarray(weight.T).astype(np.int32))
    acc = ctx.emit(R.matmul(centered, weight_t, out_dtype="int32"))
    y = ctx.emit(R.multiply(R.astype(acc, "float32"), R.multiply(scale, ctx.const(weight_scale, "float32"))))
    return y if bias is None else ctx.emit(R.add(y, ctx.const(bias, "float32")))


def _dynamic_dense_kernel(ctx: LowerContext, q: relax.Expr, scale_zero: relax.Expr, weight: np.ndarray,
                          weight_scale: np.ndarray, bias: np.ndarray | None, name: str) -> relax.Expr:
    """``qdynamic.dynamic_dense_kernel`` over the rows of ``q`` (float, integer valued in 0..255: cast to uint8,
    rows zero padded to a multiple of 4); outputs padded to 16 in the kernel and sliced off after."""
    shape = static_shape(q)
    rows, (outputs, inputs) = int(np.prod(shape[:-1])), weight.shape
    _, block, padded = dense_layout(rows, outputs)
    packed, row_sums = pack_int8(weight, block)

    def pad(values, fill: float = 0.0) -> relax.Constant:
        return ctx.const(np.pad(np.asarray(values, np.float32), (0, padded - outputs), constant_values=fill))

    q = ctx.emit(R.reshape(R.astype(q, "uint8"), (rows, inputs)))
    if inputs % DEPTH:
        q = ctx.emit(R.nn.pad(q, [0, 0, 0, -inputs % DEPTH]))
    func = dynamic_dense_kernel(rows, inputs, outputs, ctx.vnni).with_attr("global_symbol", name)
    args = [q, scale_zero, ctx.const(packed, "int8"), ctx.const(row_sums, "int32"), pad(weight_scale, 1.0),
            pad(np.zeros(outputs) if bias is None else bias)]
    y = ctx.emit(R.call_tir(ctx.bb.add_func(func, name), relax.Tuple(args),
                            out_ty=relax.TensorType((rows, padded), "float32")))
    if padded != outputs:
        y = ctx.emit(R.strided_slice(y, axes=[1], begin=[0], end=[outputs]))
    return ctx.emit(R.reshape(y, (*shape[:-1], outputs)))


@lowering("qlinear_dynamic")
def _qlinear_dynamic(ctx, xs):
    p = ctx.params
    return apply_activation(ctx, dynamic_dense(ctx, xs[0], p["weight"], p["weight_scale"], p.get("bias"),
                                               f"dense_int8_{ctx.node}"))


@lowering("gather")
def _gather(ctx, xs):
    return ctx.emit(R.take(xs[0], ctx.const(ctx.params["indices"]), axis=ctx.attrs["dim"]))


@lowering("reshape", "flatten")
def _reshape(ctx, xs):
    return ctx.emit(R.reshape(xs[0], ctx.out_type().shape))


@lowering("permute")
def _permute(ctx, xs):
    return ctx.emit(R.permute_dims(xs[0], axes=list(ctx.attrs["dims"])))


@lowering("slice")
def _slice(ctx, xs):
    a = ctx.attrs
    return ctx.emit(R.strided_slice(xs[0], axes=[a["dim"]], begin=[a["start"]], end=[a["end"]],
                                    strides=[a["step"]]))


@lowering("select")
def _select(ctx, xs):
    a = ctx.attrs
    y = ctx.emit(R.strided_slice(xs[0], axes=[a["dim"]], begin=[a["index"]], end=[a["index"] + 1]))
    return ctx.emit(R.reshape(y, ctx.out_type().shape))


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


@lowering("pad")
def _pad(ctx, xs):
    a = ctx.attrs
    rank = ctx.in_type(0).rank
    pairs = [(0, 0)] * rank
    for i in range(len(a["pad"]) // 2):  # torch lists (lo, hi) from the last dim backwards
        pairs[rank - 1 - i] = (a["pad"][2 * i], a["pad"][2 * i + 1])
    if any(lo < 0 or hi < 0 for lo, hi in pairs):
        raise ctx.fail("negative padding (cropping)")
    if a["mode"] not in _PAD_MODES:
        raise ctx.fail(f"pad mode {a['mode']!r}")
    return ctx.emit(R.nn.pad(xs[0], [p for pair in pairs for p in pair], _PAD_MODES[a["mode"]], a["value"]))


_REDUCE = {"mean": R.mean, "sum": R.sum, "amax": R.max}


@lowering(*_REDUCE)
def _reduce(ctx, xs):
    return ctx.emit(_REDUCE[ctx.data["op"]](xs[0], axis=list(ctx.attrs["dim"]), keepdims=ctx.attrs["keepdim"]))


# ------------------------------------------------------------------------------------------------ recurrent
def _rnn_cell(kind: str, nonlinearity: str):
    """The recurrent update for one step, given the input projection ``xp`` (already holding b_ih)."""

    def lstm(ctx, xp, h, c, w_hh_t, b_hh):
        # gates = x W_ih^T + b_ih + h W_hh^T + b_hh, split as (i, f, g, o); c' = f*c + i*g; h' = o*tanh(c')
        gates = ctx.emit(R.add(xp, R.matmul(h, w_hh_t)))
        if b_hh is not None:
            gates = ctx.emit(R.add(gates, b_hh))
        parts = ctx.emit(R.split(gates, 4, axis=-1))
        i, f, g, o = (relax.TupleGetItem(parts, k) for k in range(4))
        c = ctx.emit(R.add(R.multiply(R.sigmoid(f), c), R.multiply(R.sigmoid(i), R.tanh(g))))
        h = ctx.emit(R.multiply(R.sigmoid(o), R.tanh(c)))
        return h, c

    def gru(ctx, xp, h, c, w_hh_t, b_hh):
        # r = s(xr + hr), z = s(xz + hz), n = tanh(xn + r * hn), h' = (1 - z) * n + z * h = n + z * (h - n)
        hp = ctx.emit(R.matmul(h, w_hh_t))
        if b_hh is not None:
            hp = ctx.emit(R.add(hp, b_hh))
        xs_, hs_ = ctx.emit(R.split(xp, 3, axis=-1)), ctx.emit(R.split(hp, 3, axis=-1))
        r = R.sigmoid(R.add(relax.TupleGetItem(xs_, 0), relax.TupleGetItem(hs_, 0)))
        z = ctx.emit(R.sigmoid(R.add(relax.TupleGetItem(xs_, 1), relax.TupleGetItem(hs_, 1))))
        n = ctx.emit(R.tanh(R.add(relax.TupleGetItem(xs_, 2), R.multiply(r, relax.TupleGetItem(hs_, 2)))))
        h = ctx.emit(R.add(n, R.multiply(z, R.subtract(h, n))))
        return h, None

    def rnn(ctx, xp, h, c, w_hh_t, b_hh):
        pre = R.add(xp, R.matmul(h, w_hh_t))
        if b_hh is not None:
            pre = R.add(pre, b_hh)
        return ctx.emit(R.tanh(pre) if nonlinearity == "tanh" else R.nn.relu(pre)), None

    return {"lstm": lstm, "gru": gru, "rnn": rnn}[kind]


@lowering("lstm", "gru", "rnn")
def _recurrent(ctx, xs):
    """Multi-layer, bidirectional RNNs, unrolled over the static sequence length.

    Per layer and direction the input projection of all time steps is ONE matmul ((T*B, I) x (I, G*H)); each
    step then adds ``h W_hh^T`` and applies the gate math. Weights are transposed once, here.
    """
    if ctx.target_kind == "llvm":
        return _recurrent_kernels(ctx, xs)
    a, p = ctx.attrs, ctx.params
    kind = ctx.data["op"]
    cell = _rnn_cell(kind, a.get("nonlinearity", "tanh"))
    hidden, layers = a["hidden_size"], a["num_layers"]
    directions = 2 if a["bidirectional"] else 1
    x = xs[0]
    if a["batch_first"]:
        x = ctx.emit(R.permute_dims(x, [1, 0, 2]))
    steps, batch = ctx.in_type(0).shape[:2][::-1] if a["batch_first"] else ctx.in_type(0).shape[:2]
    h0 = xs[1] if len(xs) > 1 else None
    c0 = xs[2] if len(xs) > 2 else None

    def initial(state, index):
        if state is None:
            return ctx.const(np.zeros((batch, hidden), np.float32))
        return ctx.emit(R.reshape(R.strided_slice(state, axes=[0], begin=[index], end=[index + 1]),
                                  (batch, hidden)))

    final_h, final_c = [], []
    for layer in range(layers):
        outputs = []
        features = ctx.emit(R.reshape(x, (steps * batch, -1)))
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            w_ih, w_hh = p["weight_ih" + suffix], p["weight_hh" + suffix]
            b_ih = p.get("bias_ih" + suffix) if a["bias"] else None
            b_hh = p.get("bias_hh" + suffix) if a["bias"] else None
            if kind == "lstm" and b_hh is not None:  # both biases add to every gate: fold them into one
                b_ih, b_hh = b_ih + b_hh, None
            xp = ctx.emit(R.matmul(features, ctx.const(np.ascontiguousarray(w_ih.T))))
            if b_ih is not None:
                xp = ctx.emit(R.add(xp, ctx.const(b_ih)))
            per_step = ctx.emit(R.split(ctx.emit(R.reshape(xp, (steps, batch, -1))), steps, axis=0))
            w_hh_t = ctx.const(np.ascontiguousarray(w_hh.T))
            b_hh_c = None if b_hh is None else ctx.const(b_hh)
            index = layer * directions + direction
            h, c = initial(h0, index), initial(c0, index)
            hs = [None] * steps
            order = range(steps - 1, -1, -1) if direction else range(steps)
            for t in order:
                xp_t = ctx.emit(R.reshape(relax.TupleGetItem(per_step, t), (batch, -1)))
                h, c = cell(ctx, xp_t, h, c, w_hh_t, b_hh_c)
                hs[t] = h
            outputs.append(ctx.emit(R.concat([R.expand_dims(h_t, 0) for h_t in hs], axis=0)))
            final_h.append(h)
            final_c.append(c)
        x = outputs[0] if directions == 1 else ctx.emit(R.concat(outputs, axis=-1))
    y = ctx.emit(R.permute_dims(x, [1, 0, 2])) if a["batch_first"] else x
    h_n = ctx.emit(R.concat([R.expand_dims(h, 0) for h in final_h], axis=0))
    if kind != "lstm":
        return y, h_n
    return y, h_n, ctx.emit(R.concat([R.expand_dims(c, 0) for c in final_c], axis=0))


def _initial_states(ctx: LowerContext, xs: list[relax.Expr], directions: int, batch: int, hidden: int):
    """``initial(slot, layer)``: the (D, B, H) slice of operand ``slot`` (h0: 1, c0: 2) for ``layer``, or zeros."""

    def initial(slot: int, layer: int) -> relax.Expr:
        if len(xs) <= slot:
            return ctx.const(np.zeros((directions, batch, hidden), np.float32))
        return ctx.emit(R.strided_slice(xs[slot], axes=[0], begin=[layer * directions],
                                        end=[(layer + 1) * directions]))

    return initial


def _layer_outputs(ctx: LowerContext, kind: str, x: relax.Expr, final_h: list, final_c: list, batch_first: bool):
    """(y, h_n[, c_n]) from the last layer's time-major output and every layer's (D, B, H) final states."""
    y = ctx.emit(R.permute_dims(x, [1, 0, 2])) if batch_first else x
    stack = lambda states: states[0] if len(states) == 1 else ctx.emit(R.concat(states, axis=0))  # noqa: E731
    return (y, stack(final_h)) if kind != "lstm" else (y, stack(final_h), stack(final_c))


def _recurrent_kernels(ctx: LowerContext, xs: list[relax.Expr]):
    """CPU: per layer, one input-projection dense kernel for both directions and one ``recurrent_kernel`` call
    (the whole time loop, directions in parallel)."""
    a, p = ctx.attrs, ctx.params
    kind = ctx.data["op"]
    hidden, layers = a["hidden_size"], a["num_layers"]
    directions = 2 if a["bidirectional"] else 1
    gates = GATES[kind] * hidden
    x = xs[0]
    if a["batch_first"]:
        x = ctx.emit(R.permute_dims(x, [1, 0, 2]))
    steps, batch = ctx.in_type(0).shape[:2][::-1] if a["batch_first"] else ctx.in_type(0).shape[:2]
    state_type = relax.TensorType((directions, batch, hidden), "float32")
    zeros = np.zeros(gates, np.float32)

    initial = _initial_states(ctx, xs, directions, batch, hidden)
    final_h, final_c = [], []
    for layer in range(layers):
        suffixes = [f"_l{layer}" + ("_reverse" if d else "") for d in range(directions)]
        w_ih = np.concatenate([p["weight_ih" + s] for s in suffixes])
        b_ih = [p.get("bias_ih" + s, zeros) if a["bias"] else zeros for s in suffixes]
        b_hh = [p.get("bias_hh" + s, zeros) if a["bias"] else zeros for s in suffixes]
        if kind != "gru":  # b_hh adds to every gate pre-activation: fold it into the projection
            b_ih, b_hh = [i + h for i, h in zip(b_ih, b_hh)], [zeros] * directions
        xp = call_dense_kernel(ctx, x, (steps, batch, w_ih.shape[1]), w_ih, np.concatenate(b_ih).astype(np.float32))
        name = f"{kind}_{ctx.node}_l{layer}"
        func = recurrent_kernel(kind, steps, batch, hidden, directions, a.get("nonlinearity", "tanh"))
        func = func.with_attrs({"global_symbol": name, "tir.is_scheduled": True, "op_pattern": 8})
        gv = ctx.bb.add_func(func, name)
        w_hh_t = np.stack([np.ascontiguousarray(p["weight_hh" + s].T) for s in suffixes])
        b_hh_rows = np.tile(np.concatenate(b_hh).reshape(1, 1, -1), (1, batch, 1))
        args = [xp, ctx.const(w_hh_t, "float32"), ctx.const(b_hh_rows, "float32"), initial(1, layer),
                initial(2, layer)]
        x, h_n, c_n = _call_recurrent_kernel(ctx, gv, args, (steps, batch, directions * hidden), state_type)
        final_h.append(h_n)
        final_c.append(c_n)
    return _layer_outputs(ctx, kind, x, final_h, final_c, a["batch_first"])


def _call_recurrent_kernel(ctx: LowerContext, gv: relax.GlobalVar, args: list, y_shape: tuple[int, ...],
                           state_type: relax.TensorType) -> tuple[relax.Expr, relax.Expr, relax.Expr]:
    """(y, h_n, c_n) of one layer's recurrent kernel call (float or integer)."""
    result = ctx.emit(R.call_tir(gv, relax.Tuple(args), out_ty=[relax.TensorType(y_shape, "float32"), state_type,
                                                                 state_type]))
    return tuple(ctx.emit(relax.TupleGetItem(result, i)) for i in range(3))


@lowering("qlstm_dynamic", "qgru_dynamic", "qrnn_dynamic")
def _dynamic_recurrent(ctx, xs):
    """CPU: per layer, the input projection of both directions as one ``dynamic_dense`` (x quantized per tensor,
    the two directions' W_ih stacked, gate rows padded to 16) and one ``integer_recurrent_kernel`` call (h
    quantized per row each step, the product in int32: vpdpbusd on VNNI CPUs)."""
    if ctx.target_kind != "llvm":
        raise ctx.fail("dynamic int8 RNNs lower for llvm (CPU) only; run quantize{mode=dynamic} for CPU targets")
    a, p = ctx.attrs, ctx.params
    kind = ctx.data["op"][1:-len("_dynamic")]
    hidden, layers = a["hidden_size"], a["num_layers"]
    directions = 2 if a["bidirectional"] else 1
    gates, (padded_gates, _, _) = GATES[kind] * hidden, integer_layout(kind, hidden)
    x = ctx.emit(R.permute_dims(xs[0], [1, 0, 2])) if a["batch_first"] else xs[0]
    steps, batch = ctx.in_type(0).shape[:2][::-1] if a["batch_first"] else ctx.in_type(0).shape[:2]
    state_type = relax.TensorType((directions, batch, hidden), "float32")

    def padded(rows: np.ndarray, fill: float = 0) -> np.ndarray:
        """Gate rows (first axis) padded to padded_gates."""
        out = np.full((padded_gates, *rows.shape[1:]), fill, rows.dtype)
        out[:gates] = rows
        return out

    initial = _initial_states(ctx, xs, directions, batch, hidden)
    zeros = np.zeros(gates, np.float32)
    final_h, final_c = [], []
    for layer in range(layers):
        suffixes = [f"_l{layer}" + ("_reverse" if d else "") for d in range(directions)]
        bias = {k: [p.get(f"bias_{k}{s}", zeros) if a["bias"] else zeros for s in suffixes] for k in ("ih", "hh")}
        xp = dynamic_dense(ctx, x, np.concatenate([padded(p["weight_ih" + s]) for s in suffixes]),
                           np.concatenate([padded(p["scale_ih" + s], 1) for s in suffixes]),
                           np.concatenate([padded(b) for b in bias["ih"]]).astype(np.float32),
                           f"dense_int8_{ctx.node}_l{layer}")
        name = f"{kind}_int8_{ctx.node}_l{layer}"
        func = integer_recurrent_kernel(kind, steps, batch, hidden, directions, a.get("nonlinearity", "tanh"),
                                        ctx.vnni)
        gv = ctx.bb.add_func(func.with_attrs({"global_symbol": name, "tir.is_scheduled": True, "op_pattern": 8}),
                             name)
        packed, row_sums = pack_integer_weights(kind, [p["weight_hh" + s] for s in suffixes])
        args = [xp, ctx.const(packed, "int8"), ctx.const(row_sums, "int32"),
                ctx.const(np.stack([padded(p["scale_hh" + s], 1) for s in suffixes]), "float32"),
                ctx.const(np.stack([padded(b) for b in bias["hh"]]), "float32"), initial(1, layer), initial(2, layer)]
        x, h_n, c_n = _call_recurrent_kernel(ctx, gv, args, (steps, batch, directions * hidden), state_type)
        final_h.append(h_n)
        final_c.append(c_n)
    return _layer_outputs(ctx, kind, x, final_h, final_c, a["batch_first"])


# ------------------------------------------------------------------------------------------------ driver
def missing_lowerings(graph: Graph) -> list[str]:
    return sorted({f"{graph.describe(n)}" for n, d in graph.nodes(data=True)
                   if d["op"] != "input" and d["op"] not in LOWERINGS})


def lower_graph(graph: Graph, target_kind: str = "llvm", cores: int = 1,
                tiles: Mapping[Any, Any] | None = None, vnni: bool = False) -> tvm.IRModule:
    """Relax module with ``main(*graph inputs) -> tuple(flattened graph outputs)``."""
    missing = missing_lowerings(graph)
    if missing:
        raise LoweringError("TVM backend has no lowering for: " + "; ".join(missing))
    bb = relax.BlockBuilder()
    params = [relax.Var(name, relax.TensorType(t.shape, t.dtype))
              for name, t in zip(graph.inputs, graph.input_types())]
    env: dict[Value, relax.Expr] = {Value(n, 0): v for n, v in zip(graph.inputs, params)}
    nhwc = nhwc_values(graph, target_kind)
    with bb.function("main", params=params):
        with bb.dataflow():
            for node in graph.topo_order():
                data = graph.nodes[node]
                if data["op"] == "input":
                    continue
                ctx = LowerContext(bb, graph, node, target_kind, cores, tiles or {}, vnni, nhwc)
                result = LOWERINGS[data["op"]](ctx, [env[v] for v in graph.operands(node)])
                outs = result if isinstance(result, tuple) else (result,)
                for i, expr in enumerate(outs):
                    env[Value(node, i)] = expr
            flat = [env[v] for v in graph.output_values()]
            result = bb.emit_output(relax.Tuple(flat))
        bb.emit_func_output(result)
    return bb.get()


def check_types(graph: Graph, mod: tvm.IRModule) -> None:
    """The Relax function's output types must equal the IR's: catches lowering bugs at build time."""
    for value, info in zip(graph.output_values(), mod["main"].ret_ty.fields):
        expected = graph.value_type(value)
        got = tuple(int(d) for d in info.shape)
        if got != expected.shape or info.dtype != expected.dtype:
            raise LoweringError(f"lowering of {graph.describe(value.node)} produced {info.dtype}{list(got)}, "
                                f"the IR says {expected}")


def lower(graph: Graph, target_kind: str = "llvm", cores: int = 1,
          tiles: Mapping[Any, Any] | None = None, vnni: bool = False) -> tvm.IRModule:
    mod = lower_graph(graph, target_kind, cores, tiles, vnni)
    check_types(graph, mod)
    return mod
