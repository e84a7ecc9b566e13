"""The op table: every IR op defined once, with its schema, type inference, reference semantics and cost.

An ``OpDef`` gives
- ``arity``: (min, max) operand count (``max=None`` for variadic ops such as ``concat``);
- ``attrs``: name -> default (``REQUIRED`` if none); values are normalized (lists become tuples) and type-checked
  against the default's type;
- ``params`` / ``optional_params``: names of the tensors the node owns (``weight``, ``bias``...);
- ``reference(xs, attrs, params)``: the op's meaning in torch (``torch.nn.functional`` wherever it exists), used
  by the reference interpreter and, on the ``meta`` device, for shape/dtype inference, so semantics and types
  can never disagree;
- ``flops(in_types, out_types, attrs, params)``: arithmetic work, counting a multiply-add as 2 FLOPs.

Backends must provide a lowering for every op here; ``tests/backends`` fails when one is missing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from passes.ir.types import IRError, TensorType

REQUIRED = object()

Reference = Callable[[list[torch.Tensor], dict, dict], Any]


def _normalize(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_normalize(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_normalize(v) for v in value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


def _type_ok(value: Any, default: Any) -> bool:
    if default is REQUIRED or default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, tuple):
        return isinstance(value, tuple)
    return True


def _numel(t: TensorType) -> int:
    return t.numel


def _elementwise_flops(in_types, out_types, attrs, params) -> int:
    return sum(_numel(t) for t in out_types)


def _no_flops(in_types, out_types, attrs, params) -> int:
    return 0


@dataclass(frozen=True)
class OpDef:
    name: str
    reference: Reference
    arity: tuple[int, int | None] = (1, 1)
    attrs: Mapping[str, Any] = field(default_factory=dict)
    params: tuple[str, ...] = ()
    optional_params: tuple[str, ...] = ()
    outputs: int | Callable[[dict], int] = 1
    flops: Callable = _elementwise_flops
    doc: str = ""

    def num_outputs(self, attrs: Mapping[str, Any]) -> int:
        return self.outputs(attrs) if callable(self.outputs) else self.outputs

    def allows_params(self) -> tuple[str, ...]:
        return self.params + self.optional_params

    def attr_problems(self, attrs: Mapping[str, Any]) -> list[str]:
        problems = []
        for key in attrs:
            if key not in self.attrs:
                problems.append(f"unknown attribute {key!r} (known: {', '.join(self.attrs) or 'none'})")
        for key, default in self.attrs.items():
            if key not in attrs:
                problems.append(f"missing attribute {key!r}")
            elif not _type_ok(attrs[key], default):
                problems.append(f"attribute {key!r}={attrs[key]!r} should be a {type(default).__name__}")
        return problems

    def check_attrs(self, attrs: Mapping[str, Any], where: str) -> dict:
        """Fill defaults, normalize lists to tuples, and refuse unknown, missing or mistyped attributes."""
        full = {k: _normalize(v) for k, v in attrs.items()}
        for key, default in self.attrs.items():
            if key not in full and default is not REQUIRED:
                full[key] = default
        problems = self.attr_problems(full)
        if problems:
            raise IRError(f"{where}: " + "; ".join(problems))
        return full

    def param_problems(self, params: Mapping[str, Any]) -> list[str]:
        problems = [f"missing param {p!r}" for p in self.params if p not in params]
        problems += [f"unknown param {p!r} (allowed: {', '.join(self.allows_params()) or 'none'})"
                     for p in params if p not in self.allows_params()]
        return problems

    def check_params(self, params: Mapping[str, Any], where: str) -> None:
        problems = self.param_problems(params)
        if problems:
            raise IRError(f"{where}: " + "; ".join(problems))

    def arity_ok(self, count: int) -> bool:
        lo, hi = self.arity
        return count >= lo and (hi is None or count <= hi)

    def infer(self, in_types: list[TensorType], attrs: dict, params: Mapping[str, Any], where: str
              ) -> list[TensorType]:
        """Output types, computed by running the reference on the ``meta`` device (no data, no FLOPs).

        Memoized on (op, operand types, attrs, param shapes): ``verify`` re-infers every node after every pass,
        and some references (a 100-step LSTM) take a while even without data.
        """
        if not self.arity_ok(len(in_types)):
            raise IRError(f"{where}: takes {self.arity} operands, got {len(in_types)}")
        try:
            key = (self.name, tuple(in_types), tuple(sorted(attrs.items())),
                   tuple(sorted((k, np.shape(v), np.asarray(v).dtype.name) for k, v in params.items())))
            hash(key)
        except TypeError:  # unhashable attr value: no memo
            key = None
        if key is not None and key in _INFER_MEMO:
            return list(_INFER_MEMO[key])
        types = self._infer(in_types, attrs, params, where)
        if key is not None:
            if len(_INFER_MEMO) > 1 << 14:  # bounded: a long-lived process compiling many models
                _INFER_MEMO.clear()
            _INFER_MEMO[key] = tuple(types)
        return types

    def _infer(self, in_types, attrs, params, where) -> list[TensorType]:
        xs = [torch.empty(t.shape, dtype=torch_dtype(t.dtype), device="meta") for t in in_types]
        ps = {k: torch.empty(np.shape(v), dtype=torch_dtype(np.asarray(v).dtype.name), device="meta")
              for k, v in params.items()}
        try:
            out = self.reference(xs, attrs, ps)
        except Exception as exc:  # the op itself refuses these operand types: report it on the node
            shapes = ", ".join(str(t) for t in in_types)
            raise IRError(f"{where}: cannot apply to operands ({shapes}): {exc}") from None
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [TensorType(tuple(o.shape), numpy_dtype(o.dtype)) for o in outs]


_INFER_MEMO: dict[tuple, tuple[TensorType, ...]] = {}

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int8": torch.int8,
                 "uint8": torch.uint8, "bool": torch.bool}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise IRError(f"unsupported dtype {name!r} (supported: {', '.join(_TORCH_DTYPES)})") from None


def numpy_dtype(dtype: torch.dtype) -> str:
    for name, td in _TORCH_DTYPES.items():
        if td == dtype:
            return name
    raise IRError(f"unsupported torch dtype {dtype}")


OPS: dict[str, OpDef] = {}


def register_op(opdef: OpDef) -> OpDef:
    if opdef.name in OPS:
        raise IRError(f"op {opdef.name!r} is defined twice")
    OPS[opdef.name] = opdef
    return opdef


def get_op(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise IRError(f"unknown op {name!r}") from None


# ---------------------------------------------------------------------------------------------- cost helpers
def _conv_flops(in_types, out_types, attrs, params) -> int:
    w = np.shape(params["weight"])  # (Cout, Cin/groups, *kernel)
    macs = out_types[0].numel * int(np.prod(w[1:]))
    return 2 * macs + (out_types[0].numel if "bias" in params else 0)


def _conv_transpose_flops(in_types, out_types, attrs, params) -> int:
    w = np.shape(params["weight"])  # (Cin, Cout/groups, *kernel)
    return 2 * in_types[0].numel * int(np.prod(w[1:]))


def _linear_flops(in_types, out_types, attrs, params) -> int:
    in_features = np.shape(params["weight"])[1]
    return 2 * out_types[0].numel * in_features + (out_types[0].numel if "bias" in params else 0)


def _matmul_flops(in_types, out_types, attrs, params) -> int:
    return 2 * out_types[0].numel * in_types[0].shape[-1]


def _pool_flops(in_types, out_types, attrs, params) -> int:
    return out_types[0].numel * int(np.prod(attrs["kernel_size"]))


def _reduce_all_flops(in_types, out_types, attrs, params) -> int:
    return in_types[0].numel


def _rnn_flops(gates: int):
    def flops(in_types, out_types, attrs, params) -> int:
        total = 0
        seq = in_types[0].shape[1 if attrs["batch_first"] else 0]
        batch = in_types[0].shape[0 if attrs["batch_first"] else 1]
        for name, w in params.items():
            if name.startswith("weight_"):
                rows, cols = np.shape(w)
                total += 2 * seq * batch * rows * cols
        hidden = attrs["hidden_size"] * (2 if attrs["bidirectional"] else 1)
        return total + seq * batch * hidden * attrs["num_layers"] * gates * 3
    return flops


# ---------------------------------------------------------------------------------------------- activations
# Activations a conv/linear may carry after fusion (attrs ``activation``, ``activation_params``): f(x, params).
ACTIVATIONS: dict[str, Callable[[torch.Tensor, tuple], torch.Tensor]] = {
    "none": lambda x, p: x,
    "relu": lambda x, p: F.relu(x),
    "relu6": lambda x, p: F.relu6(x),
    "leaky_relu": lambda x, p: F.leaky_relu(x, p[0]),
    "elu": lambda x, p: F.elu(x, p[0]),
    "gelu": lambda x, p: F.gelu(x),
    "gelu_tanh": lambda x, p: F.gelu(x, approximate="tanh"),
    "silu": lambda x, p: F.silu(x),
    "mish": lambda x, p: F.mish(x),
    "sigmoid": lambda x, p: torch.sigmoid(x),
    "tanh": lambda x, p: torch.tanh(x),
    "hardswish": lambda x, p: F.hardswish(x),
    "hardsigmoid": lambda x, p: F.hardsigmoid(x),
    "clamp": lambda x, p: torch.clamp(x, p[0], p[1]),
}


def activation_of(op: str, attrs: Mapping[str, Any]) -> tuple[str, tuple[float, ...]] | None:
    """The fusable form ``(activation, params)`` of a standalone activation node, or None if it is not one."""
    if op in ("relu", "relu6", "silu", "mish", "sigmoid", "tanh", "hardswish", "hardsigmoid"):
        return op, ()
    if op == "leaky_relu":
        return op, (float(attrs["negative_slope"]),)
    if op == "elu":
        return op, (float(attrs["alpha"]),)
    if op == "gelu":
        return ("gelu_tanh" if attrs["approximate"] == "tanh" else "gelu"), ()
    if op == "clamp":
        lo, hi = attrs["min"], attrs["max"]
        return "clamp", (-math.inf if lo is None else float(lo), math.inf if hi is None else float(hi))
    return None


def commutes_with_max(activation: str, params: tuple[float, ...]) -> bool:
    """Whether ``max(f(a), f(b)) == f(max(a, b))`` exactly in float32: f is non-decreasing and made of rounding-
    monotone operations (max/min/scaling by a non-negative constant), so a max pool may apply it after pooling.

    sigmoid/tanh/elu are non-decreasing in exact arithmetic, but the backends evaluate them with approximations
    that are not guaranteed monotone to the last ulp, so they are applied before the pool."""
    if activation == "leaky_relu":
        return params[0] >= 0.0
    return activation in ("none", "relu", "relu6", "clamp", "hardsigmoid")


def apply_activation(x: torch.Tensor, attrs: Mapping[str, Any]) -> torch.Tensor:
    return ACTIVATIONS[attrs["activation"]](x, attrs["activation_params"])


_FUSED_ACTIVATION = {"activation": "none", "activation_params": ()}


# ---------------------------------------------------------------------------------------------- definitions
def _unary(name: str, fn: Callable, attrs: Mapping[str, Any] | None = None, doc: str = "") -> None:
    register_op(OpDef(name, lambda xs, a, p: fn(xs[0], **a), attrs=attrs or {}, doc=doc))


register_op(OpDef("input", lambda xs, a, p: None, arity=(0, 0), flops=_no_flops,
                  doc="A graph input; its type is its node's out_types[0]."))
register_op(OpDef("constant", lambda xs, a, p: p["value"], arity=(0, 0), params=("value",), flops=_no_flops,
                  doc="A constant tensor held in params['value']."))

_CONV_ATTRS = {"stride": REQUIRED, "padding": REQUIRED, "dilation": REQUIRED, "groups": 1}


def _float32_bias(reference: Callable) -> Callable:
    """A layer whose bias is float32 while its operands are bfloat16/float16 (``mixed-precision`` keeps biases in
    float32): computed in float32 from the low-precision values and narrowed once at the end, as our kernels do
    (products accumulated in fp32, bias added to the accumulator, activation, then one rounding)."""
    def reference_with_bias(xs, a, p):
        bias = p.get("bias")
        if bias is None or bias.dtype == xs[0].dtype:
            return reference(xs, a, p)
        low = xs[0].dtype
        return reference([x.float() for x in xs], a, {k: v.float() for k, v in p.items()}).to(low)
    return reference_with_bias


def _conv_reference(conv: Callable):
    """act(conv(x) + bias [+ residual]): an optional second operand is a residual added before the activation."""
    def reference(xs, a, p):
        y = conv(xs[0], p["weight"], p.get("bias"), a["stride"], a["padding"], a["dilation"], a["groups"])
        return apply_activation(y + xs[1] if len(xs) > 1 else y, a)
    return _float32_bias(reference)


for _nd, _conv in ((1, F.conv1d), (2, F.conv2d)):
    register_op(OpDef(
        f"conv{_nd}d", _conv_reference(_conv), arity=(1, 2),
        attrs={k: ((1,) * _nd if v is REQUIRED and k != "padding" else v) for k, v in _CONV_ATTRS.items()}
        | {"padding": (0,) * _nd} | _FUSED_ACTIVATION,
        params=("weight",), optional_params=("bias",), flops=_conv_flops,
        doc="Cross-correlation [+ bias] [+ residual operand] [+ fused activation]; symmetric zero padding "
            "(other modes: a `pad` op)."))

def _conv_out_spatial(in_shape: tuple[int, ...], attrs: Mapping[str, Any], kernel: tuple[int, ...]) -> list[int]:
    return [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
            zip(in_shape, attrs["padding"], attrs["dilation"], kernel, attrs["stride"])]


def _conv2d_pool(xs, a, p):
    y = apply_activation(F.conv2d(xs[0], p["weight"], p.get("bias"), a["stride"], a["padding"], a["dilation"],
                                  a["groups"]), a)
    if a["pool"] == "max":
        y = F.max_pool2d(y, a["pool_kernel"], a["pool_stride"], a["pool_padding"], 1, a["pool_ceil_mode"])
    else:
        y = F.avg_pool2d(y, a["pool_kernel"], a["pool_stride"], a["pool_padding"], a["pool_ceil_mode"])
    return to_layout(y, "NCHW", a["out_layout"])


def _conv2d_pool_flops(in_types, out_types, attrs, params) -> int:
    weight = np.shape(params["weight"])
    spatial = _conv_out_spatial(in_types[0].shape[2:], attrs, weight[2:])
    conv_numel = in_types[0].shape[0] * weight[0] * int(np.prod(spatial))
    return 2 * conv_numel * int(np.prod(weight[1:])) + conv_numel * (2 if "bias" in params else 1)


register_op(OpDef(
    "conv2d_pool", _float32_bias(_conv2d_pool),
    attrs={"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1, **_FUSED_ACTIVATION,
           "pool": REQUIRED, "pool_kernel": REQUIRED, "pool_stride": REQUIRED, "pool_padding": (0, 0),
           "pool_ceil_mode": False, "out_layout": "NCHW"},
    params=("weight",), optional_params=("bias",), flops=_conv2d_pool_flops,
    doc="Fused pool(act(conv2d(x) + b)) (from fuse-conv-pool): pool 'max' (any window, padding, ceil mode) or "
        "'avg' (no padding, no partial windows). Input NCHW; output in `out_layout` (NCHW, or NCHW[b]c from "
        "alter-layout where a blocked conv reads it)."))

# ---------------------------------------------------------------------------------------------- blocked layouts
def layout_block(layout: str) -> int:
    """Channels per block of a layout name: 0 for "NCHW", b for "NCHW{b}c" (channel block innermost)."""
    if layout == "NCHW":
        return 0
    digits = layout[4:-1]
    if not (layout.startswith("NCHW") and layout.endswith("c") and digits.isdigit() and int(digits) > 0):
        raise IRError(f"unknown layout {layout!r} (known: NCHW, NCHW<b>c such as NCHW8c)")
    return int(digits)


def to_layout(x: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """Reorder a 4-d activation between NCHW and NCHW[b]c: blocked[n, c // b, h, w, c % b] = plain[n, c, h, w].

    Channel counts must be a multiple of the block (``alter-layout`` keeps the others NCHW), so the map is a
    bijection and a transform followed by its inverse is the identity."""
    if src == dst:
        return x
    if layout_block(src):
        x = x.permute(0, 1, 4, 2, 3).flatten(1, 2)
    block = layout_block(dst)
    if not block:
        return x
    n, c, h, w = x.shape
    if c % block:
        raise IRError(f"{c} channels do not fill blocks of {block} ({dst})")
    return x.reshape(n, c // block, block, h, w).permute(0, 1, 3, 4, 2).contiguous()


register_op(OpDef("layout_transform", lambda xs, a, p: to_layout(xs[0], a["src"], a["dst"]),
                  attrs={"src": REQUIRED, "dst": REQUIRED}, flops=_no_flops,
                  doc="The same tensor in another memory layout: NCHW <-> NCHW[b]c (from alter-layout)."))


def conv_operands(xs: Sequence[Any], attrs: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """A conv's operands as (x, residual or None, input scale or None): [x, residual?, scale?], the residual from
    fuse-conv-add, the per-input-channel scale last when a ``conv2d_nchwc`` has ``input_scale`` (fold-channel-scale).
    The one place that splits them: reference, lowering, exporter and kernel spec all read it."""
    scale = xs[-1] if attrs.get("input_scale") else None
    rest = xs[1:len(xs) - (scale is not None)]
    return xs[0], (rest[0] if rest else None), scale


def _conv2d_nchwc(xs, a, p):
    x, residual, scale = conv_operands(xs, a)
    x = to_layout(x, a["in_layout"], "NCHW")
    if scale is not None:  # (N, C, 1, 1) or its blocked form: either flattens to channel order
        x = x * scale.reshape(x.shape[0], -1, 1, 1)
    y = F.conv2d(x, p["weight"], p.get("bias"), a["stride"], a["padding"], a["dilation"], a["groups"])
    if residual is not None:
        y = y + to_layout(residual, a["out_layout"], "NCHW")
    return to_layout(apply_activation(y, a), "NCHW", a["out_layout"])


register_op(OpDef(
    "conv2d_nchwc", _conv2d_nchwc, arity=(1, 3),
    attrs={"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1, **_FUSED_ACTIVATION,
           "in_layout": REQUIRED, "out_layout": REQUIRED, "input_scale": False},
    params=("weight",), optional_params=("bias",), flops=_conv_flops,
    doc="conv2d (as the `conv2d` op: bias, residual operand, fused activation) whose input is in `in_layout` and "
        "whose output and residual are in `out_layout` (NCHW or NCHW[b]c; from alter-layout). Weights stay "
        "(OC, C/groups, KH, KW). `input_scale`: a last operand of shape (N, C, 1, 1) (or blocked) multiplies the "
        "input per channel first (squeeze-excite's gate, from fold-channel-scale)."))


def expand_dw_convs(attrs: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[tuple[dict, dict], tuple[dict, dict]]:
    """A ``conv2d_expand_dw`` as its two convs, each (attrs, params) as a ``conv2d`` node has them: the 1x1 expand
    conv (``weight``, ``bias``, ``activation``) and the depthwise conv (``dw_*``). The one place that splits it: the
    reference, the ONNX exporter and the Relax fallback all read it."""
    expand = ({"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1,
               "activation": attrs["activation"], "activation_params": attrs["activation_params"]},
              {k: params[k] for k in ("weight", "bias") if k in params})
    depthwise = ({"stride": attrs["stride"], "padding": attrs["padding"], "dilation": (1, 1),
                  "groups": np.shape(params["dw_weight"])[0], "activation": attrs["dw_activation"],
                  "activation_params": attrs["dw_activation_params"]},
                 {k.removeprefix("dw_"): params[k] for k in ("dw_weight", "dw_bias") if k in params})
    return expand, depthwise


def _conv2d_expand_dw(xs, a, p):
    y = to_layout(xs[0], a["in_layout"], "NCHW")
    for attrs, params in expand_dw_convs(a, p):
        y = apply_activation(F.conv2d(y, params["weight"], params.get("bias"), attrs["stride"], attrs["padding"],
                                      attrs["dilation"], attrs["groups"]), attrs)
    return to_layout(y, "NCHW", a["out_layout"])


def _conv2d_expand_dw_flops(in_types, out_types, attrs, params) -> int:
    n, h, w = (in_types[0].shape[i] for i in (0, 2, 3))  # NCHW or NCHW[b]c alike
    expanded, channels = np.shape(params["weight"])[:2]
    kernel = int(np.prod(np.shape(params["dw_weight"])[2:]))
    return (2 * n * h * w * expanded * channels + n * h * w * expanded * ("bias" in params)
            + out_types[0].numel * (2 * kernel + ("dw_bias" in params)))


register_op(OpDef(
    "conv2d_expand_dw", _conv2d_expand_dw,
    attrs={"stride": (1, 1), "padding": (0, 0), **_FUSED_ACTIVATION, "dw_activation": "none",
           "dw_activation_params": (), "in_layout": REQUIRED, "out_layout": REQUIRED},
    params=("weight", "dw_weight"), optional_params=("bias", "dw_bias"), flops=_conv2d_expand_dw_flops,
    doc="Fused act2(depthwise(act(conv1x1(x) + bias)) + dw_bias) (from fuse-expand-depthwise): the 1x1 expand conv "
        "(`weight` (E, C, 1, 1), `activation`) and the depthwise conv reading it (`dw_weight` (E, 1, KH, KW), "
        "`stride`, `padding`, `dw_activation`), input in `in_layout`, output in `out_layout` (NCHW or NCHW[b]c)."))


for _nd, _convt in ((1, F.conv_transpose1d), (2, F.conv_transpose2d)):
    register_op(OpDef(
        f"conv_transpose{_nd}d",
        (lambda convt: lambda xs, a, p: convt(xs[0], p["weight"], p.get("bias"), a["stride"], a["padding"],
                                               a["output_padding"], a["groups"], a["dilation"]))(_convt),
        attrs={"stride": (1,) * _nd, "padding": (0,) * _nd, "output_padding": (0,) * _nd, "groups": 1,
               "dilation": (1,) * _nd},
        params=("weight",), optional_params=("bias",), flops=_conv_transpose_flops))

register_op(OpDef(
    "batch_norm",
    lambda xs, a, p: F.batch_norm(xs[0], p["running_mean"], p["running_var"], p.get("weight"), p.get("bias"),
                                  False, 0.0, a["eps"]),
    attrs={"eps": 1e-5}, params=("running_mean", "running_var"), optional_params=("weight", "bias"),
    flops=lambda i, o, a, p: 2 * o[0].numel,
    doc="Inference batch norm: y = (x - mean) / sqrt(var + eps) * weight + bias, channels on dim 1."))
register_op(OpDef("lrn", lambda xs, a, p: F.local_response_norm(xs[0], a["size"], a["alpha"], a["beta"], a["k"]),
                  attrs={"size": REQUIRED, "alpha": 1e-4, "beta": 0.75, "k": 1.0},
                  flops=lambda i, o, a, p: o[0].numel * (a["size"] + 4),
                  doc="Local response normalization across channels (torch.nn.functional.local_response_norm)."))
def _normalized_flops(in_types, out_types, attrs, params) -> int:
    """Mean, variance (square and sum), normalize (subtract, multiply) and the affine map: ~8 FLOPs per element."""
    return 8 * out_types[0].numel


register_op(OpDef(
    "layer_norm", lambda xs, a, p: F.layer_norm(xs[0], a["normalized_shape"], p.get("weight"), p.get("bias"), a["eps"]),
    attrs={"normalized_shape": REQUIRED, "eps": 1e-5}, optional_params=("weight", "bias"), flops=_normalized_flops,
    doc="y = (x - mean) / sqrt(var + eps) * weight + bias, statistics over the trailing `normalized_shape` dims "
        "(biased variance)."))
register_op(OpDef(
    "group_norm", lambda xs, a, p: F.group_norm(xs[0], a["num_groups"], p.get("weight"), p.get("bias"), a["eps"]),
    attrs={"num_groups": REQUIRED, "eps": 1e-5}, optional_params=("weight", "bias"), flops=_normalized_flops,
    doc="Channels (dim 1) split into `num_groups` groups; each (sample, group) normalized over its channels and "
        "spatial positions as layer_norm does, then a per-channel affine weight, bias."))


def _interpolate(xs, a, p):
    x, mode = xs[0], a["mode"]
    if mode not in ("nearest", "nearest-exact", "bilinear"):
        raise IRError(f"interpolate mode {mode!r} (supported: nearest, nearest-exact, bilinear)")
    if len(a["size"]) != x.dim() - 2:
        raise IRError(f"interpolate size {a['size']} for a rank-{x.dim()} input (needs {x.dim() - 2} sizes)")
    align = a["align_corners"] if mode == "bilinear" else None
    if mode != "bilinear" and a["align_corners"]:
        raise IRError(f"align_corners=True applies only to bilinear, not {mode!r}")
    if a["scale_factor"] is None:
        return F.interpolate(x, size=a["size"], mode=mode, align_corners=align)
    y = F.interpolate(x, scale_factor=a["scale_factor"], mode=mode, align_corners=align,
                      recompute_scale_factor=False)
    if tuple(y.shape[2:]) != tuple(a["size"]):
        raise IRError(f"interpolate scale_factor {a['scale_factor']} gives spatial size {tuple(y.shape[2:])}, "
                      f"not the declared size {a['size']}")
    return y


register_op(OpDef(
    "interpolate", _interpolate,
    attrs={"size": REQUIRED, "mode": "nearest", "align_corners": False, "scale_factor": None},
    flops=lambda i, o, a, p: (0 if a["mode"].startswith("nearest") else 6) * o[0].numel,
    doc="F.interpolate of (N, C, *spatial) to spatial `size`. Source coordinate of output index i: nearest "
        "floor(i * s); nearest-exact floor((i + 0.5) * s); bilinear (i + 0.5) * s - 0.5 clamped at 0, or "
        "i * (in - 1) / (out - 1) with align_corners; s = 1 / scale_factor when given (torch's "
        "recompute_scale_factor=False), else in / out. Bilinear blends the 2x2 neighbours (6 FLOPs per output)."))

register_op(OpDef("linear", _float32_bias(lambda xs, a, p: apply_activation(F.linear(xs[0], p["weight"],
                                                                                      p.get("bias")), a)),
                  attrs=dict(_FUSED_ACTIVATION), params=("weight",), optional_params=("bias",), flops=_linear_flops,
                  doc="x W^T [+ bias] [+ fused activation]."))
register_op(OpDef("matmul", lambda xs, a, p: torch.matmul(xs[0], xs[1]), arity=(2, 2), flops=_matmul_flops))
register_op(OpDef("embedding", lambda xs, a, p: F.embedding(xs[0], p["weight"]), params=("weight",),
                  flops=_no_flops))

for _name, _fn in (("add", torch.add), ("sub", torch.sub), ("mul", torch.mul), ("div", torch.div),
                   ("maximum", torch.maximum), ("minimum", torch.minimum)):
    register_op(OpDef(_name, (lambda fn: lambda xs, a, p: fn(xs[0], xs[1]))(_fn), arity=(2, 2),
                      doc="Elementwise with numpy broadcasting."))

_unary("relu", lambda x: F.relu(x))
_unary("relu6", lambda x: F.relu6(x))
_unary("leaky_relu", lambda x, negative_slope: F.leaky_relu(x, negative_slope), {"negative_slope": 0.01})
_unary("elu", lambda x, alpha: F.elu(x, alpha), {"alpha": 1.0})
_unary("gelu", lambda x, approximate: F.gelu(x, approximate=approximate), {"approximate": "none"})
_unary("silu", lambda x: F.silu(x))
_unary("mish", lambda x: F.mish(x))
_unary("sigmoid", lambda x: torch.sigmoid(x))
_unary("tanh", lambda x: torch.tanh(x))
_unary("hardswish", lambda x: F.hardswish(x))
_unary("hardsigmoid", lambda x: F.hardsigmoid(x))
_unary("exp", lambda x: torch.exp(x))
_unary("sqrt", lambda x: torch.sqrt(x))
_unary("neg", lambda x: torch.neg(x))
_unary("abs", lambda x: torch.abs(x))
_unary("erf", lambda x: torch.erf(x))
_unary("clamp", lambda x, min, max: torch.clamp(x, min, max), {"min": None, "max": None},
       doc="Clamp to [min, max]; None leaves that side open (hardtanh is clamp).")
_unary("softmax", lambda x, dim: F.softmax(x, dim), {"dim": REQUIRED})
_unary("log_softmax", lambda x, dim: F.log_softmax(x, dim), {"dim": REQUIRED})
_unary("dropout", lambda x, p: x, {"p": 0.5}, doc="Inference dropout: the identity.")
_unary("identity", lambda x: x)
_unary("cast", lambda x, dtype: x.to(torch_dtype(dtype)), {"dtype": REQUIRED})

for _nd in (1, 2):
    _max = getattr(F, f"max_pool{_nd}d")
    _avg = getattr(F, f"avg_pool{_nd}d")
    register_op(OpDef(
        f"max_pool{_nd}d",
        (lambda mp: lambda xs, a, p: mp(xs[0], a["kernel_size"], a["stride"], a["padding"], a["dilation"],
                                        a["ceil_mode"]))(_max),
        attrs={"kernel_size": REQUIRED, "stride": REQUIRED, "padding": (0,) * _nd, "dilation": (1,) * _nd,
               "ceil_mode": False}, flops=_pool_flops))
    register_op(OpDef(
        f"avg_pool{_nd}d",
        (lambda ap: lambda xs, a, p: ap(xs[0], a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"],
                                        a["count_include_pad"]))(_avg),
        attrs={"kernel_size": REQUIRED, "stride": REQUIRED, "padding": (0,) * _nd, "ceil_mode": False,
               "count_include_pad": True}, flops=_pool_flops))
    for _kind in ("avg", "max"):
        _adaptive = getattr(F, f"adaptive_{_kind}_pool{_nd}d")
        register_op(OpDef(
            f"adaptive_{_kind}_pool{_nd}d",
            (lambda ad: lambda xs, a, p: ad(xs[0], a["output_size"]))(_adaptive),
            attrs={"output_size": REQUIRED}, flops=_reduce_all_flops))


def _split(xs, a, p):
    return tuple(torch.split(xs[0], list(a["split_sizes"]), a["dim"]))


def _rnn_weights(p: dict, attrs: dict) -> list[torch.Tensor]:
    weights = []
    for layer in range(attrs["num_layers"]):
        for suffix in ("", "_reverse")[: 2 if attrs["bidirectional"] else 1]:
            names = [f"weight_ih_l{layer}{suffix}", f"weight_hh_l{layer}{suffix}"]
            if attrs["bias"]:
                names += [f"bias_ih_l{layer}{suffix}", f"bias_hh_l{layer}{suffix}"]
            weights += [p[n] for n in names]
    return weights


def _initial_state(xs: list[torch.Tensor], slot: int, attrs: dict) -> torch.Tensor:
    if len(xs) > slot:
        return xs[slot]
    x = xs[0]
    batch = x.shape[0 if attrs["batch_first"] else 1]
    layers = attrs["num_layers"] * (2 if attrs["bidirectional"] else 1)
    return torch.zeros(layers, batch, attrs["hidden_size"], dtype=x.dtype, device=x.device)


def _lstm(xs, a, p):
    h0, c0 = _initial_state(xs, 1, a), _initial_state(xs, 2, a)
    out, h, c = torch.lstm(xs[0], (h0, c0), _rnn_weights(p, a), a["bias"], a["num_layers"], 0.0, False,
                           a["bidirectional"], a["batch_first"])
    return out, h, c


def _gru(xs, a, p):
    out, h = torch.gru(xs[0], _initial_state(xs, 1, a), _rnn_weights(p, a), a["bias"], a["num_layers"], 0.0,
                       False, a["bidirectional"], a["batch_first"])
    return out, h


def _rnn(xs, a, p):
    fn = torch.rnn_tanh if a["nonlinearity"] == "tanh" else torch.rnn_relu
    out, h = fn(xs[0], _initial_state(xs, 1, a), _rnn_weights(p, a), a["bias"], a["num_layers"], 0.0, False,
                a["bidirectional"], a["batch_first"])
    return out, h


def rnn_param_names(attrs: Mapping[str, Any], max_layers: int = 64) -> tuple[str, ...]:
    names = []
    for layer in range(max_layers):
        for suffix in ("", "_reverse"):
            names += [f"weight_ih_l{layer}{suffix}", f"weight_hh_l{layer}{suffix}",
                      f"bias_ih_l{layer}{suffix}", f"bias_hh_l{layer}{suffix}"]
    return tuple(names)


_RNN_ATTRS = {"hidden_size": REQUIRED, "num_layers": 1, "bidirectional": False, "batch_first": False,
              "bias": True}
_RNN_PARAMS = rnn_param_names({})
register_op(OpDef("lstm", _lstm, arity=(1, 3), attrs=_RNN_ATTRS, optional_params=_RNN_PARAMS, outputs=3,
                  flops=_rnn_flops(4),
                  doc="torch.nn.LSTM semantics (gates i, f, g, o); operands x[, h0, c0]; outputs (y, h_n, c_n)."))
register_op(OpDef("gru", _gru, arity=(1, 2), attrs=_RNN_ATTRS, optional_params=_RNN_PARAMS, outputs=2,
                  flops=_rnn_flops(3),
                  doc="torch.nn.GRU semantics (gates r, z, n); operands x[, h0]; outputs (y, h_n)."))
register_op(OpDef("rnn", _rnn, arity=(1, 2), attrs=_RNN_ATTRS | {"nonlinearity": "tanh"},
                  optional_params=_RNN_PARAMS, outputs=2, flops=_rnn_flops(1),
                  doc="torch.nn.RNN (Elman) semantics; operands x[, h0]; outputs (y, h_n)."))

register_op(OpDef("concat", lambda xs, a, p: torch.cat(xs, a["dim"]), arity=(1, None), attrs={"dim": REQUIRED},
                  flops=_no_flops))
register_op(OpDef("stack", lambda xs, a, p: torch.stack(xs, a["dim"]), arity=(1, None),
                  attrs={"dim": REQUIRED}, flops=_no_flops))
register_op(OpDef("split", _split, attrs={"split_sizes": REQUIRED, "dim": REQUIRED},
                  outputs=lambda a: len(a["split_sizes"]), flops=_no_flops))
QUANT_RANGE = {"int8": (-128, 127), "uint8": (0, 255), "int32": (-(2 ** 31), 2 ** 31 - 1)}  # quantize's dtypes


def _per_axis(t: torch.Tensor, x: torch.Tensor, axis) -> torch.Tensor:
    """Broadcast a per-tensor (0-d) or per-axis (1-d) quantization parameter against ``x``."""
    if t.dim() == 0 or axis is None:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def _quantize(xs, a, p):
    x = xs[0]
    scale = _per_axis(p["scale"].to(torch.float32), x, a["axis"])
    zero = _per_axis(p["zero_point"].to(torch.float32), x, a["axis"])
    lo, hi = QUANT_RANGE[a["dtype"]]
    q = torch.clamp(torch.round(x / scale) + zero, lo, hi)  # torch.round rounds half to even, as ONNX does
    return q.to(torch_dtype(a["dtype"]))


def _dequantize(xs, a, p):
    x = xs[0]
    scale = _per_axis(p["scale"].to(torch.float32), x, a["axis"])
    zero = _per_axis(p["zero_point"].to(torch.float32), x, a["axis"])
    return (x.to(torch.float32) - zero) * scale


register_op(OpDef("quantize", _quantize, attrs={"dtype": "int8", "axis": None}, params=("scale", "zero_point"),
                  doc="q = clamp(round_half_even(x / scale) + zero_point) as int8/uint8; per-tensor, or per-channel "
                      "along `axis`."))
register_op(OpDef("dequantize", _dequantize, attrs={"axis": None}, params=("scale", "zero_point"),
                  doc="x = (q - zero_point) * scale as float32; per-tensor, or per-channel along `axis`."))


def requantize(acc: torch.Tensor, p: Mapping[str, torch.Tensor], a: Mapping[str, Any], channel_dim: int,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """int32 accumulator -> int8/uint8 with a per-channel fixed-point multiplier, integer arithmetic only.

    ``out = clamp(zp_out + ((acc * M + 2^(shift-1)) >> shift), out_min, out_max)``: ``M`` (int32, in [2^30, 2^31))
    and ``shift`` (1..62) encode the real scale ``s_x * s_w[c] / s_y = M * 2^-shift``; the product is formed in 64
    bits and rounded once, half up (TVM QNN's "UPWARD" rounding; TFLite's doubling-high-mul rounds twice). The clamp
    range carries the fused activation (relu: ``out_min = zp_out``; relu6: ``out_max = zp_out + round(6 / s_y)``).

    With a ``residual`` (an integer tensor of the output's shape at scale ``s_r``, zero point
    ``residual_zero_point``), its term joins the same rounding: ``acc * M + (r - z_r) * R`` with the int64
    ``residual_multiplier`` ``R = round(s_r / s_y * 2^shift)`` (< 2^54, so the sum stays inside 64 bits).
    """
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    multiplier = p["multiplier"].to(torch.int64).reshape(shape)
    shift = p["shift"].to(torch.int64).reshape(shape)
    rounding = torch.bitwise_left_shift(torch.ones_like(shift), shift - 1)
    total = acc.to(torch.int64) * multiplier + rounding
    if residual is not None:
        centered = residual.to(torch.int64) - a["residual_zero_point"]
        total = total + centered * p["residual_multiplier"].to(torch.int64).reshape(shape)
    scaled = torch.bitwise_right_shift(total, shift)
    out = torch.clamp(scaled + a["output_zero_point"], a["out_min"], a["out_max"])
    return out.to(torch_dtype(a["out_dtype"]))


def _exact_integer(x: torch.Tensor, zero_point: int) -> torch.Tensor:
    """``x - zero_point`` in float64: integer sums below 2^53 are exact, and CPU torch has no integer conv."""
    return x.to(torch.float64) - zero_point


def _qconv2d(xs, a, p):
    acc = F.conv2d(_exact_integer(xs[0], a["input_zero_point"]), p["weight"].to(torch.float64),
                   p["bias"].to(torch.float64), a["stride"], a["padding"], a["dilation"], a["groups"])
    residual = xs[1] if len(xs) > 1 else None
    if residual is not None and (residual.shape != acc.shape or "residual_multiplier" not in p):
        raise ValueError(f"a residual must have the output's shape {list(acc.shape)} (got {list(residual.shape)}) "
                         "and comes with a residual_multiplier param")
    return requantize(acc.to(torch.int64), p, a, channel_dim=1, residual=residual)


def _qlinear(xs, a, p):
    acc = F.linear(_exact_integer(xs[0], a["input_zero_point"]), p["weight"].to(torch.float64),
                   p["bias"].to(torch.float64))
    return requantize(acc.to(torch.int64), p, a, channel_dim=-1)


_REQUANTIZE_ATTRS = {"input_zero_point": 0, "output_zero_point": 0, "out_dtype": "uint8", "out_min": 0,
                     "out_max": 255}
_INTEGER_PARAMS = ("weight", "bias", "multiplier", "shift")
register_op(OpDef(
    "qconv2d", _qconv2d, arity=(1, 2),
    attrs={"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1, "residual_zero_point": 0}
    | _REQUANTIZE_ATTRS,
    params=_INTEGER_PARAMS, optional_params=("residual_multiplier",), flops=_conv_flops,
    doc="Integer conv2d: acc = sum (x - input_zero_point) * weight + bias in int32 (x uint8/int8, weight int8 "
        "symmetric per output channel, bias int32 at scale s_x * s_w), then `requantize` per channel to out_dtype; "
        "padding pads x with input_zero_point (real zero). An optional second operand is a residual (integer, the "
        "output's shape) added inside the requantization (`residual_zero_point`, int64 `residual_multiplier`)."))
register_op(OpDef(
    "qlinear", _qlinear, attrs=dict(_REQUANTIZE_ATTRS), params=_INTEGER_PARAMS, flops=_linear_flops,
    doc="Integer linear: acc = (x - input_zero_point) W^T + bias in int32, then `requantize` per output feature."))


def dynamic_uint8(x: torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, zero_point) quantizing ``x`` over its own [min(x, 0), max(x, 0)] to uint8, at run time: per
    tensor, or per slice along ``dim`` (kept as a size-1 dim); scale = (max - min) / 255 (1 for an all-zero
    tensor), zero_point = clamp(round(-min / scale), 0, 255)."""
    low = torch.clamp(x.amin() if dim is None else x.amin(dim, keepdim=True), max=0.0)
    high = torch.clamp(x.amax() if dim is None else x.amax(dim, keepdim=True), min=0.0)
    scale = (high - low) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.clamp(torch.round(-low / scale), 0, 255)
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 255), scale, zero_point


