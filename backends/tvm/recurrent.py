"""One TIR kernel per RNN layer (both directions): the whole time loop, weights packed once.

The input projection of all time steps and both directions, ``xp = X [W_ih_fwd; W_ih_bwd]^T + b``
((T*B, I) x (I, D*G)), is one dense kernel call before this one. The kernel then runs the recurrence with no
per-step kernel launches, the two directions in parallel on separate cores:

    for d in parallel(directions):                # forward, and backward over reversed time
        h, c = h0[d], c0[d]
        for step in 0..T-1:  t = step if d == 0 else T-1-step
            for each block of gate rows (``gate_block``):   # a GEMV tile that stays in vector registers
                acc = xp[t, d*G + block]  (GRU: b_hh[block])
                for k in 0..H-1: acc += h[k] * W_hh^T[d, k, block]
            LSTM: c = sigmoid(f) * c + sigmoid(i) * tanh(g); h = sigmoid(o) * tanh(c)      (gates i, f, g, o)
            GRU:  r = sigmoid(xr + hr); z = sigmoid(xz + hz); n = tanh(xn + r * hn); h = n + z * (h - n)
            RNN:  h = tanh(acc) (or relu)
            y[t, d*H:(d+1)*H] = h

``W_hh^T`` is laid out (D, H, G) so each rank-1 update of a gate block is a contiguous vector FMA. The three
cells share the projection and state handling (TVMScript macros) and differ only in their gate math. Gates use the
vectorizable rational tanh (``kernels.fast_tanh``, a few ulp): exp-based ones are scalarized by LLVM.

``integer_recurrent_kernel`` is the same loop for ``qlstm_dynamic``/``qgru_dynamic``/``qrnn_dynamic``
(``passes.ir.ops``): the input projection ``xp`` comes from the dynamic int8 dense path, and each step's
``h W_hh^T`` is an integer product with h quantized at run time, per row:

    lo, hi = min(h, 0), max(h, 0);  s = (hi - lo) / 255 (1 if 0);  z = clamp(round(-lo / s), 0, 255)
    q = clamp(round(h / s) + z, 0, 255)                                          # uint8, ``ops.dynamic_uint8``
    acc[g] = sum_k q[k] W[g, k] - z * sum_k W[g, k]  = sum_k (q[k] - z) W[g, k]   (int32, exact)
    hp[g] = float(acc[g]) * (s * s_w[g]) + b_hh[g]                                # the reference's float order

``W_hh`` is int8, packed (D, Gp/GB, Hp/4, GB/16, 16, 4) (gates padded to 16, hidden to 4, zero filled): for each
4 hidden units a block's 16-gate groups are consecutive 64-byte rows, the operand of ``vpdpbusd`` (16 int32
lanes += 4 u8 x s8 products each, the 4 bytes of q broadcast to every lane) on VNNI CPUs, and of a widening
multiply-add over the 16 lanes elsewhere. The zero point's cross term uses the row sums, folded at compile time.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from backends.tvm.kernels import ceil_to, fast_sigmoid, fast_tanh, largest_divisor
from backends.tvm.qkernels import DEPTH, LANES, vpdpbusd

GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def gate_block(gates: int, lanes: int = 16) -> int:
    """Gate rows accumulated in registers at once: 8 vector registers (128 floats on AVX-512, 64 on AVX2, whose
    16 registers would all be accumulators at 128)."""
    return largest_divisor(gates, 8 * lanes)


def cell_macro(kind: str, hidden: int, stride: int, nonlinearity: str):
    """The gate math of one step, given ``pre`` (LSTM/RNN: every gate's pre-activation; GRU: W_hh h + b_hh, the
    input part read from xp, whose direction ``d`` starts at column ``d * stride``)."""
    H, G = hidden, stride
    relu = nonlinearity == "relu"

    @T.macro
    def cell(xp, b_hh, pre, n, h, c, y, t, b, d):
        if kind == "lstm":
            for j in T.vectorized(H):
                c[j] = fast_sigmoid(pre[H + j]) * c[j] + fast_sigmoid(pre[j]) * fast_tanh(pre[2 * H + j])
                h[j] = fast_sigmoid(pre[3 * H + j]) * fast_tanh(c[j])
                y[t, b, d * H + j] = h[j]
        elif kind == "gru":  # pre holds W_hh h + b_hh; the input part comes from xp
            for j in T.vectorized(H):
                n[j] = fast_tanh(xp[t, b, d * G + 2 * H + j]
                                 + fast_sigmoid(xp[t, b, d * G + j] + pre[j]) * pre[2 * H + j])
            for j in T.vectorized(H):
                h[j] = n[j] + fast_sigmoid(xp[t, b, d * G + H + j] + pre[H + j]) * (h[j] - n[j])
                y[t, b, d * H + j] = h[j]
        else:
            for j in T.vectorized(H):
                h[j] = T.max(pre[j], T.float32(0)) if relu else fast_tanh(pre[j])
                y[t, b, d * H + j] = h[j]

    return cell


def recurrent_kernel(kind: str, steps: int, batch: int, hidden: int, directions: int,
                     nonlinearity: str = "tanh", lanes: int = 16) -> tirx.PrimFunc:
    """PrimFunc ``(xp, w_hh_t, b_hh, h0, c0, y, h_n, c_n)`` with shapes xp (T, B, D*G), w_hh_t (D, H, G),
    b_hh (1, B, D*G) [GRU only; the others fold it into xp], h0/c0 (D, B, H), y (T, B, D*H), h_n/c_n (D, B, H)."""
    H, D = hidden, directions
    G = GATES[kind] * H
    GB = gate_block(G, lanes)
    blocks = G // GB
    last = steps - 1
    cell = cell_macro(kind, H, G, nonlinearity)

    @T.macro
    def project(out, acc, src, row, b, d, w, h):
        """out = src[row, b, d's gates] + W_hh h, one register block of gates at a time."""
        for blk in range(blocks):
            for g in T.vectorized(GB):
                acc[g] = src[row, b, d * G + blk * GB + g]
            for k in range(H):
                for g in T.vectorized(GB):
                    acc[g] = acc[g] + h[k] * w[d, k, blk * GB + g]
            for g in T.vectorized(GB):
                out[blk * GB + g] = acc[g]

    @T.prim_func
    def kernel(xp: T.Buffer((steps, batch, D * G), "float32"), w: T.Buffer((D, H, G), "float32"),
               b_hh: T.Buffer((1, batch, D * G), "float32"), h0: T.Buffer((D, batch, H), "float32"),
               c0: T.Buffer((D, batch, H), "float32"), y: T.Buffer((steps, batch, D * H), "float32"),
               h_n: T.Buffer((D, batch, H), "float32"), c_n: T.Buffer((D, batch, H), "float32")):
        T.func_attr({"tirx.noalias": True})
        for d in T.parallel(D):
            pre = T.alloc_buffer((G,), "float32")
            acc = T.alloc_buffer((GB,), "float32", scope="local")
            n = T.alloc_buffer((H,), "float32")
            h = T.alloc_buffer((H,), "float32")
            c = T.alloc_buffer((H,), "float32")
            for b in range(batch):
                for j in T.vectorized(H):
                    h[j] = h0[d, b, j]
                    c[j] = c0[d, b, j]
                for step in range(steps):
                    if kind == "gru":
                        project(pre, acc, b_hh, 0, b, d, w, h)
                    else:
                        project(pre, acc, xp, step + d * (last - 2 * step), b, d, w, h)
                    cell(xp, b_hh, pre, n, h, c, y, step + d * (last - 2 * step), b, d)
                for j in T.vectorized(H):
                    h_n[d, b, j] = h[j]
                    c_n[d, b, j] = c[j]

    return kernel


def integer_layout(kind: str, hidden: int) -> tuple[int, int, int]:
    """(Gp, Hp, GB): gate rows padded to the 16 lanes, hidden units to the 4 bytes of one lane, and the gate block
    (up to 8 registers of 16 int32 accumulators) that divides Gp."""
    padded_gates, padded_hidden = ceil_to(GATES[kind] * hidden, LANES), ceil_to(hidden, DEPTH)
    return padded_gates, padded_hidden, LANES * largest_divisor(padded_gates // LANES, 8)


def pack_integer_weights(kind: str, weights: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per direction int8 W_hh (G, H) -> (packed (D, Gp/GB, Hp/4, GB/16, 16, 4) int8, row sums (D, Gp) int32):
    packed[d, blk, kq, j, l, i] = W[d][blk GB + 16 j + l, 4 kq + i], zero padded."""
    hidden = weights[0].shape[1]
    padded_gates, padded_hidden, block = integer_layout(kind, hidden)
    padded = np.zeros((len(weights), padded_gates, padded_hidden), np.int8)
    for d, weight in enumerate(weights):
        padded[d, :weight.shape[0], :hidden] = weight
    blocks = padded.reshape(len(weights), padded_gates // block, block // LANES, LANES, padded_hidden // DEPTH, DEPTH)
    return (np.ascontiguousarray(blocks.transpose(0, 1, 4, 2, 3, 5)),
            padded.astype(np.int32).sum(axis=2).astype(np.int32))


def integer_recurrent_kernel(kind: str, steps: int, batch: int, hidden: int, directions: int,
                             nonlinearity: str = "tanh", vnni: bool = False) -> tirx.PrimFunc:
    """PrimFunc ``(xp, w, row_sum, scale, b_hh, h0, c0, y, h_n, c_n)``: xp (T, B, D*Gp) float32 (x's projection
    + b_ih, padded gate rows), w packed int8 (``pack_integer_weights``), row_sum / scale (s_w) / b_hh (D, Gp),
    h0/c0 (D, B, H), y (T, B, D*H), h_n/c_n (D, B, H). ``vnni``: the product is ``vpdpbusd``."""
    H, D = hidden, directions
    Gp, Hp, GB = integer_layout(kind, hidden)
    blocks, groups, quads = Gp // GB, GB // LANES, Hp // DEPTH
    HL = largest_divisor(H, LANES)  # lanes of the min/max reduction over h
    last = steps - 1
    cell = cell_macro(kind, H, Gp, nonlinearity)

    @T.macro
    def quantize_h(h, q, lo, hi, sz):
        """sz = (s, z) and q = ``ops.dynamic_uint8(h)``, in the reference's float32 operation order."""
        for l in T.vectorized(HL):
            lo[l] = T.float32(0)
            hi[l] = T.float32(0)
        for ko in range(H // HL):
            for l in T.vectorized(HL):
                lo[l] = T.min(lo[l], h[ko * HL + l])
                hi[l] = T.max(hi[l], h[ko * HL + l])
        for l in range(1, HL):
            lo[0] = T.min(lo[0], lo[l])
            hi[0] = T.max(hi[0], hi[l])
        sz[0] = (hi[0] - lo[0]) / T.float32(255)
        sz[0] = T.if_then_else(sz[0] > T.float32(0), sz[0], T.float32(1))
        sz[1] = T.min(T.max(T.round(-lo[0] / sz[0]), T.float32(0)), T.float32(255))
        for k in T.vectorized(H):
            q[k] = T.Cast("uint8", T.min(T.max(T.round(h[k] / sz[0]) + sz[1], T.float32(0)), T.float32(255)))

    @T.macro
    def product(acc, q, w, d, blk):
        """acc[0:GB] = sum_k q[k] W[blk GB + g, k] in int32."""
        for g in T.vectorized(GB):
            acc[g] = 0
        for kq in range(quads):
            if vnni:
                for j in T.unroll(groups):
                    acc[T.ramp(j * LANES, 1, LANES)] = vpdpbusd(acc.vload([j * LANES], dtype="int32x16"),
                                                                q.vload([kq * DEPTH], "uint8x4"),
                                                                w.vload([d, blk, kq, j, 0, 0], dtype="int8x64"))
            else:
                for i in range(DEPTH):
                    for j in T.unroll(groups):
                        for lane in T.vectorized(LANES):
                            acc[j * LANES + lane] = acc[j * LANES + lane] + T.Cast("int32", q[kq * DEPTH + i]) \
                                * T.Cast("int32", w[d, blk, kq, j, lane, i])

    @T.macro
    def project(out, acc, xp, row, b, d, q, w, row_sum, scale, b_hh, sz):
        """out = [xp[row, b, d's gates] +] (float(acc - z row_sum) (s_h s_w) + b_hh), a gate block at a time."""
        for blk in range(blocks):
            product(acc, q, w, d, blk)
            for g in T.vectorized(GB):
                out[blk * GB + g] = (T.Cast("float32", acc[g] - T.Cast("int32", sz[1]) * row_sum[d, blk * GB + g])
                                     * (sz[0] * scale[d, blk * GB + g]) + b_hh[d, blk * GB + g])
            if kind != "gru":
                for g in T.vectorized(GB):
                    out[blk * GB + g] = xp[row, b, d * Gp + blk * GB + g] + out[blk * GB + g]

    @T.prim_func
    def kernel(xp: T.Buffer((steps, batch, D * Gp), "float32"),
               w: T.Buffer((D, blocks, quads, groups, LANES, DEPTH), "int8"),
               row_sum: T.Buffer((D, Gp), "int32"), scale: T.Buffer((D, Gp), "float32"),
               b_hh: T.Buffer((D, Gp), "float32"), h0: T.Buffer((D, batch, H), "float32"),
               c0: T.Buffer((D, batch, H), "float32"), y: T.Buffer((steps, batch, D * H), "float32"),
               h_n: T.Buffer((D, batch, H), "float32"), c_n: T.Buffer((D, batch, H), "float32")):
        T.func_attr({"tirx.noalias": True})
        for d in T.parallel(D):
            pre = T.alloc_buffer((Gp,), "float32")
            acc = T.alloc_buffer((GB,), "int32", scope="local")
            q = T.alloc_buffer((Hp,), "uint8")
            lo = T.alloc_buffer((HL,), "float32")
            hi = T.alloc_buffer((HL,), "float32")
            sz = T.alloc_buffer((2,), "float32")
            n = T.alloc_buffer((H,), "float32")
            h = T.alloc_buffer((H,), "float32")
            c = T.alloc_buffer((H,), "float32")
            for k in range(Hp):
                q[k] = T.uint8(0)  # the padding stays 0 (its weights are 0 too)
            for b in range(batch):
                for j in T.vectorized(H):
                    h[j] = h0[d, b, j]
                    c[j] = c0[d, b, j]
                for step in range(steps):
                    quantize_h(h, q, lo, hi, sz)
                    project(pre, acc, xp, step + d * (last - 2 * step), b, d, q, w, row_sum, scale, b_hh, sz)
                    cell(xp, b_hh, pre, n, h, c, y, step + d * (last - 2 * step), b, d)
                for j in T.vectorized(H):
                    h_n[d, b, j] = h[j]
                    c_n[d, b, j] = c[j]

    return kernel
