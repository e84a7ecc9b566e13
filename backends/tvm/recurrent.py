"""One TIR kernel per RNN layer (both directions): the input projection and the whole time loop, weights packed once.

Work is split into tasks (direction d, part p): a direction per core, and when cores are left over (a lone
direction, ``parts_for``) the direction's hidden units split into P parts of HP = H/P units, each owning those
units' rows of every gate. Each task first projects its own gate columns for the whole sequence, then steps:

    xp[:, d, part's gates] = X W_ih[d, part's gates]^T + b           # register tiles: <= 4 rows x 2 vectors
    for step in 0..T-1:  t = step if d == 0 else T-1-step
        h = h0[d] at the first step, else y[t -/+ 1, d]                 # y is the state: every part reads all of h
        for each block of the part's gate rows (``float_block``):        # a GEMV tile that stays in registers
            acc = xp[t, block]  (GRU: b_hh[block]);  for k in 0..H-1: acc += h[k] * W_hh[d, block, k]
        LSTM: c = sigmoid(f) * c + sigmoid(i) * tanh(g); h = sigmoid(o) * tanh(c)      (gates i, f, g, o)
        GRU:  r = sigmoid(xr + hr); z = sigmoid(xz + hz); n = tanh(xn + r * hn); h = n + z * (h - n)
        RNN:  h = tanh(acc) (or relu)
        y[t, d, part's units] = h                      (P > 1: all tasks meet at a barrier before the next step)

P = 1 runs a direction's steps on one thread with no synchronization. P > 1 is one parallel region for the whole
sequence (TVM's ``pragma_parallel_launch_point``, lowered to one ``TVMBackendParallelLaunch``) with the thread pool's
barrier after each step (``pragma_parallel_barrier_when_finish``): a parallel loop per step instead forks and joins
the pool T times (measured slower than one thread). Why split at all: W_hh of H = 256 is 1 MB, twice a Zen 3 core's
L2, so one thread streams it from L3 every step; a part's half stays in its core's L2.

Both weights are packed at compile time in the order the loops read them (``pack_float_weights``: each block's
(K, GB) slice contiguous): read from a (K, G) W^T, a block's rank-1 updates jump G floats per k, a 4 KB page at
G = 1024, where hardware prefetchers stop. The three cells share the projection and state handling (TVMScript
macros) and differ only in their gate math. Gates use the vectorizable rational tanh (``kernels.fast_tanh``, a few
ulp): exp-based ones are scalarized by LLVM.

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

from backends.tvm.kernels import accumulator_vectors, ceil_to, fast_sigmoid, fast_tanh, largest_divisor
from backends.tvm.qkernels import DEPTH, LANES, vpdpbusd

GATES = {"lstm": 4, "gru": 3, "rnn": 1}
MIN_PART_UNITS = 64  # hidden units per part below which a per-step barrier costs more than the split saves


def gate_block(rows: int, lanes: int = 16) -> int:
    """Gate rows accumulated in registers at once (a divisor of ``rows``): 8 vector registers (128 floats on
    AVX-512, 64 on AVX2, whose 16 registers would all be accumulators at 128)."""
    return largest_divisor(rows, 8 * lanes)


def parts_for(hidden: int, directions: int, cores: int, lanes: int = 16) -> int:
    """Parts each direction's hidden units are split into, one thread each: the cores the directions leave over
    (a direction has a core of its own already), at most as many as leave ``MIN_PART_UNITS`` units, whole
    vectors, per part."""
    spare = max(cores // directions, 1)
    fits = [p for p in range(spare, 1, -1)
            if hidden % p == 0 and hidden // p >= MIN_PART_UNITS and (hidden // p) % lanes == 0]
    return fits[0] if fits else 1


def float_block(kind: str, hidden: int, parts: int, lanes: int) -> int:
    """Gate rows per register block: P = 1, a divisor of all G rows; P > 1, of one gate's H/P units (so a
    block's xp columns are contiguous)."""
    return gate_block(GATES[kind] * hidden if parts == 1 else hidden // parts, lanes)


def pack_float_weights(kind: str, weights: list[np.ndarray], parts: int, lanes: int) -> np.ndarray:
    """Per direction W (G, K) (W_hh: K = H; W_ih: K = I) -> (D, P, G/(P GB), K, GB) float32 in the order the kernel
    reads it: part p's gate rows (gate q, unit u: row q H + p HP + u, HP = H/P) in blocks of GB (``float_block``),
    each block's (K, GB) slice contiguous, so a block's rank-1 updates stream one contiguous run of K*GB floats (a
    (K, G) W^T read a GB-wide column at a time jumps G floats per k, a page at G = 1024, where prefetchers stop)."""
    rows, k = weights[0].shape
    gates = GATES[kind]
    hidden = rows // gates
    units, block = hidden // parts, float_block(kind, hidden, parts, lanes)
    stacked = np.stack([w.reshape(gates, parts, units, k) for w in weights])  # (D, Q, P, HP, K)
    part_major = stacked.transpose(0, 2, 1, 3, 4).reshape(len(weights), parts, rows // parts // block, block, k)
    return np.ascontiguousarray(part_major.transpose(0, 1, 2, 4, 3), dtype=np.float32)  # (D, P, blocks, K, GB)


def state_macros(hidden: int, steps: int, parts: int = 1):
    """(load_h, first, last) for the step loop: ``load_h`` fills ``hl`` with direction ``d``'s previous h (h0
    at its first step, else the y row it wrote one step before, t - 1 forward, t + 1 backward: y is the state,
    so a part of h written by another thread is read from there); ``first`` copies the part's c0 into ``c_n``
    (the running c); ``last`` copies its last h to ``h_n``."""
    H, HP, last_step = hidden, hidden // parts, steps - 1

    @T.macro
    def load_h(hl, h0, y, b, d, step):
        if step == 0:
            for k in T.vectorized(H):
                hl[k] = h0[d, b, k]
        else:
            for k in T.vectorized(H):
                hl[k] = y[step - 1 + d * (last_step - 2 * step + 2), b, d * H + k]

    @T.macro
    def first(c0, c_n, b, d, p, step):
        if step == 0:
            for j in T.vectorized(HP):
                c_n[d, b, p * HP + j] = c0[d, b, p * HP + j]

    @T.macro
    def last(y, h_n, b, d, p, step):
        if step == last_step:
            for j in T.vectorized(HP):
                h_n[d, b, p * HP + j] = y[step + d * (last_step - 2 * step), b, d * H + p * HP + j]

    return load_h, first, last


def cell_macro(kind: str, hidden: int, stride: int, nonlinearity: str, parts: int = 1):
    """The gate math of one step for part ``p``'s units [p HP, (p + 1) HP) of direction ``d``, given ``pre``
    (LSTM/RNN: the part's pre-activations, gate-major (Q, HP); GRU: W_hh h + b_hh, the input part read from xp,
    whose direction ``d`` starts at column ``d * stride``), the previous h ``hl`` and the running c ``c`` (D, B, H)."""
    H, G, HP = hidden, stride, hidden // parts
    relu = nonlinearity == "relu"

    @T.macro
    def cell(xp, pre, n, hl, c, y, t, b, d, p):
        if kind == "lstm":
            for j in T.vectorized(HP):
                c[d, b, p * HP + j] = (fast_sigmoid(pre[HP + j]) * c[d, b, p * HP + j]
                                       + fast_sigmoid(pre[j]) * fast_tanh(pre[2 * HP + j]))
                y[t, b, d * H + p * HP + j] = fast_sigmoid(pre[3 * HP + j]) * fast_tanh(c[d, b, p * HP + j])
        elif kind == "gru":  # pre holds W_hh h + b_hh; the input part comes from xp
            for j in T.vectorized(HP):
                n[j] = fast_tanh(xp[t, b, d * G + 2 * H + p * HP + j]
                                 + fast_sigmoid(xp[t, b, d * G + p * HP + j] + pre[j]) * pre[2 * HP + j])
            for j in T.vectorized(HP):
                y[t, b, d * H + p * HP + j] = n[j] + fast_sigmoid(xp[t, b, d * G + H + p * HP + j]
                                                                  + pre[HP + j]) * (hl[p * HP + j] - n[j])
        else:
            for j in T.vectorized(HP):
                y[t, b, d * H + p * HP + j] = T.max(pre[j], T.float32(0)) if relu else fast_tanh(pre[j])

    return cell


def recurrent_kernel(kind: str, steps: int, batch: int, inputs: int, hidden: int, directions: int,
                     nonlinearity: str = "tanh", lanes: int = 16, parts: int = 1) -> tirx.PrimFunc:
    """PrimFunc ``(x, w_ih, bias, w_hh, b_hh, h0, c0, y, h_n, c_n)`` with shapes x (T, B, I), w_ih (D, P, G/(P GB),
    I, GB) and w_hh (D, P, G/(P GB), H, GB) (``pack_float_weights``), bias (D*G,) (b_ih, + b_hh but for GRU),
    b_hh (1, B, D*G) [GRU only], h0/c0 (D, B, H), y (T, B, D*H), h_n/c_n (D, B, H).

    Each (direction, part) task first projects its own gate columns of the whole sequence, ``xp = x W_ih^T + bias``
    (register tiles of rows x 2 vectors, a block of W_ih reused by every row), then runs the recurrence.
    ``parts`` = 1: one thread per direction runs it all (no synchronization). ``parts`` = P > 1 (``parts_for``):
    one parallel region for the whole sequence (TVM's ``pragma_parallel_launch_point``); each step the D*P tasks
    are spread over the pool's threads, each computes its part's gate rows from the full previous h (read from y)
    and writes its units of y, and the threads meet at the pool's barrier (``pragma_parallel_barrier_when_finish``)
    before the next step reads them. A part's weights (H x G/P) stay in its core's cache instead of the whole W_hh
    streaming from L3 every step; any thread count is correct (a thread runs every task given to it), only the
    speed depends on one core per task."""
    H, D, P, I = hidden, directions, parts, inputs
    G, HP = GATES[kind] * H, hidden // parts
    if H % P:
        raise ValueError(f"hidden size {H} does not split into {P} parts")
    GB = float_block(kind, H, P, lanes)
    gate_loops, unit_blocks = (1, G // GB) if P == 1 else (GATES[kind], HP // GB)
    blocks = gate_loops * unit_blocks
    # the projection's register tile: steps x 2 vectors of gate columns within the accumulator budget (AVX2 4 x 2,
    # AVX-512 8 x 2 of its 24)
    cols = largest_divisor(GB, 2 * lanes)
    rows = largest_divisor(steps, accumulator_vectors(lanes) // -(-cols // lanes))
    last = steps - 1
    cell = cell_macro(kind, H, G, nonlinearity, P)
    load_h, first, final = state_macros(H, steps, P)

    @T.macro
    def project_inputs(xp, x, w_ih, bias, b, d, p):
        """xp[:, b, part p's gate columns of d] = x[:, b] W_ih^T + bias."""
        tile = T.alloc_buffer((rows, cols), "float32", scope="local")
        for q in range(gate_loops):
            for ub in range(unit_blocks):
                for cb in range(GB // cols):
                    for to in range(steps // rows):
                        for r in T.unroll(rows):
                            for c in T.vectorized(cols):
                                tile[r, c] = T.float32(0)
                        for k in range(I):
                            for r in T.unroll(rows):
                                for c in T.vectorized(cols):
                                    tile[r, c] = tile[r, c] + x[to * rows + r, b, k] * w_ih[
                                        d, p, q * unit_blocks + ub, k, cb * cols + c]
                        for r in T.unroll(rows):
                            for c in T.vectorized(cols):
                                xp[to * rows + r, b, d * G + q * H + p * HP + ub * GB + cb * cols + c] = (
                                    tile[r, c] + bias[d * G + q * H + p * HP + ub * GB + cb * cols + c])

    @T.macro
    def project(out, acc, src, row, b, d, p, w, h, step):
        """out = src[row, b, part p's gate columns of d] + W_hh h, one register block of gates at a time, the blocks
        in reverse order every other step: a core's W_hh slightly larger than its L2 would miss on every line read
        in a fixed cyclic order (LRU), and reversed the first blocks read are the last ones still cached."""
        for i in range(blocks):
            blk = i + step % 2 * (blocks - 1 - 2 * i)
            for g in T.vectorized(GB):
                acc[g] = src[row, b, d * G + blk // unit_blocks * H + p * HP + blk % unit_blocks * GB + g]
            for k in range(H):
                for g in T.vectorized(GB):
                    acc[g] = acc[g] + h[k] * w[d, p, blk, k, g]
            for g in T.vectorized(GB):
                out[blk * GB + g] = acc[g]

    @T.macro
    def step_of(xp, w, b_hh, h0, c0, y, h_n, c_n, b, d, p, step):
        pre = T.alloc_buffer((G // P,), "float32")
        acc = T.alloc_buffer((GB,), "float32", scope="local")
        n = T.alloc_buffer((HP,), "float32")
        hl = T.alloc_buffer((H,), "float32")
        load_h(hl, h0, y, b, d, step)
        first(c0, c_n, b, d, p, step)
        if kind == "gru":
            project(pre, acc, b_hh, 0, b, d, p, w, hl, step)
        else:
            project(pre, acc, xp, step + d * (last - 2 * step), b, d, p, w, hl, step)
        cell(xp, pre, n, hl, c_n, y, step + d * (last - 2 * step), b, d, p)
        final(y, h_n, b, d, p, step)

    if P == 1:
        @T.prim_func
        def kernel(x: T.Buffer((steps, batch, I), "float32"), w_ih: T.Buffer((D, 1, blocks, I, GB), "float32"),
                   bias: T.Buffer((D * G,), "float32"), w: T.Buffer((D, 1, blocks, H, GB), "float32"),
                   b_hh: T.Buffer((1, batch, D * G), "float32"), h0: T.Buffer((D, batch, H), "float32"),
                   c0: T.Buffer((D, batch, H), "float32"), y: T.Buffer((steps, batch, D * H), "float32"),
                   h_n: T.Buffer((D, batch, H), "float32"), c_n: T.Buffer((D, batch, H), "float32")):
            T.func_attr({"tirx.noalias": True})
            xp = T.alloc_buffer((steps, batch, D * G), "float32")
            for d in T.parallel(D):
                for b in range(batch):
                    project_inputs(xp, x, w_ih, bias, b, d, 0)
                    for step in range(steps):
                        step_of(xp, w, b_hh, h0, c0, y, h_n, c_n, b, d, 0, step)

        return kernel

    @T.prim_func
    def split_kernel(x: T.Buffer((steps, batch, I), "float32"), w_ih: T.Buffer((D, P, blocks, I, GB), "float32"),
                     bias: T.Buffer((D * G,), "float32"), w: T.Buffer((D, P, blocks, H, GB), "float32"),
                     b_hh: T.Buffer((1, batch, D * G), "float32"), h0: T.Buffer((D, batch, H), "float32"),
                     c0: T.Buffer((D, batch, H), "float32"), y: T.Buffer((steps, batch, D * H), "float32"),
                     h_n: T.Buffer((D, batch, H), "float32"), c_n: T.Buffer((D, batch, H), "float32")):
        T.func_attr({"tirx.noalias": True})
        xp = T.alloc_buffer((steps, batch, D * G), "float32")
        with T.attr(0, "pragma_parallel_launch_point", 1):
            for b in range(batch):
                with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                    for task in T.parallel(D * P):
                        project_inputs(xp, x, w_ih, bias, b, task // P, task % P)
                for step in range(steps):
                    with T.attr(0, "pragma_parallel_barrier_when_finish", 1):
                        for task in T.parallel(D * P):
                            step_of(xp, w, b_hh, h0, c0, y, h_n, c_n, b, task // P, task % P, step)

    return split_kernel


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
    load_h, first, final = state_macros(H, steps)

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
            for k in range(Hp):
                q[k] = T.uint8(0)  # the padding stays 0 (its weights are 0 too)
            for b in range(batch):
                for step in range(steps):
                    load_h(h, h0, y, b, d, step)
                    first(c0, c_n, b, d, 0, step)
                    quantize_h(h, q, lo, hi, sz)
                    project(pre, acc, xp, step + d * (last - 2 * step), b, d, q, w, row_sum, scale, b_hh, sz)
                    cell(xp, pre, n, h, c_n, y, step + d * (last - 2 * step), b, d, 0)
                    final(y, h_n, b, d, 0, step)

    return kernel