def dynamic_int8_product(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         dim: int | None = None) -> torch.Tensor:
    """``acc * (s_x * s_w)`` in float32 with ``acc = (q_x - z_x) q_w^T`` the exact integer sums (float64 holds
    them: |acc| < 2^53) and (q_x, s_x, z_x) = ``dynamic_uint8(x, dim)``; weight int8 (N, K), weight_scale (N,)."""
    q, scale, zero_point = dynamic_uint8(x.to(torch.float32), dim)
    acc = F.linear((q - zero_point).to(torch.float64), weight.to(torch.float64))
    return acc.to(torch.float32) * (scale * weight_scale.to(torch.float32))


def _qlinear_dynamic(xs, a, p):
    y = dynamic_int8_product(xs[0], p["weight"], p["weight_scale"])
    return apply_activation(y + p["bias"] if "bias" in p else y, a)


register_op(OpDef(
    "qlinear_dynamic", _qlinear_dynamic, attrs=dict(_FUSED_ACTIVATION), params=("weight", "weight_scale"),
    optional_params=("bias",), flops=_linear_flops,
    doc="Dynamic int8 linear: x (float) quantized per tensor at run time (`dynamic_uint8`), int8 weights "
        "symmetric per output feature (`weight_scale`), int32 accumulation, y = acc * s_x * s_w + bias in float."))


