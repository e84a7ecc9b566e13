"""One TIR kernel per RNN layer and direction: the whole time loop, weights packed once.

The input projection of all time steps, ``xp = X W_ih^T + b`` ((T*B, I) x (I, G*H)), is one matmul outside this
kernel. The kernel then runs the recurrence in place, with no per-step kernel launches:

    h, c = h0, c0
    for step in 0..T-1 (reversed for the backward direction):
        gates[0:G*H] = xp[t] (+ h W_hh^T, as H rank-1 updates of a vector: gates += h[k] * W_hh^T[k, :])
        LSTM: c = sigmoid(f) * c + sigmoid(i) * tanh(g); h = sigmoid(o) * tanh(c)        (gates i, f, g, o)
        GRU:  r = sigmoid(xr + hr); z = sigmoid(xz + hz); n = tanh(xn + r * hn); h = n + z * (h - n)
        RNN:  h = tanh(xp + h W_hh^T) (or relu)
        y[t] = h

``W_hh^T`` is laid out (H, G*H) so each rank-1 update is a contiguous vector FMA over all gates.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def recurrent_kernel(kind: str, steps: int, batch: int, hidden: int, reverse: bool,
                     nonlinearity: str = "tanh") -> tirx.PrimFunc:
    """PrimFunc ``(xp, w_hh_t, b_hh, h0, c0, y, h_n, c_n)``; ``b_hh`` is used by GRU only (others fold it in xp)."""
    H = hidden
    G = GATES[kind] * H
    last = steps - 1

    def time_index(step):
        return last - step if reverse else step

    if kind == "lstm":
        @T.prim_func
        def kernel(xp: T.Buffer((steps, batch, G), "float32"), w: T.Buffer((H, G), "float32"),
                   b_hh: T.Buffer((G,), "float32"), h0: T.Buffer((batch, H), "float32"),
                   c0: T.Buffer((batch, H), "float32"), y: T.Buffer((steps, batch, H), "float32"),
                   h_n: T.Buffer((batch, H), "float32"), c_n: T.Buffer((batch, H), "float32")):
            T.func_attr({"tirx.noalias": True})
            gates = T.alloc_buffer((G,), "float32", scope="local")
            h = T.alloc_buffer((H,), "float32")
            c = T.alloc_buffer((H,), "float32")
            for b in range(batch):
                for j in T.vectorized(H):
                    h[j] = h0[b, j]
                    c[j] = c0[b, j]
                for step in range(steps):
                    for g in T.vectorized(G):
                        gates[g] = xp[time_index(step), b, g]
                    for k in range(H):
                        for g in T.vectorized(G):
                            gates[g] = gates[g] + h[k] * w[k, g]
                    for j in T.vectorized(H):
                        c[j] = T.sigmoid(gates[H + j]) * c[j] + T.sigmoid(gates[j]) * T.tanh(gates[2 * H + j])
                        h[j] = T.sigmoid(gates[3 * H + j]) * T.tanh(c[j])
                        y[time_index(step), b, j] = h[j]
                for j in T.vectorized(H):
                    h_n[b, j] = h[j]
                    c_n[b, j] = c[j]
        return kernel

    if kind == "gru":
        @T.prim_func
        def kernel(xp: T.Buffer((steps, batch, G), "float32"), w: T.Buffer((H, G), "float32"),
                   b_hh: T.Buffer((G,), "float32"), h0: T.Buffer((batch, H), "float32"),
                   c0: T.Buffer((batch, H), "float32"), y: T.Buffer((steps, batch, H), "float32"),
                   h_n: T.Buffer((batch, H), "float32"), c_n: T.Buffer((batch, H), "float32")):
            T.func_attr({"tirx.noalias": True})
            hp = T.alloc_buffer((G,), "float32", scope="local")
            n = T.alloc_buffer((H,), "float32", scope="local")
            h = T.alloc_buffer((H,), "float32")
            for b in range(batch):
                for j in T.vectorized(H):
                    h[j] = h0[b, j]
                for step in range(steps):
                    for g in T.vectorized(G):
                        hp[g] = b_hh[g]
                    for k in range(H):
                        for g in T.vectorized(G):
                            hp[g] = hp[g] + h[k] * w[k, g]
                    for j in T.vectorized(H):
                        n[j] = T.tanh(xp[time_index(step), b, 2 * H + j]
                                      + T.sigmoid(xp[time_index(step), b, j] + hp[j]) * hp[2 * H + j])
                    for j in T.vectorized(H):
                        h[j] = n[j] + T.sigmoid(xp[time_index(step), b, H + j] + hp[H + j]) * (h[j] - n[j])
                        y[time_index(step), b, j] = h[j]
                for j in T.vectorized(H):
                    h_n[b, j] = h[j]
                    c_n[b, j] = T.float32(0)
        return kernel

    relu = nonlinearity == "relu"

    @T.prim_func
    def kernel(xp: T.Buffer((steps, batch, G), "float32"), w: T.Buffer((H, G), "float32"),
               b_hh: T.Buffer((G,), "float32"), h0: T.Buffer((batch, H), "float32"),
               c0: T.Buffer((batch, H), "float32"), y: T.Buffer((steps, batch, H), "float32"),
               h_n: T.Buffer((batch, H), "float32"), c_n: T.Buffer((batch, H), "float32")):
        T.func_attr({"tirx.noalias": True})
        pre = T.alloc_buffer((G,), "float32", scope="local")
        h = T.alloc_buffer((H,), "float32")
        for b in range(batch):
            for j in T.vectorized(H):
                h[j] = h0[b, j]
            for step in range(steps):
                for g in T.vectorized(G):
                    pre[g] = xp[time_index(step), b, g]
                for k in range(H):
                    for g in T.vectorized(G):
                        pre[g] = pre[g] + h[k] * w[k, g]
                for j in T.vectorized(H):
                    h[j] = T.max(pre[j], T.float32(0)) if relu else T.tanh(pre[j])
                    y[time_index(step), b, j] = h[j]
            for j in T.vectorized(H):
                h_n[b, j] = h[j]
                c_n[b, j] = T.float32(0)
    return kernel
