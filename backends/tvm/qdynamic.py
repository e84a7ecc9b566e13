"""Dynamic int8 dense kernel: ``qlinear_dynamic`` and the input projections of ``q{lstm,gru,rnn}_dynamic``.

The activations arrive quantized at run time (``passes.ir.ops.dynamic_uint8``: uint8 ``q`` with scale ``s`` and
zero point ``z``, computed in Relax); the kernel computes, for every row ``m`` and output ``n``,

    acc[m, n] = sum_k q[m, k] W[n, k] - z * sum_k W[n, k]  = sum_k (q[m, k] - z) W[n, k]     (int32, exact)
    y[m, n]   = float(acc[m, n]) * (s * s_w[n]) + b[n]                                       (the reference's order)

so it equals ``passes.ir.ops.dynamic_int8_product`` (+ bias) bit for bit. ``W`` is int8, packed at compile time
as (Np/NB, Kp/4, NB/16, 16, 4) (outputs padded to 16, the reduction to 4, zero filled): for each 4 inputs the
NB outputs of a tile are NB/16 consecutive 64-byte rows, the operand of ``vpdpbusd`` (VNNI: 16 int32 lanes += 4
u8 x s8 products each; the row's 4 bytes of q broadcast to every lane). Register tile: up to 4 rows x 64 outputs
(16 accumulators), tiles in parallel. Without VNNI: a widening multiply-add over the 16 lanes per input byte.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from backends.tvm.kernels import ceil_to, largest_divisor
from backends.tvm.qkernels import DEPTH, LANES, vpdpbusd

MAX_ROWS, MAX_GROUPS = 4, 4  # register tile: 4 rows x 4 groups of 16 int32 lanes = 16 zmm accumulators


def pack_int8(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 W (N, K) -> (packed (Np/block, Kp/4, block/16, 16, 4), row sums (Np,) int32), zero padded:
    packed[nb, kq, j, lane, i] = W[nb block + 16 j + lane, 4 kq + i]."""
    n, k = weight.shape
    padded_n, padded_k = ceil_to(n, block), ceil_to(k, DEPTH)
    padded = np.zeros((padded_n, padded_k), np.int8)
    padded[:n, :k] = weight
    blocks = padded.reshape(padded_n // block, block // LANES, LANES, padded_k // DEPTH, DEPTH)
    return np.ascontiguousarray(blocks.transpose(0, 3, 1, 2, 4)), padded.astype(np.int32).sum(axis=1).astype(np.int32)


def dense_layout(rows: int, outputs: int) -> tuple[int, int, int]:
    """(row tile, output tile NB, padded outputs Np)."""
    padded = ceil_to(outputs, LANES)
    return largest_divisor(rows, MAX_ROWS), LANES * largest_divisor(padded // LANES, MAX_GROUPS), padded


def dynamic_dense_kernel(rows: int, inputs: int, outputs: int, vnni: bool) -> tirx.PrimFunc:
    """PrimFunc ``(q, sz, w, row_sum, w_scale, bias, y)``: q (M, Kp) uint8 (zero padded), sz = (s, z) float32,
    w from ``pack_int8(W, NB)``, row_sum / w_scale / bias (Np,), y (M, Np) float32."""
    RB, NB, Np = dense_layout(rows, outputs)
    Kp = ceil_to(inputs, DEPTH)
    groups, quads, col_tiles = NB // LANES, Kp // DEPTH, Np // NB
    tiles = rows // RB * col_tiles

    @T.prim_func
    def kernel(q: T.Buffer((rows, Kp), "uint8"), sz: T.Buffer((2,), "float32"),
               w: T.Buffer((col_tiles, quads, groups, LANES, DEPTH), "int8"), row_sum: T.Buffer((Np,), "int32"),
               w_scale: T.Buffer((Np,), "float32"), bias: T.Buffer((Np,), "float32"),
               y: T.Buffer((rows, Np), "float32")):
        T.func_attr({"tirx.noalias": True})
        for tile in T.parallel(tiles):
            acc = T.alloc_buffer((RB * NB,), "int32", scope="local")
            for r in T.unroll(RB):
                for g in T.vectorized(NB):
                    acc[r * NB + g] = 0
            for kq in range(quads):
                for r in T.unroll(RB):
                    if vnni:
                        for j in T.unroll(groups):
                            acc[T.ramp(r * NB + j * LANES, 1, LANES)] = vpdpbusd(
                                acc.vload([r * NB + j * LANES], dtype="int32x16"),
                                q.vload([tile // col_tiles * RB + r, kq * DEPTH], "uint8x4"),
                                w.vload([tile % col_tiles, kq, j, 0, 0], dtype="int8x64"))
                    else:
                        for i in range(DEPTH):
                            for j in T.unroll(groups):
                                for lane in T.vectorized(LANES):
                                    acc[r * NB + j * LANES + lane] = acc[r * NB + j * LANES + lane] \
                                        + T.Cast("int32", q[tile // col_tiles * RB + r, kq * DEPTH + i]) \
                                        * T.Cast("int32", w[tile % col_tiles, kq, j, lane, i])
            for r in T.unroll(RB):
                for g in T.vectorized(NB):
                    y[tile // col_tiles * RB + r, tile % col_tiles * NB + g] = T.Cast(
                        "float32", acc[r * NB + g] - T.Cast("int32", sz[1]) * row_sum[tile % col_tiles * NB + g]) \
                        * (sz[0] * w_scale[tile % col_tiles * NB + g]) + bias[tile % col_tiles * NB + g]

    return kernel.with_attrs({"tir.is_scheduled": True, "op_pattern": 8})