def _lstm_cell(xp, hp, h, c, a):
    i, f, g, o = (xp + hp).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru_cell(xp, hp, h, c, a):
    (xr, xz, xn), (hr, hz, hn) = xp.chunk(3, -1), hp.chunk(3, -1)
    n = torch.tanh(xn + torch.sigmoid(xr + hr) * hn)
    return n + torch.sigmoid(xz + hz) * (h - n), c  # (1 - z) n + z h


def _elman_cell(xp, hp, h, c, a):
    return (torch.tanh if a["nonlinearity"] == "tanh" else torch.relu)(xp + hp), c


def _dynamic_recurrent(cell: Callable, has_cell_state: bool) -> Reference:
    """Reference of ``qlstm_dynamic``/``qgru_dynamic``/``qrnn_dynamic``; see ``_DYNAMIC_RECURRENT_DOC``."""

    def reference(xs, a, p):
        bad = [k for k, w in p.items() if k.startswith("weight_") and w.dtype != torch.int8]
        if bad or xs[0].dtype != torch.float32:
            raise TypeError(f"needs float32 x and int8 weights (not: {', '.join(bad) or 'x'})")
        x = xs[0].transpose(0, 1) if a["batch_first"] else xs[0]  # (T, B, features)
        h0, c0 = _initial_state(xs, 1, a), _initial_state(xs, 2, a)
        directions = 2 if a["bidirectional"] else 1
        last_h, last_c = [], []
        for layer in range(a["num_layers"]):
            outputs = []
            for d in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if d else "")
                xp = dynamic_int8_product(x, p["weight_ih" + suffix], p["scale_ih" + suffix])  # x per tensor
                xp = xp + p["bias_ih" + suffix] if a["bias"] else xp
                h, c = h0[layer * directions + d], c0[layer * directions + d]
                ys = [h] * x.shape[0]
                for t in reversed(range(x.shape[0])) if d else range(x.shape[0]):
                    hp = dynamic_int8_product(h, p["weight_hh" + suffix], p["scale_hh" + suffix], dim=-1)  # per row
                    h, c = cell(xp[t], hp + p["bias_hh" + suffix] if a["bias"] else hp, h, c, a)
                    ys[t] = h
                outputs.append(torch.stack(ys))
                last_h.append(h)
                last_c.append(c)
            x = torch.cat(outputs, -1)
        y = x.transpose(0, 1) if a["batch_first"] else x
        return (y, torch.stack(last_h)) + ((torch.stack(last_c),) if has_cell_state else ())

    return reference


