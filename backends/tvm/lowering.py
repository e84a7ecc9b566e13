"""The lowering context and registry (``LowerContext``, ``LOWERINGS``, ``@lowering``) and the kernel calls that
several op groups share (our dense kernel, the dynamic int8 dense). ``lower.py`` (most ops and the driver) and
``lower_recurrent.py`` (LSTM/GRU/RNN) build on this module; it imports neither.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tvm import relax
from tvm.relax import op as R

from backends.tvm.kernels import default_dense_tile, dense_kernel, dense_spec, pack_dense_weight
from backends.tvm.qdynamic import DEPTH, dense_layout, dynamic_dense_kernel, pack_int8
from backends.tvm.select import Choice, Selection
from backends.tvm.target import Target
from passes.ir.graph import Graph, IRError, TensorType, Value


class LoweringError(IRError):
    """An op, or an op configuration, that this backend cannot lower; names the node and its origin."""


@dataclass
class LowerContext:
    """What a lowering sees: the block builder, the graph and the node being lowered."""

    bb: relax.BlockBuilder
    graph: Graph
    node: str
    target: Target
    selection: Selection  # which kernel lowers each node (``select.select_kernels``)
    tiles: Mapping[Any, Any] = field(default_factory=dict)  # kernel spec -> tuned Tile (backends.tvm.tune)

    @property
    def target_kind(self) -> str:
        return self.target.kind

    @property
    def cores(self) -> int:
        return self.target.cores

    @property
    def vnni(self) -> bool:
        """The CPU target has AVX-512 VNNI (integer kernels use vpdpbusd)."""
        return self.target.vnni

    @property
    def choice(self) -> Choice:
        """The kernel chosen for this node."""
        return self.selection[self.node]

    @property
    def nhwc(self) -> frozenset[Value]:
        """Values held NHWC between our integer conv kernels (``select.nhwc_values``)."""
        return self.selection.nhwc

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


def call_dense_kernel(ctx: LowerContext, x: relax.Expr, in_shape: tuple[int, ...], weight: np.ndarray,
                      bias: np.ndarray | None, activation: str = "none", activation_params: tuple = (),
                      dtype: str = "float32") -> relax.Expr:
    """``act(x W^T + b)`` through our dense kernel; leading dims of ``x`` are flattened into rows."""
    spec = dense_spec(in_shape, weight.shape, bias is not None, activation, activation_params, dtype,
                      ctx.target.lanes)
    m, k, n = spec.m, spec.k, spec.n
    name = f"dense_{ctx.node}_{len(ctx.bb.get().functions)}"
    tile = ctx.tiles.get(spec) or default_dense_tile(spec)
    func = dense_kernel(spec, ctx.cores, tile).with_attr("global_symbol", name)
    gv = ctx.bb.add_func(func, name)
    args = [ctx.emit(R.reshape(x, (m, k))), ctx.const(pack_dense_weight(weight, tile.cols), dtype)]
    if bias is not None:
        args.append(ctx.const(bias, "float32"))  # kernels take an fp32 bias
    y = ctx.emit(R.call_tir(gv, relax.Tuple(args), out_ty=relax.TensorType((m, n), dtype)))
    return ctx.emit(R.reshape(y, (*in_shape[:-1], n)))


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
