"""A persistent CUDA kernel per RNN layer: one launch runs the whole sequence, both directions concurrently.

The recurrence of ``recurrent.recurrent_kernel`` (the CPU loop, which also projects x itself); here the input
projection of every step and direction, ``xp = X [W_ih_fwd; W_ih_bwd]^T + b``, is one matmul before the call. Why: the
unrolled per-step Relax graph costs several kernel launches per step (15.6 ms for the 100-step BiLSTM on an H200,
cuDNN 0.85 ms); a step's own work is one (1 x H) x (H x G) GEMV, microseconds.

One thread block per (direction, batch row), one thread per gate row g (G = gates * H <= 1024 threads), so the
steps' dependency h_t -> h_{t+1} stays inside one block and ``__syncthreads`` is the only barrier (no grid-wide
synchronization, no cooperative launch):

    block (d, b): thread g holds W_hh^T[d, k, g] for k < R in registers (R = min(H, REGISTER_FLOATS // G)),
                  h lives in shared memory, c[g] in a register of thread g < H
    for step in 0..T-1:  t = step if d == 0 else T-1-step
        pre[g] = xp[t, b, d*G + g] (GRU: b_hh[g]) + sum_k h[k] W_hh^T[d, k, g]   # k >= R read through L1
        __syncthreads()
        thread j < H:   LSTM: c = s(f) c + s(i) tanh(gg); h[j] = s(o) tanh(c)      (gates i, f, g, o)
                        GRU:  n = tanh(xn + s(xr + hr) hn); h[j] = n + s(xz + hz) (h[j] - n)
                        RNN:  h[j] = tanh(pre) or relu(pre);      y[t, b, d*H + j] = h[j]
        __syncthreads()

``W_hh^T`` is laid out (D, H, G), so the G threads' loads of one k are one coalesced row. The sum runs in
``SPLIT`` interleaved partial accumulators (k mod SPLIT) to break the FMA dependency chain. s(x) = 1 / (1 + e^-x)
and tanh are CUDA's ``expf``/``tanhf`` (full float32 precision, not the fast-math intrinsics).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from backends.tvm.recurrent import GATES

MAX_THREADS = 1024  # threads per block on every CUDA GPU since Fermi
REGISTER_FLOATS = 32768  # half of an SM's 64K 32-bit registers hold weights; the other half is the kernel's own
SPLIT = 4  # partial sums of the recurrent dot product


def fits(kind: str, hidden: int) -> bool:
    """Whether one block can hold a layer: one thread per gate row."""
    return GATES[kind] * hidden <= MAX_THREADS


def _sigmoid(x):
    return T.float32(1) / (T.float32(1) + T.exp(-x))


def cuda_recurrent_kernel(kind: str, steps: int, batch: int, hidden: int, directions: int,
                          nonlinearity: str = "tanh") -> tirx.PrimFunc:
    """PrimFunc ``(xp, w_hh_t, b_hh, h0, c0, y, h_n, c_n)``: xp
    (T, B, D*G), w_hh_t (D, H, G), b_hh (1, B, D*G) [GRU only; the others fold it into xp], h0/c0 (D, B, H),
    y (T, B, D*H), h_n/c_n (D, B, H). Scheduled already (thread bindings are explicit)."""
    if not fits(kind, hidden):
        raise ValueError(f"{kind} with hidden size {hidden}: {GATES[kind]} x {hidden} gate rows exceed one CUDA "
                         f"block's {MAX_THREADS} threads")
    H, D, B = hidden, directions, batch
    G = GATES[kind] * H
    R = min(H, REGISTER_FLOATS // G) // SPLIT * SPLIT  # weights held in registers, a multiple of SPLIT
    rest = H - R
    held = max(R, 1)
    last = steps - 1
    relu = nonlinearity == "relu"

    @T.prim_func
    def kernel(xp: T.Buffer((steps, B, D * G), "float32"), w: T.Buffer((D, H, G), "float32"),
               b_hh: T.Buffer((1, B, D * G), "float32"), h0: T.Buffer((D, B, H), "float32"),
               c0: T.Buffer((D, B, H), "float32"), y: T.Buffer((steps, B, D * H), "float32"),
               h_n: T.Buffer((D, B, H), "float32"), c_n: T.Buffer((D, B, H), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})  # dlight's key in TVM 0.27 (not "tir.")
        for blk in T.thread_binding(D * B, thread="blockIdx.x"):
            for g in T.thread_binding(G, thread="threadIdx.x"):
                h = T.alloc_buffer((H,), "float32", scope="shared")
                pre = T.alloc_buffer((G,), "float32", scope="shared")
                wr = T.alloc_buffer((held,), "float32", scope="local")
                acc = T.alloc_buffer((SPLIT,), "float32", scope="local")
                c = T.alloc_buffer((1,), "float32", scope="local")
                for k in T.unroll(R):
                    wr[k] = w[blk // B, k, g]
                if g < H:
                    h[g] = h0[blk // B, blk % B, g]
                    c[0] = c0[blk // B, blk % B, g]
                T.tvm_storage_sync("shared")
                for step in range(steps):
                    for s in T.unroll(SPLIT):
                        acc[s] = T.float32(0)
                    for ko in T.unroll(R // SPLIT):
                        for s in T.unroll(SPLIT):
                            acc[s] = acc[s] + h[ko * SPLIT + s] * wr[ko * SPLIT + s]
                    for ko in range(rest // SPLIT):  # not unrolled: nvcc would hoist every load and spill
                        for s in T.unroll(SPLIT):
                            acc[s] = acc[s] + h[R + ko * SPLIT + s] * w[blk // B, R + ko * SPLIT + s, g]
                    for k in T.unroll(rest % SPLIT):
                        acc[0] = acc[0] + h[H - rest % SPLIT + k] * w[blk // B, H - rest % SPLIT + k, g]
                    if kind == "gru":
                        pre[g] = (acc[0] + acc[1]) + (acc[2] + acc[3]) + b_hh[0, blk % B, (blk // B) * G + g]
                    else:
                        pre[g] = ((acc[0] + acc[1]) + (acc[2] + acc[3])
                                  + xp[step + (blk // B) * (last - 2 * step), blk % B, (blk // B) * G + g])
                    T.tvm_storage_sync("shared")
                    if g < H:
                        if kind == "lstm":
                            c[0] = _sigmoid(pre[H + g]) * c[0] + _sigmoid(pre[g]) * T.tanh(pre[2 * H + g])
                            h[g] = _sigmoid(pre[3 * H + g]) * T.tanh(c[0])
                        elif kind == "gru":
                            c[0] = T.tanh(xp[step + (blk // B) * (last - 2 * step), blk % B,
                                             (blk // B) * G + 2 * H + g]
                                          + _sigmoid(xp[step + (blk // B) * (last - 2 * step), blk % B,
                                                        (blk // B) * G + g] + pre[g]) * pre[2 * H + g])
                            h[g] = c[0] + _sigmoid(xp[step + (blk // B) * (last - 2 * step), blk % B,
                                                      (blk // B) * G + H + g] + pre[H + g]) * (h[g] - c[0])
                        elif relu:
                            h[g] = T.max(pre[g], T.float32(0))
                        else:
                            h[g] = T.tanh(pre[g])
                        y[step + (blk // B) * (last - 2 * step), blk % B, (blk // B) * H + g] = h[g]
                    T.tvm_storage_sync("shared")
                if g < H:
                    h_n[blk // B, blk % B, g] = h[g]
                    if kind == "lstm":
                        c_n[blk // B, blk % B, g] = c[0]
                    else:
                        c_n[blk // B, blk % B, g] = c0[blk // B, blk % B, g]

    return kernel
