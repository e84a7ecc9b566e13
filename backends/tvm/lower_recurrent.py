"""Lowerings of the recurrent ops: ``lstm``/``gru``/``rnn`` (CPU: one kernel per layer runs the whole time loop;
elsewhere unrolled Relax) and their dynamic int8 forms ``qlstm_dynamic``/``qgru_dynamic``/``qrnn_dynamic``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax
from tvm.relax import op as R

from backends.tvm import cuda_rnn
from backends.tvm.lowering import LowerContext, dynamic_dense, lowering
from backends.tvm.recurrent import (
    GATES,
    integer_layout,
    integer_recurrent_kernel,
    pack_float_weights,
    pack_integer_weights,
    parts_for,
    recurrent_kernel,
)


# ------------------------------------------------------------------------------------------------ recurrent
def _rnn_cell(kind: str, nonlinearity: str):
    """The recurrent update for one step, given the input projection ``xp`` (already holding b_ih)."""

    def lstm(ctx, xp, h, c, w_hh_t, b_hh):
        # gates = x W_ih^T + b_ih + h W_hh^T + b_hh, split as (i, f, g, o); c' = f*c + i*g; h' = o*tanh(c')
        gates = ctx.emit(R.add(xp, R.matmul(h, w_hh_t)))
        if b_hh is not None:
            gates = ctx.emit(R.add(gates, b_hh))
        parts = ctx.emit(R.split(gates, 4, axis=-1))
        i, f, g, o = (relax.TupleGetItem(parts, k) for k in range(4))
        c = ctx.emit(R.add(R.multiply(R.sigmoid(f), c), R.multiply(R.sigmoid(i), R.tanh(g))))
        h = ctx.emit(R.multiply(R.sigmoid(o), R.tanh(c)))
        return h, c

    def gru(ctx, xp, h, c, w_hh_t, b_hh):
        # r = s(xr + hr), z = s(xz + hz), n = tanh(xn + r * hn), h' = (1 - z) * n + z * h = n + z * (h - n)
        hp = ctx.emit(R.matmul(h, w_hh_t))
        if b_hh is not None:
            hp = ctx.emit(R.add(hp, b_hh))
        xs_, hs_ = ctx.emit(R.split(xp, 3, axis=-1)), ctx.emit(R.split(hp, 3, axis=-1))
        r = R.sigmoid(R.add(relax.TupleGetItem(xs_, 0), relax.TupleGetItem(hs_, 0)))
        z = ctx.emit(R.sigmoid(R.add(relax.TupleGetItem(xs_, 1), relax.TupleGetItem(hs_, 1))))
        n = ctx.emit(R.tanh(R.add(relax.TupleGetItem(xs_, 2), R.multiply(r, relax.TupleGetItem(hs_, 2)))))
        h = ctx.emit(R.add(n, R.multiply(z, R.subtract(h, n))))
        return h, None

    def rnn(ctx, xp, h, c, w_hh_t, b_hh):
        pre = R.add(xp, R.matmul(h, w_hh_t))
        if b_hh is not None:
            pre = R.add(pre, b_hh)
        return ctx.emit(R.tanh(pre) if nonlinearity == "tanh" else R.nn.relu(pre)), None

    return {"lstm": lstm, "gru": gru, "rnn": rnn}[kind]


@dataclass(frozen=True)
class _Layers:
    """What every recurrent lowering derives first: sizes, the time-major input ``x`` and the initial states."""

    ctx: LowerContext
    xs: list[relax.Expr]
    kind: str
    hidden: int
    layers: int
    directions: int
    steps: int
    batch: int
    x: relax.Expr

    @staticmethod
    def of(ctx: LowerContext, xs: list[relax.Expr], kind: str) -> _Layers:
        a = ctx.attrs
        x = ctx.emit(R.permute_dims(xs[0], [1, 0, 2])) if a["batch_first"] else xs[0]
        steps, batch = ctx.in_type(0).shape[:2][::-1] if a["batch_first"] else ctx.in_type(0).shape[:2]
        return _Layers(ctx, xs, kind, a["hidden_size"], a["num_layers"], 2 if a["bidirectional"] else 1, steps,
                       batch, x)

    def suffixes(self, layer: int) -> list[str]:
        """Param name suffixes of ``layer``'s directions (torch's ``_l0``, ``_l0_reverse``)."""
        return [f"_l{layer}" + ("_reverse" if d else "") for d in range(self.directions)]

    @property
    def state_type(self) -> relax.TensorType:
        return relax.TensorType((self.directions, self.batch, self.hidden), "float32")

    def initial(self, slot: int, layer: int, direction: int | None = None) -> relax.Expr:
        """Operand ``slot``'s (h0: 1, c0: 2) initial state of ``layer``: (D, B, H), or (B, H) of one ``direction``;
        zeros when the operand is absent."""
        ctx, d = self.ctx, self.directions
        shape = (d, self.batch, self.hidden) if direction is None else (self.batch, self.hidden)
        if len(self.xs) <= slot:
            return ctx.const(np.zeros(shape, np.float32))
        begin = layer * d + (direction or 0)
        end = begin + (d if direction is None else 1)
        state = ctx.emit(R.strided_slice(self.xs[slot], axes=[0], begin=[begin], end=[end]))
        return state if direction is None else ctx.emit(R.reshape(state, shape))

    def outputs(self, x: relax.Expr, final_h: list, final_c: list):
        """(y, h_n[, c_n]) from the last layer's time-major output and every layer's (D, B, H) final states."""
        ctx = self.ctx
        y = ctx.emit(R.permute_dims(x, [1, 0, 2])) if ctx.attrs["batch_first"] else x
        stack = lambda states: states[0] if len(states) == 1 else ctx.emit(R.concat(states, axis=0))  # noqa: E731
        return (y, stack(final_h)) if self.kind != "lstm" else (y, stack(final_h), stack(final_c))


@lowering("lstm", "gru", "rnn")
def _recurrent(ctx, xs):
    """Multi-layer, bidirectional RNNs, unrolled over the static sequence length.

    Per layer and direction the input projection of all time steps is ONE matmul ((T*B, I) x (I, G*H)); each
    step then adds ``h W_hh^T`` and applies the gate math. Weights are transposed once, here.
    """
    if ctx.choice.kernel == "recurrent":
        return _recurrent_kernels(ctx, xs)
    a, p = ctx.attrs, ctx.params
    kind = ctx.data["op"]
    cell = _rnn_cell(kind, a.get("nonlinearity", "tanh"))
    rnn = _Layers.of(ctx, xs, kind)
    steps, batch, x = rnn.steps, rnn.batch, rnn.x
    final_h, final_c = [], []
    for layer in range(rnn.layers):
        outputs = []
        features = ctx.emit(R.reshape(x, (steps * batch, -1)))
        for direction, suffix in enumerate(rnn.suffixes(layer)):
            w_ih, w_hh = p["weight_ih" + suffix], p["weight_hh" + suffix]
            b_ih = p.get("bias_ih" + suffix) if a["bias"] else None
            b_hh = p.get("bias_hh" + suffix) if a["bias"] else None
            if kind == "lstm" and b_hh is not None:  # both biases add to every gate: fold them into one
                b_ih, b_hh = b_ih + b_hh, None
            xp = ctx.emit(R.matmul(features, ctx.const(np.ascontiguousarray(w_ih.T))))
            if b_ih is not None:
                xp = ctx.emit(R.add(xp, ctx.const(b_ih)))
            per_step = ctx.emit(R.split(ctx.emit(R.reshape(xp, (steps, batch, -1))), steps, axis=0))
            w_hh_t = ctx.const(np.ascontiguousarray(w_hh.T))
            b_hh_c = None if b_hh is None else ctx.const(b_hh)
            h, c = rnn.initial(1, layer, direction), rnn.initial(2, layer, direction)
            hs = [None] * steps
            order = range(steps - 1, -1, -1) if direction else range(steps)
            for t in order:
                xp_t = ctx.emit(R.reshape(relax.TupleGetItem(per_step, t), (batch, -1)))
                h, c = cell(ctx, xp_t, h, c, w_hh_t, b_hh_c)
                hs[t] = h
            outputs.append(ctx.emit(R.concat([R.expand_dims(h_t, 0) for h_t in hs], axis=0)))
            final_h.append(h)
            final_c.append(c)
        x = outputs[0] if rnn.directions == 1 else ctx.emit(R.concat(outputs, axis=-1))
    expand = lambda states: [ctx.emit(R.expand_dims(s, 0)) for s in states]  # noqa: E731  (B, H) -> (1, B, H)
    return rnn.outputs(x, expand(final_h), expand(final_c) if kind == "lstm" else [])


def _recurrent_kernels(ctx: LowerContext, xs: list[relax.Expr]):
    """Per layer one kernel call for the whole sequence. CPU: ``recurrent_kernel`` projects x and runs the time loop,
    directions (and parts of a lone direction's units, ``parts_for``) on the pool's threads; cuda: a Relax matmul
    (dlight) for the input projection of both directions, then the persistent ``cuda_rnn.cuda_recurrent_kernel``."""
    a, p = ctx.attrs, ctx.params
    kind = ctx.data["op"]
    rnn = _Layers.of(ctx, xs, kind)
    hidden, directions, steps, batch, x = rnn.hidden, rnn.directions, rnn.steps, rnn.batch, rnn.x
    zeros = np.zeros(GATES[kind] * hidden, np.float32)
    final_h, final_c = [], []
    for layer in range(rnn.layers):
        suffixes = rnn.suffixes(layer)
        w_ih = np.concatenate([p["weight_ih" + s] for s in suffixes])
        b_ih = [p.get("bias_ih" + s, zeros) if a["bias"] else zeros for s in suffixes]
        b_hh = [p.get("bias_hh" + s, zeros) if a["bias"] else zeros for s in suffixes]
        if kind != "gru":  # b_hh adds to every gate pre-activation: fold it into the projection
            b_ih, b_hh = [i + h for i, h in zip(b_ih, b_hh)], [zeros] * directions
        bias = np.concatenate(b_ih).astype(np.float32)
        name = f"{kind}_{ctx.node}_l{layer}"
        b_hh_rows = ctx.const(np.tile(np.concatenate(b_hh).reshape(1, 1, -1), (1, batch, 1)), "float32")
        states = [rnn.initial(1, layer), rnn.initial(2, layer)]
        if ctx.target_kind == "cuda":  # a Relax matmul (dlight) for xp, then the persistent kernel on W_hh^T
            features = ctx.emit(R.reshape(x, (steps * batch, w_ih.shape[1])))
            xp = ctx.emit(R.add(R.matmul(features, ctx.const(np.ascontiguousarray(w_ih.T))), ctx.const(bias)))
            xp = ctx.emit(R.reshape(xp, (steps, batch, -1)))
            func = cuda_rnn.cuda_recurrent_kernel(kind, steps, batch, hidden, directions, a.get("nonlinearity", "tanh"))
            w_hh_t = np.stack([np.ascontiguousarray(p["weight_hh" + s].T) for s in suffixes])
            args = [xp, ctx.const(w_hh_t, "float32"), b_hh_rows, *states]
        else:  # both weights packed for the kernel's blocks; it projects x itself
            lanes, inputs = ctx.target.lanes, w_ih.shape[1]
            parts = parts_for(hidden, directions, ctx.cores, lanes)
            func = recurrent_kernel(kind, steps, batch, inputs, hidden, directions, a.get("nonlinearity", "tanh"),
                                    lanes, parts)
            packed = {k: pack_float_weights(kind, [p[f"weight_{k}{s}"] for s in suffixes], parts, lanes)
                      for k in ("ih", "hh")}
            args = [ctx.emit(R.reshape(x, (steps, batch, inputs))), ctx.const(packed["ih"], "float32"),
                    ctx.const(bias, "float32"), ctx.const(packed["hh"], "float32"), b_hh_rows, *states]
        func = func.with_attrs({"global_symbol": name, "tir.is_scheduled": True, "op_pattern": 8})
        gv = ctx.bb.add_func(func, name)
        x, h_n, c_n = _call_recurrent_kernel(ctx, gv, args, (steps, batch, directions * hidden), rnn.state_type)
        final_h.append(h_n)
        final_c.append(c_n)
    return rnn.outputs(x, final_h, final_c)


def _call_recurrent_kernel(ctx: LowerContext, gv: relax.GlobalVar, args: list, y_shape: tuple[int, ...],
                           state_type: relax.TensorType) -> tuple[relax.Expr, relax.Expr, relax.Expr]:
    """(y, h_n, c_n) of one layer's recurrent kernel call (float or integer)."""
    result = ctx.emit(R.call_tir(gv, relax.Tuple(args), out_ty=[relax.TensorType(y_shape, "float32"), state_type,
                                                                 state_type]))
    return tuple(ctx.emit(relax.TupleGetItem(result, i)) for i in range(3))


@lowering("qlstm_dynamic", "qgru_dynamic", "qrnn_dynamic")
def _dynamic_recurrent(ctx, xs):
    """CPU: per layer, the input projection of both directions as one ``dynamic_dense`` (x quantized per tensor,
    the two directions' W_ih stacked, gate rows padded to 16) and one ``integer_recurrent_kernel`` call (h
    quantized per row each step, the product in int32: vpdpbusd on VNNI CPUs)."""
    if ctx.choice.kernel != "integer_recurrent":
        raise ctx.fail("dynamic int8 RNNs lower for llvm (CPU) only; run quantize{mode=dynamic} for CPU targets")
    a, p = ctx.attrs, ctx.params
    kind = ctx.data["op"][1:-len("_dynamic")]
    rnn = _Layers.of(ctx, xs, kind)
    hidden, directions, steps, batch, x = rnn.hidden, rnn.directions, rnn.steps, rnn.batch, rnn.x
    gates, (padded_gates, _, _) = GATES[kind] * hidden, integer_layout(kind, hidden)

    def padded(rows: np.ndarray, fill: float = 0) -> np.ndarray:
        """Gate rows (first axis) padded to padded_gates."""
        out = np.full((padded_gates, *rows.shape[1:]), fill, rows.dtype)
        out[:gates] = rows
        return out

    zeros = np.zeros(gates, np.float32)
    final_h, final_c = [], []
    for layer in range(rnn.layers):
        suffixes = rnn.suffixes(layer)
        bias = {k: [p.get(f"bias_{k}{s}", zeros) if a["bias"] else zeros for s in suffixes] for k in ("ih", "hh")}
        xp = dynamic_dense(ctx, x, np.concatenate([padded(p["weight_ih" + s]) for s in suffixes]),
                           np.concatenate([padded(p["scale_ih" + s], 1) for s in suffixes]),
                           np.concatenate([padded(b) for b in bias["ih"]]).astype(np.float32),
                           f"dense_int8_{ctx.node}_l{layer}")
        name = f"{kind}_int8_{ctx.node}_l{layer}"
        func = integer_recurrent_kernel(kind, steps, batch, hidden, directions, a.get("nonlinearity", "tanh"),
                                        ctx.vnni)
        gv = ctx.bb.add_func(func.with_attrs({"global_symbol": name, "tir.is_scheduled": True, "op_pattern": 8}),
                             name)
        packed, row_sums = pack_integer_weights(kind, [p["weight_hh" + s] for s in suffixes])
        args = [xp, ctx.const(packed, "int8"), ctx.const(row_sums, "int32"),
                ctx.const(np.stack([padded(p["scale_hh" + s], 1) for s in suffixes]), "float32"),
                ctx.const(np.stack([padded(b) for b in bias["hh"]]), "float32"), rnn.initial(1, layer),
                rnn.initial(2, layer)]
        x, h_n, c_n = _call_recurrent_kernel(ctx, gv, args, (steps, batch, directions * hidden), rnn.state_type)
        final_h.append(h_n)
        final_c.append(c_n)
    return rnn.outputs(x, final_h, final_c)
