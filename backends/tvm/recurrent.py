"""One TIR kernel per RNN layer (both directions): the whole time loop, weights packed once.

The input projection of all time steps and both directions, ``xp = X [W_ih_fwd; W_ih_bwd]^T + b``
((T*B, I) x (I, D*G)), is one dense kernel call before this one. The kernel then runs the recurrence with no
per-step kernel launches, the two directions in parallel on separate cores:

    for d in parallel(directions):                # forward, and backward over reversed time
        h, c = h0[d], c0[d]
        for step in 0..T-1:  t = step if d == 0 else T-1-step
            for each block of GATE_BLOCK gate rows:   # a GEMV tile that stays in vector registers
                acc = xp[t, d*G + block]  (GRU: b_hh[block])
                for k in 0..H-1: acc += h[k] * W_hh^T[d, k, block]
            LSTM: c = sigmoid(f) * c + sigmoid(i) * tanh(g); h = sigmoid(o) * tanh(c)      (gates i, f, g, o)
            GRU:  r = sigmoid(xr + hr); z = sigmoid(xz + hz); n = tanh(xn + r * hn); h = n + z * (h - n)
            RNN:  h = tanh(acc) (or relu)
            y[t, d*H:(d+1)*H] = h

``W_hh^T`` is laid out (D, H, G) so each rank-1 update of a gate block is a contiguous vector FMA. The three
cells share the projection and state handling (TVMScript macros) and differ only in their gate math. Gates use the
vectorizable rational tanh (``kernels.fast_tanh``, a few ulp): exp-based ones are scalarized by LLVM.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from backends.tvm.kernels import fast_sigmoid, fast_tanh

GATES = {"lstm": 4, "gru": 3, "rnn": 1}
GATE_BLOCK = 128  # 8 AVX-512 registers of accumulators


def gate_block(gates: int) -> int:
    return max(d for d in range(1, min(gates, GATE_BLOCK) + 1) if gates % d == 0)


def recurrent_kernel(kind: str, steps: int, batch: int, hidden: int, directions: int,
                     nonlinearity: str = "tanh") -> tirx.PrimFunc:
    """PrimFunc ``(xp, w_hh_t, b_hh, h0, c0, y, h_n, c_n)`` with shapes xp (T, B, D*G), w_hh_t (D, H, G),
    b_hh (1, B, D*G) [GRU only; the others fold it into xp], h0/c0 (D, B, H), y (T, B, D*H), h_n/c_n (D, B, H)."""
    H, D = hidden, directions
    G = GATES[kind] * H
    GB = gate_block(G)
    blocks = G // GB
    last = steps - 1
    relu = nonlinearity == "relu"

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