_DYNAMIC_RECURRENT_DOC = (
    "Dynamic int8 {base}: the operands, outputs, attrs and gate math of `{base}`; params int8 `weight_ih/hh_l{{k}}"
    "[_reverse]` (symmetric, per gate row), float32 `scale_ih/hh_...` (s_w per row) and `bias_...`. Per layer: "
    "xp = acc_x s_x s_w_ih + b_ih with x (the whole (T, B, I) layer input) quantized per tensor by `dynamic_uint8` "
    "and acc_x = (q_x - z_x) W_ih^T in int32; per step: hp = acc_h s_h s_w_hh + b_hh with h quantized per row "
    "(each sequence of the batch, each direction) by `dynamic_uint8` and acc_h = (q_h - z_h) W_hh^T in int32; then "
    "the float cell on (xp_t, hp).")
_QRNN_PARAMS = _RNN_PARAMS + tuple(n.replace("weight_", "scale_") for n in _RNN_PARAMS if n.startswith("weight_"))
for _name, _base, _cell, _arity, _outputs, _gates in (("qlstm_dynamic", "lstm", _lstm_cell, (1, 3), 3, 4),
                                                      ("qgru_dynamic", "gru", _gru_cell, (1, 2), 2, 3),
                                                      ("qrnn_dynamic", "rnn", _elman_cell, (1, 2), 2, 1)):
    register_op(OpDef(_name, _dynamic_recurrent(_cell, _base == "lstm"), arity=_arity, attrs=OPS[_base].attrs,
                      optional_params=_QRNN_PARAMS, outputs=_outputs, flops=_rnn_flops(_gates),
                      doc=_DYNAMIC_RECURRENT_DOC.format(base=_base)))


