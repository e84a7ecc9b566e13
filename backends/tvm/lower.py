"""Lower IR graphs to a Relax ``IRModule`` through ``relax.BlockBuilder``, one lowering per op (the recurrent ones
in ``lower_recurrent.py``; the context and registry in ``lowering.py``).

We build Relax ourselves (rather than through TVM's torch/ONNX importers) so every op of ``passes.ir.ops`` has
exactly our semantics, RNNs of any depth and direction lower, and fused or quantized ops introduced by passes
have a place to go. Params become ``relax.const``s, folded into the executable at build time; weights are laid
out for the kernel once, here (e.g. ``linear`` keeps ``W^T`` so the kernel is a plain ``matmul``).

The generated function ``main`` takes the graph inputs in order and returns a flat tuple of the graph outputs
(depth-first order of ``graph.outputs``); ``CompiledModule`` rebuilds the structure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax import op as R

from backends.tvm import cuda_conv, lower_recurrent  # noqa: F401 (lower_recurrent registers the RNN lowerings)
from backends.tvm.expand_depthwise import expand_depthwise_kernel
from backends.tvm.kernels import ConvSpec, conv_kernel
from backends.tvm.lowering import (  # noqa: F401 (LoweringError, LowerContext: re-exported)
    LOWERINGS,
    LowerContext,
    LoweringError,
    call_dense_kernel,
    dynamic_dense,
    lowering,
    static_shape,
)
from backends.tvm.qkernels import (
    QConvSpec,
    depthwise_kernel,
    instruction_for,
    integer_max_pool2d_kernel,
    pack_depthwise_weight,
    qconv_kernel,
)
from backends.tvm.select import (
    conv_spec_of,
    nhwc_values,  # noqa: F401 (re-exported: tests read the layout decision here)
    select_kernels,
)
from backends.tvm.target import Target, resolve_target
from backends.tvm.winograd import WinogradSpec, winograd_kernel
from passes.ir.graph import Graph, Value
from passes.ir.ops import activation_of, conv_operands, expand_dw_convs, layout_block

FLOAT_MAX = 3.4028234663852886e38


def _channel_bias(ctx: LowerContext, y: relax.Expr, bias: np.ndarray | None, rank: int) -> relax.Expr:
    if bias is None:
        return y
    return ctx.emit(R.add(y, ctx.const(np.reshape(bias, (1, -1) + (1,) * (rank - 2)), str(y.ty.dtype))))


# ------------------------------------------------------------------------------------------------ layers
@lowering("constant")
def _constant(ctx, xs):
    return ctx.const(ctx.params["value"])


def _call_kernel(ctx: LowerContext, name: str, func, x: relax.Expr, weight: np.ndarray | relax.Expr,
                 weight_dtype: str, has_bias: bool, residual: relax.Expr | None, out_shape: tuple, out_dtype: str
                 ) -> relax.Expr:
    """``call_tir`` of one of our conv kernels: ``(x, packed weight[, bias][, residual]) -> out``, the weight and the
    bias (fp32 in every kernel: added to the fp32 accumulator) as constants (the weight: or an expression)."""
    gv = ctx.bb.add_func(func.with_attr("global_symbol", name), name)
    args = [x, weight if isinstance(weight, relax.Expr) else ctx.const(weight, weight_dtype)]
    if has_bias:
        args.append(ctx.const(ctx.params["bias"], "float32"))
    if residual is not None:
        args.append(residual)
    return ctx.emit(R.call_tir(gv, relax.Tuple(args), out_ty=relax.TensorType(out_shape, out_dtype)))


def call_conv_kernel(ctx: LowerContext, x: relax.Expr, spec: ConvSpec, residual: relax.Expr | None = None,
                     input_scale: relax.Expr | None = None) -> relax.Expr:
    """``call_tir`` of our scheduled conv kernel, weights and bias as constants. ``input_scale`` (N = 1, C
    channels, any layout of a 1x1 map): conv(x * s) is computed as conv(x) with the packed weight scaled per input
    channel at run time, W'[o, c, ...] = W[o, c, ...] s[c] (fold-channel-scale's rule keeps that the smaller pass)."""
    weight = spec.pack_weight(ctx.params["weight"])
    if input_scale is not None:
        shape = [1] * weight.ndim  # blocked [OC/v][C/icb][KH][KW][icb][v]: the input channel is (axis 1, axis 4)
        shape[1], shape[4] = spec.in_shape[1] // spec.ic_block, spec.ic_block
        weight = ctx.emit(R.multiply(ctx.const(weight, spec.dtype), R.reshape(input_scale, shape)))
    return _call_kernel(ctx, ("conv2d_pool_" if spec.pool else "conv2d_") + ctx.node,
                        conv_kernel(spec, ctx.target_kind, ctx.tiles.get(spec)), x, weight, spec.dtype,
                        spec.has_bias, residual, spec.stored_shape, spec.dtype)


def call_winograd_kernel(ctx: LowerContext, x: relax.Expr, spec: WinogradSpec, residual: relax.Expr | None = None
                         ) -> relax.Expr:
    """``call_tir`` of our Winograd kernel; the weights go in transformed (U = G g G^T, packed) at compile time."""
    return _call_kernel(ctx, f"conv2d_winograd{spec.tile}_{ctx.node}", winograd_kernel(spec), x,
                        spec.pack_weight(ctx.params["weight"]), "float32", spec.has_bias, residual, spec.stored_shape,
                        "float32")


def call_tensor_core_kernel(ctx: LowerContext, x: relax.Expr, spec: ConvSpec, residual: relax.Expr | None = None
                            ) -> relax.Expr:
    """``call_tir`` of the cuda tensor-core conv (``cuda_conv``); weights packed to (K_pad, OC_pad) at compile time.
    A ``TensorCoreTile`` in ``ctx.tiles`` for ``spec`` (a tuner's choice) replaces the default tile."""
    tile = ctx.tiles.get(spec)
    tile = tile if isinstance(tile, cuda_conv.TensorCoreTile) else cuda_conv.DEFAULT_TILE
    return _call_kernel(ctx, f"conv2d_tensor_core_{ctx.node}", cuda_conv.conv_kernel(spec, tile), x,
                        cuda_conv.pack_weight(spec, ctx.params["weight"], tile), spec.dtype, spec.has_bias, residual,
                        spec.out_shape, spec.dtype)


@lowering("conv2d_pool")
def _conv2d_pool(ctx, xs):
    """Our single fused kernel (the conv output is never materialized; on CPU the blocked conv with the pool in its
    epilogue where the windows tile the conv output), except where the conv runs as Winograd or as the blocked conv
    whose epilogue cannot take the windows (``select.blocked_then_pool``): then that kernel (bias and activation
    fused) and the pool after it. A blocked ``out_layout`` (alter-layout) is stored by the epilogue kernel itself;
    the other paths store NCHW and lay it out after (``select.choose`` gives them an NCHW spec)."""
    y = _conv2d_pool_as_chosen(ctx, xs)
    stored = ctx.attrs["out_layout"] if ctx.choice.spec.out_block else "NCHW"
    return relax_layout(ctx, y, stored, ctx.attrs["out_layout"])


def _conv2d_pool_as_chosen(ctx, xs):
    """The chosen kernels' output: NCHW, or the pool epilogue's own stored layout (``Choice.spec.out_block``)."""
    if ctx.choice.kernel == "blocked_conv_pool":
        a, y = ctx.attrs, call_conv_kernel(ctx, xs[0], ctx.choice.spec)
        pool = R.nn.max_pool2d if a["pool"] == "max" else R.nn.avg_pool2d
        return ctx.emit(pool(y, pool_size=a["pool_kernel"], strides=a["pool_stride"], ceil_mode=a["pool_ceil_mode"]))
    if ctx.choice.kernel == "winograd":
        a = ctx.attrs
        y = call_winograd_kernel(ctx, xs[0], ctx.choice.spec)
        pool = R.nn.max_pool2d if a["pool"] == "max" else R.nn.avg_pool2d
        y = ctx.emit(pool(y, pool_size=a["pool_kernel"], strides=a["pool_stride"],
                          padding=tuple(a["pool_padding"]) * 2, ceil_mode=a["pool_ceil_mode"]))
        expected = conv_spec_of(ctx.graph, ctx.node, ctx.target.lanes).out_shape  # pooled, NCHW
        if tuple(static_shape(y)) != tuple(expected):
            raise ctx.fail(f"TVM's pooling gives shape {static_shape(y)}, torch {expected}")
        return y
    if ctx.choice.kernel != "conv":
        spec = conv_spec_of(ctx.graph, ctx.node, ctx.target.lanes)
        raise ctx.fail(f"no fused kernel for activation {spec.activation!r} / pool {spec.pool!r} with padding "
                       f"{spec.pool_padding}, ceil_mode={spec.pool_ceil_mode}; run without fuse-conv-pool")
    return call_conv_kernel(ctx, xs[0], ctx.choice.spec)


@lowering("conv1d", "conv2d")
def _conv(ctx, xs):
    if ctx.choice.kernel == "conv":
        return call_conv_kernel(ctx, xs[0], ctx.choice.spec, xs[1] if len(xs) > 1 else None)
    if ctx.choice.kernel == "winograd":
        return call_winograd_kernel(ctx, xs[0], ctx.choice.spec, xs[1] if len(xs) > 1 else None)
    if ctx.choice.kernel == "tensor_core":
        return call_tensor_core_kernel(ctx, xs[0], ctx.choice.spec, xs[1] if len(xs) > 1 else None)
    return _relax_conv(ctx, xs)


def _relax_conv(ctx: LowerContext, xs: list[relax.Expr], attrs: Mapping[str, Any] | None = None,
                params: Mapping[str, Any] | None = None) -> relax.Expr:
    """act(conv(x) + bias [+ residual]) as Relax ops, NCHW; ``attrs``/``params``: a conv's other than the node's
    own (one of a fused op's convs)."""
    a, p = attrs or ctx.attrs, params or ctx.params
    nd = len(a["stride"])
    conv = R.nn.conv1d if nd == 1 else R.nn.conv2d
    padding = tuple(a["padding"]) * 2  # (lo..., hi...) symmetric
    y = ctx.emit(conv(xs[0], ctx.const(p["weight"]), strides=a["stride"], padding=padding,
                      dilation=a["dilation"], groups=a["groups"]))
    y = _channel_bias(ctx, y, p.get("bias"), nd + 2)
    if len(xs) > 1:  # residual operand (fuse-conv-add)
        y = ctx.emit(R.add(y, xs[1]))
    return ACTIVATION_LOWERINGS[a["activation"]](ctx, y, a["activation_params"])


def relax_layout(ctx: LowerContext, x: relax.Expr, src: str, dst: str) -> relax.Expr:
    """``passes.ir.ops.to_layout`` as Relax ops: blocked[n, c / b, h, w, c % b] = plain[n, c, h, w]."""
    if src == dst:
        return x
    if layout_block(src):
        n, cb, h, w, b = static_shape(x)
        x = ctx.emit(R.reshape(R.permute_dims(x, [0, 1, 4, 2, 3]), (n, cb * b, h, w)))
    block = layout_block(dst)
    if not block:
        return x
    n, c, h, w = static_shape(x)
    return ctx.emit(R.permute_dims(R.reshape(x, (n, c // block, block, h, w)), [0, 1, 3, 4, 2]))


@lowering("layout_transform")
def _layout_transform(ctx, xs):
    return relax_layout(ctx, xs[0], ctx.attrs["src"], ctx.attrs["dst"])


@lowering("conv2d_expand_dw")
def _conv2d_expand_dw(ctx, xs):
    """One fused kernel on CPU (``expand_depthwise``: the expanded tensor never leaves the task's band buffer);
    otherwise (a dtype it does not take, a non-CPU target) the two convs as Relax ops between layout transforms."""
    a, p = ctx.attrs, ctx.params
    if ctx.choice.kernel == "expand_dw":
        spec = ctx.choice.spec
        weight, dw_weight = spec.pack_weights(p["weight"], p["dw_weight"])
        name = "conv2d_expand_dw_" + ctx.node
        func = expand_depthwise_kernel(spec, ctx.tiles.get(spec)).with_attr("global_symbol", name)
        args = [xs[0], ctx.const(weight), *([ctx.const(p["bias"])] if spec.has_bias else []),
                ctx.const(dw_weight), *([ctx.const(p["dw_bias"])] if spec.dw_has_bias else [])]
        return ctx.emit(R.call_tir(ctx.bb.add_func(func, name), relax.Tuple(args),
                                   out_ty=relax.TensorType(spec.stored_shape, "float32")))
    y = relax_layout(ctx, xs[0], a["in_layout"], "NCHW")
    for attrs, params in expand_dw_convs(a, p):
        y = _relax_conv(ctx, [y], attrs, params)
    return relax_layout(ctx, y, "NCHW", a["out_layout"])


@lowering("conv2d_nchwc")
def _conv2d_nchwc(ctx, xs):
    """Our blocked kernel reads and writes the layouts directly (CPU); elsewhere (cuda, a dtype our kernels do not
    take) the NCHW Relax conv between layout transforms (an input scale multiplied in first)."""
    a = ctx.attrs
    x, residual, scale = conv_operands(xs, a)
    if ctx.choice.kernel == "conv" and ctx.choice.spec.blocked:
        return call_conv_kernel(ctx, x, ctx.choice.spec, residual, scale)
    if ctx.choice.kernel == "winograd":  # (never with an input scale: ``select.choose``)
        return call_winograd_kernel(ctx, x, ctx.choice.spec, residual)
    plain = [relax_layout(ctx, x, a["in_layout"], "NCHW")]
    if scale is not None:
        n, c = static_shape(plain[0])[:2]
        plain[0] = ctx.emit(R.multiply(plain[0], R.reshape(scale, (n, c, 1, 1))))
    if residual is not None:
        plain.append(relax_layout(ctx, residual, a["out_layout"], "NCHW"))
    return relax_layout(ctx, _relax_conv(ctx, plain), "NCHW", a["out_layout"])


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


def _affine_params(ctx: LowerContext, shape: tuple[int, ...]) -> tuple[relax.Constant, relax.Constant]:
    """weight and bias of a normalization (ones and zeros when absent: Relax's norms always take both)."""
    dtype = ctx.in_type(0).dtype
    weight = ctx.params.get("weight", np.ones(shape))
    bias = ctx.params.get("bias", np.zeros(shape))
    return ctx.const(np.reshape(weight, shape), dtype), ctx.const(np.reshape(bias, shape), dtype)


@lowering("layer_norm")
def _layer_norm(ctx, xs):
    a, rank = ctx.attrs, ctx.in_type(0).rank
    weight, bias = _affine_params(ctx, tuple(a["normalized_shape"]))
    axes = list(range(rank - len(a["normalized_shape"]), rank))
    return ctx.emit(R.nn.layer_norm(xs[0], weight, bias, axes=axes, epsilon=a["eps"]))


@lowering("group_norm")
def _group_norm(ctx, xs):
    a, shape = ctx.attrs, ctx.in_type(0).shape
    weight, bias = _affine_params(ctx, (shape[1],))
    return ctx.emit(R.nn.group_norm(xs[0], weight, bias, num_groups=a["num_groups"], channel_axis=1,
                                    axes=list(range(2, len(shape))), epsilon=a["eps"]))


# torch mode -> (TVM method, coordinate mode, rounding); see the ``interpolate`` op's coordinate maps
_RESIZE = {"nearest": ("nearest_neighbor", "asymmetric", "floor"),
           "nearest-exact": ("nearest_neighbor", "tf_half_pixel_for_nn", "floor"),
           "bilinear": ("linear", "pytorch_half_pixel", "")}


@lowering("interpolate")
def _interpolate(ctx, xs):
    """``image.resize2d`` (a 1-d resize as height 1). TVM maps coordinates with in/out, so a ``scale_factor``
    whose reciprocal differs from in/out (torch's recompute_scale_factor=False on a non-integral size) is refused."""
    a, shape = ctx.attrs, ctx.in_type(0).shape
    spatial, size = shape[2:], tuple(a["size"])
    if len(spatial) not in (1, 2):
        raise ctx.fail(f"resize of {len(spatial)} spatial dims (1 or 2 lower)")
    uses_scale = not (a["mode"] == "bilinear" and a["align_corners"])
    if a["scale_factor"] is not None and uses_scale and any(
            abs(1 / f - i / o) > 1e-9 for f, i, o in zip(a["scale_factor"], spatial, size)):
        raise ctx.fail(f"scale_factor {a['scale_factor']} maps coordinates unlike in/out sizes {spatial} -> {size}; "
                       "give the model an explicit size instead")
    method, coords, rounding = _RESIZE[a["mode"]]
    if a["mode"] == "bilinear" and a["align_corners"]:
        coords = "align_corners"
    x = xs[0] if len(spatial) == 2 else ctx.emit(R.reshape(xs[0], (*shape[:2], 1, spatial[0])))
    y = ctx.emit(R.image.resize2d(x, size if len(spatial) == 2 else (1, size[0]), method=method,
                                  coordinate_transformation_mode=coords, rounding_method=rounding))
    return y if len(spatial) == 2 else ctx.emit(R.reshape(y, ctx.out_type().shape))


@lowering("linear")
def _linear(ctx, xs):
    if ctx.choice.kernel == "dense":
        return call_dense_kernel(ctx, xs[0], ctx.in_type(0).shape, ctx.params["weight"], ctx.params.get("bias"),
                                 ctx.attrs["activation"], ctx.attrs["activation_params"], ctx.in_type(0).dtype)
    weight_t = np.ascontiguousarray(ctx.params["weight"].T)  # packed once: the kernel is x @ W^T
    y = ctx.emit(R.matmul(xs[0], ctx.const(weight_t)))
    bias = ctx.params.get("bias")
    return apply_activation(ctx, y if bias is None else ctx.emit(R.add(y, ctx.const(bias, str(y.ty.dtype)))))


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
    if ctx.choice.kernel == "integer_max_pool":
        return _integer_max_pool2d(ctx, xs[0])
    if kind == "max" and dtype in ("uint8", "int8"):  # LLVM scalarizes an 8-bit max pool; in float (exact) not
        y = ctx.emit(R.astype(fn(R.astype(xs[0], "float32"), **kwargs), dtype))
    elif kind == "avg":
        y = _sum_in_float32(ctx, xs[0], lambda x: fn(x, **kwargs))
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
    return _sum_in_float32(ctx, xs[0], lambda x: fn(x, output_size=ctx.attrs["output_size"]))


def _sum_in_float32(ctx: LowerContext, x: relax.Expr, pool) -> relax.Expr:
    """``pool(x)`` (an average) summed in float32 when ``x`` is float16/bfloat16, rounded once at the end.

    TVM's pools accumulate in the input dtype: a float16 running sum of n values of size ~m has error ~n * m * 2^-11
    (the sum's own ulp grows with it), so a global average over a 16x16 map was off by 15x PyTorch's error, which
    accumulates reductions in float32. In float32 the sum's error is ~n * 2^-24 relative, and the single rounding of
    the mean back to the low dtype (half an ulp) is what remains, as in PyTorch. The casts fuse into the pool."""
    dtype = ctx.in_type(0).dtype
    if dtype not in ("float16", "bfloat16"):
        return ctx.emit(pool(x))
    return ctx.emit(R.astype(pool(R.astype(x, "float32")), dtype))


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
              "out_dtype": a["out_dtype"],
              "instruction": instruction_for(ctx.target), "wide_shift": bool(np.min(ctx.params["shift"]) >= 32)}
    if ctx.data["op"] == "qconv2d":
        operands = ctx.graph.operands(ctx.node)
        layout = lambda value: "NHWC" if value in ctx.nhwc else "NCHW"  # noqa: E731
        common |= {"in_layout": layout(operands[0]), "out_layout": layout(Value(ctx.node, 0))}
        if len(operands) > 1:
            common |= {"residual_zero_point": a["residual_zero_point"], "residual_dtype": ctx.in_type(1).dtype,
                       "residual_layout": layout(operands[1])}
        return QConvSpec(ctx.in_type(0).shape, weight.shape, a["stride"], a["padding"], a["dilation"],
                         groups=a["groups"], **common)
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


@lowering("qconv2d", "qlinear")
def _integer_layer(ctx, xs):
    """uint8/int8 x int8 -> int32 -> requantized, integer arithmetic throughout. CPU, groups = 1 or
    ``qkernels.groups_fit``: our kernel (``qkernels.py``, vpdpbusd where the CPU has VNNI); CPU depthwise: our
    depthwise kernel; otherwise (other grouped convs, cuda) Relax integer ops."""
    a, p = ctx.attrs, ctx.params
    if a["out_dtype"] not in ("uint8", "int8"):
        raise ctx.fail(f"out_dtype {a['out_dtype']!r} (the integer lowering writes uint8 or int8)")
    is_conv = ctx.data["op"] == "qconv2d"
    if ctx.choice.kernel in ("integer", "depthwise"):
        spec = _integer_spec(ctx)
        weight = p["weight"] if is_conv else p["weight"][:, :, None, None]
        if ctx.choice.kernel == "depthwise":
            func, packed = depthwise_kernel(spec, ctx.cores), pack_depthwise_weight(weight)
            name = f"qconv2d_depthwise_{ctx.node}"
        else:
            func, packed = qconv_kernel(spec, ctx.cores), spec.pack_weight(weight)
            name = f"{ctx.data['op']}_{ctx.node}"
        gv = ctx.bb.add_func(func.with_attr("global_symbol", name), name)
        x = xs[0] if is_conv else ctx.emit(R.reshape(xs[0], spec.in_shape))
        args = [x, ctx.const(packed, str(packed.dtype)), ctx.const(spec.fold_bias(weight, p["bias"]), "int32"),
                ctx.const(p["multiplier"], "int32"), ctx.const(spec.kernel_shift(p["shift"]), "int32")]
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


# ------------------------------------------------------------------------------------------------ driver
def missing_lowerings(graph: Graph) -> list[str]:
    return sorted({f"{graph.describe(n)}" for n, d in graph.nodes(data=True)
                   if d["op"] != "input" and d["op"] not in LOWERINGS})


def lower_graph(graph: Graph, target: Target | str | dict = "llvm", cores: int | None = None,
                tiles: Mapping[Any, Any] | None = None) -> tvm.IRModule:
    """Relax module with ``main(*graph inputs) -> tuple(flattened graph outputs)``; ``cores`` overrides the
    target's thread split (``resolve_target``)."""
    target = resolve_target(target, cores)
    missing = missing_lowerings(graph)
    if missing:
        raise LoweringError("TVM backend has no lowering for: " + "; ".join(missing))
    bb = relax.BlockBuilder()
    params = [relax.Var(name, relax.TensorType(t.shape, t.dtype))
              for name, t in zip(graph.inputs, graph.input_types())]
    env: dict[Value, relax.Expr] = {Value(n, 0): v for n, v in zip(graph.inputs, params)}
    selection = select_kernels(graph, target.kind, target.lanes, target.winograd, tiles)
    with bb.function("main", params=params):
        with bb.dataflow():
            for node in graph.topo_order():
                data = graph.nodes[node]
                if data["op"] == "input":
                    continue
                ctx = LowerContext(bb, graph, node, target, selection, tiles or {})
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


def lower(graph: Graph, target: Target | str | dict = "llvm", cores: int | None = None,
          tiles: Mapping[Any, Any] | None = None) -> tvm.IRModule:
    mod = lower_graph(graph, target, cores, tiles)
    check_types(graph, mod)
    return mod
