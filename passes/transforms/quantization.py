"""Integer arithmetic of int8 quantization, shared by ``quantize``, ``fold-qdq`` and ``fuse-qconv-add``: value
ranges, per-channel symmetric int8 weights, the fixed-point requantization multiplier, output clamps, and the
(attrs, params) of the integer ops (``qconv2d``/``qlinear``) and of per-tensor quantize/dequantize nodes, and
the dequantize inserted after an integer value (``quantize``, ``integer-max-pool``).

The math is in ``quantize.py``'s module docstring; ``passes.ir.ops.requantize`` is its reference semantics.
"""

from __future__ import annotations

import math

import numpy as np

from passes.ir.graph import Graph, Value
from passes.ir.ops import QUANT_RANGE

RECURRENT = ("lstm", "gru", "rnn")
INTEGER_OP = {"conv2d": "qconv2d", "linear": "qlinear"}
ACTIVATION_RANGE = {"none": (-math.inf, math.inf), "relu": (0.0, math.inf), "relu6": (0.0, 6.0)}
INT32_MAX = QUANT_RANGE["int32"][1]
INTEGER_RANGE = {d: QUANT_RANGE[d] for d in ("uint8", "int8")}  # activation dtypes the integer ops read and write
QMIN, QMAX = INTEGER_RANGE["uint8"]  # the activations quantize writes
WEIGHT_MAX = 127     # symmetric int8 weights, -128 unused so that -q_w is representable


def fixed_point(real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M, shift) with real = M * 2^-shift, M an int32 in [2^30, 2^31): ``frexp`` gives real = m 2^e, m in
    [0.5, 1), so M = round(m 2^31) and shift = 31 - e (M renormalized when rounding reaches 2^31)."""
    mantissa, exponent = np.frexp(np.asarray(real, np.float64))
    multiplier = np.round(mantissa * 2.0 ** 31).astype(np.int64)
    carry = multiplier == 2 ** 31
    multiplier[carry] //= 2
    exponent = exponent + carry
    return multiplier.astype(np.int32), (31 - exponent).astype(np.int32)


def reduction_size(data: dict) -> int:
    """Products summed into one accumulator: C/groups * KH * KW for a conv, in_features for a linear, the widest
    of input and hidden size for an RNN."""
    if data["op"] in RECURRENT:
        return max(np.shape(w)[1] for k, w in data["params"].items() if k.startswith("weight_"))
    return int(np.prod(np.shape(data["params"]["weight"])[1:]))


def output_clamp(attrs: dict, scale: float, zero_point: int, dtype: str = "uint8") -> tuple[int, int]:
    """The fused activation as a clamp of q_y (a ``dtype`` integer): real bound r maps to z_y + round(r / s_y)."""
    low, high = attrs["activation_params"] if attrs["activation"] == "clamp" else ACTIVATION_RANGE[attrs["activation"]]
    q_min, q_max = INTEGER_RANGE[dtype]
    q_low = q_min if math.isinf(low) else max(q_min, zero_point + round(low / scale))
    q_high = q_max if math.isinf(high) else min(q_max, zero_point + round(high / scale))
    return q_low, max(q_low, q_high)


def per_channel_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q_w int8, s_w float64 per output channel): symmetric, s_w = max |W_c| / 127 (1 for an all-zero channel)."""
    weight = np.asarray(weight, np.float64)
    s_w = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1) / WEIGHT_MAX
    s_w = np.where(s_w > 0, s_w, 1.0)
    per_channel = (-1,) + (1,) * (weight.ndim - 1)
    return np.clip(np.round(weight / s_w.reshape(per_channel)), -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8), s_w


def integer_layer(data: dict, input_q: tuple[float, int], output_q: tuple[float, int]
                  ) -> tuple[dict, dict] | tuple[str, str]:
    """(attrs, params) of the integer op for a float conv2d/linear node, or a (reason, detail) refusal."""
    return integer_params(data, input_q, output_q, *per_channel_int8(data["params"]["weight"]), data["attrs"])


def integer_params(data: dict, input_q: tuple[float, int], output_q: tuple[float, int], q_w: np.ndarray,
                   s_w: np.ndarray, activation: dict, out_dtype: str = "uint8") -> tuple[dict, dict] | tuple[str, str]:
    """(attrs, params) of the integer op for conv2d/linear ``data`` with int8 weights ``q_w`` (scales ``s_w``) and
    the fused ``activation`` (``{"activation", "activation_params"}``) as output clamp; or a (reason, detail)
    refusal. Shared by ``quantize`` (weights quantized here, uint8 out) and ``fold-qdq`` (weights recovered from
    ONNX, uint8 or int8 out as the model says)."""
    (s_x, z_x), (s_y, z_y) = input_q, output_q
    acc_scale = s_x * s_w
    q_b = np.round(np.asarray(data["params"].get("bias", np.zeros(len(s_w))), np.float64) / acc_scale)
    if reduction_size(data) * QMAX * WEIGHT_MAX + np.abs(q_b).max() > INT32_MAX:
        return "accumulator_overflow", f"bias up to {np.abs(q_b).max():.3g} accumulator units"
    multiplier, shift = fixed_point(acc_scale / s_y)
    if shift.min() < 1 or shift.max() > 62:
        return "requantize_range", f"s_x s_w / s_y spans {acc_scale.min() / s_y:.3g}..{acc_scale.max() / s_y:.3g}"
    out_min, out_max = output_clamp(activation, s_y, z_y, out_dtype)
    attrs = {"input_zero_point": z_x, "output_zero_point": z_y, "out_dtype": out_dtype, "out_min": out_min,
             "out_max": out_max}
    if data["op"] == "conv2d":
        attrs |= {k: data["attrs"][k] for k in ("stride", "padding", "dilation", "groups")}
    params = {"weight": q_w, "bias": q_b.astype(np.int32), "multiplier": multiplier, "shift": shift}
    return attrs, params


def quant_params(scale: float, zero_point: int, dtype: str = "uint8") -> dict:
    """Params of a per-tensor quantize/dequantize node."""
    return {"scale": np.asarray(scale, np.float32), "zero_point": np.asarray(zero_point, dtype)}


def same_quant_params(data: dict, scale: float, zero_point: int) -> bool:
    params = data["params"]
    return float(params["scale"]) == float(np.float32(scale)) and int(params["zero_point"]) == zero_point


def dequantize_after(graph: Graph, q_y: Value, params: dict, origin: tuple, name: str) -> Value:
    """A dequantize of integer ``q_y`` that every former user of ``q_y`` (and the graph outputs) now reads."""
    y = graph.add_op("dequantize", [q_y], params=params, origin=origin, name=name)
    graph.replace_all_uses(q_y, y)
    graph.set_operands(y.node, [q_y])  # replace_all_uses also moved the dequantize's own operand edge
    return y
