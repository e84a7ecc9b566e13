"""NaN-propagating float ``max``/``min`` in every TIR function of a module, as PyTorch computes them.

Why: TVM's LLVM code generator lowers ``max(a, b)`` to ``select(a > b, a, b)``, which returns ``b`` when ``a`` is NaN
(``NaN > b`` is false), and CUDA's ``fmaxf`` drops a NaN operand altogether. So ``relu`` (``max(x, 0)``), ``clip``
(``max(min(x, hi), lo)``), max pooling (the running ``max(acc, x)``: a NaN is overwritten by the next element) and
our conv epilogues turned NaN into numbers, while PyTorch's ``relu``, ``clamp`` and ``max_pool2d`` return NaN
whenever an input of the window is NaN (IEEE 754-2019 ``maximum``/``minimum``).

The rewrite: ``max(a, b) -> select(isnan(a), a, select(isnan(b), b, max(a, b)))`` for float ``a, b``, and the
same for ``min``; each operand bound once in a ``Let``. Against a constant (relu ``max(x, 0)``, clip, the clamps of
our tanh): ``max(x, c) -> select(c > x, c, x)`` and ``min(x, c) -> select(c < x, c, x)``: a NaN ``x`` fails the
ordered compare and is returned, and so is ``x`` on a tie (relu(-0.0) is -0.0, as in PyTorch). That is one compare
and one blend per vector (x86's ``maxps``/``minps`` have these semantics) where the ``isnan`` form took four
(measured on mobilenet_v2's ReLU6 epilogues: see the README). Integer max/min are untouched.

Where: on the lowered module before TVM's TIR pipeline (``propagate_nan``, so it covers TOPI's kernels and ours
and TVM's vectorizer sees plain selects), except in kernels with bfloat16 buffers: there TVM 0.27's
``BF16ComputeLegalize`` mistypes a bf16 ``Let`` and miscomputed the Select form (a random bf16 model was off by 0.6
from PyTorch), so those are only marked, and rewritten at the end of the TIR pipeline (``TIR_PIPELINE``: TVM's
"default" one, then the marked functions), where bf16 arithmetic is already float32 (legalized). Not everything
can move there: after vectorization the rewrite emits vector ``x != x``, which TVM's CUDA codegen prints as an
invalid ``float2 != float2``. The float32 -> bf16 store keeps a NaN a NaN (PyTorch's quiet NaN 0x7fc00000 rounds
to 0x7fc0). A bf16 kernel on CUDA (its device function is split off unmarked) still drops NaN.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx
from tvm.tirx.compilation_pipeline import register_tir_pipeline


def _propagate(node, keep_ordered):
    """``node`` (a float Max or Min) with a NaN operand returned as is, the ordered comparison otherwise."""
    if not str(node.ty.dtype).startswith("float"):
        return node
    # Operands are bound once (Let): nested max/min (clip, clamped tanh) would otherwise double in size per level.
    bindings, operands = [], []
    for name, operand in (("nan_a", node.a), ("nan_b", node.b)):
        if isinstance(operand, (tirx.FloatImm, tirx.Var)):
            operands.append(operand)
        else:
            var = tirx.Var(name, operand.ty)
            bindings.append((var, operand))
            operands.append(var)
    a, b = operands
    constants = [isinstance(v, tirx.FloatImm) for v in (a, b)]
    if constants.count(True) == 1:  # relu, clip, clamps: max(x, c) = select(c > x, c, x), NaN x fails the compare
        c, x = (a, b) if constants[0] else (b, a)
        result = tirx.Select(c > x if keep_ordered is tirx.Max else c < x, c, x)
    else:
        result = keep_ordered(a, b)
        for operand in (b, a):  # the outer check is a's: max(NaN, NaN) is a, as in PyTorch either way
            if not isinstance(operand, tirx.FloatImm):
                result = tirx.Select(tirx.isnan(operand), operand, result)
    for var, value in reversed(bindings):
        result = tirx.Let(var, value, result)
    return result


def propagate_nan_func(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """One PrimFunc with every float max/min made NaN-propagating (see the module docstring)."""
    return tvm_ffi.structural_map(func, [(tirx.Max, lambda node: _propagate(node, tirx.Max)),
                                         (tirx.Min, lambda node: _propagate(node, tirx.Min))])


_LATE = "passes.propagate_nan_late"


def _has_bfloat16(func: tirx.PrimFunc) -> bool:
    return "bfloat16" in func.script()  # printed once per kernel at build time


def propagate_nan(mod: tvm.IRModule) -> tvm.IRModule:
    """Every PrimFunc of ``mod`` rewritten in place by ``propagate_nan_func``, or, with bfloat16 buffers, marked for
    ``TIR_PIPELINE`` (see the module docstring); Relax functions stay as they are."""
    updated = {gv: func.with_attr(_LATE, True) if _has_bfloat16(func) else propagate_nan_func(func)
               for gv, func in mod.functions.items() if isinstance(func, tirx.PrimFunc)}
    for gv, func in updated.items():
        mod[gv] = func
    return mod


def _propagate_marked(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    updated = {gv: propagate_nan_func(func) for gv, func in mod.functions.items()
               if isinstance(func, tirx.PrimFunc) and func.attrs is not None and _LATE in func.attrs}
    for gv, func in updated.items():
        mod[gv] = func
    return mod


TIR_PIPELINE = "passes-propagate-nan"


def _tir_pipeline():
    """TVM's default TIR pipeline, then ``propagate_nan_func`` on the kernels ``propagate_nan`` marked."""
    default, finalize_host, finalize_device = tirx.get_tir_pipeline("default")
    late = tvm.transform.module_pass(_propagate_marked, opt_level=0, name="PropagateNaNLate")
    return tvm.transform.Sequential([default, late]), finalize_host, finalize_device


register_tir_pipeline(TIR_PIPELINE, _tir_pipeline)