def _gather(xs, a, p):
    x, idx, dim = xs[0], p["indices"], a["dim"]
    picked = x.index_select(dim, idx.reshape(-1).to(x.device))
    return picked.reshape(tuple(x.shape[:dim]) + tuple(idx.shape) + tuple(x.shape[dim + 1:]))


register_op(OpDef("gather", _gather, attrs={"dim": REQUIRED}, params=("indices",), flops=_no_flops,
                  doc="numpy.take(x, indices, axis=dim) with constant, non-negative indices (ONNX Gather)."))
register_op(OpDef("reshape", lambda xs, a, p: torch.reshape(xs[0], a["shape"]), attrs={"shape": REQUIRED},
                  flops=_no_flops))
register_op(OpDef("flatten", lambda xs, a, p: torch.flatten(xs[0], a["start_dim"], a["end_dim"]),
                  attrs={"start_dim": 1, "end_dim": -1}, flops=_no_flops))
register_op(OpDef("permute", lambda xs, a, p: xs[0].permute(a["dims"]), attrs={"dims": REQUIRED},
                  flops=_no_flops))
register_op(OpDef("slice", lambda xs, a, p: xs[0][(slice(None),) * a["dim"] + (slice(a["start"], a["end"],
                                                                                         a["step"]),)],
                  attrs={"dim": REQUIRED, "start": 0, "end": REQUIRED, "step": 1}, flops=_no_flops,
                  doc="x[..., start:end:step, ...] along non-negative dim; start/end already clipped."))
register_op(OpDef("select", lambda xs, a, p: xs[0].select(a["dim"], a["index"]),
                  attrs={"dim": REQUIRED, "index": REQUIRED}, flops=_no_flops,
                  doc="x.select(dim, index): drops dim; index non-negative."))
register_op(OpDef("pad", lambda xs, a, p: F.pad(xs[0], a["pad"], a["mode"], a["value"] if a["mode"] == "constant"
                                                 else None),
                  attrs={"pad": REQUIRED, "mode": "constant", "value": 0.0}, flops=_no_flops,
                  doc="torch.nn.functional.pad: pad lists (left, right) pairs starting from the last dim."))
for _name, _fn in (("mean", torch.mean), ("sum", torch.sum), ("amax", torch.amax)):
    register_op(OpDef(_name, (lambda fn: lambda xs, a, p: fn(xs[0], a["dim"], keepdim=a["keepdim"]))(_fn),
                      attrs={"dim": REQUIRED, "keepdim": False}, flops=_reduce_all_flops,
                      doc="Reduction over the (non-negative) dims in `dim`."))


def op_names() -> list[str]:
    return sorted(OPS)


def describe_attrs(attrs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(attrs.items()))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else repr(v)
    return repr(v)
