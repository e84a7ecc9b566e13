"""NaN-propagating float ``max``/``min`` in every TIR function of a module, as PyTorch computes them.

Why: TVM's LLVM code generator lowers ``max(a, b)`` to ``select(a > b, a, b)``, which returns ``b`` when ``a`` is NaN
(``NaN > b`` is false), and CUDA's ``fmaxf`` drops a NaN operand altogether. So ``relu`` (``max(x, 0)``), ``clip``
(``max(min(x, hi), lo)``), max pooling (the running ``max(acc, x)``: a NaN is overwritten by the next element) and
our conv epilogues turned NaN into numbers, while PyTorch's ``relu``, ``clamp`` and ``max_pool2d`` return NaN
whenever an input of the window is NaN (IEEE 754-2019 ``maximum``/``minimum``).

The rewrite, applied once to the lowered module before TVM's TIR pipeline (so it covers TOPI's kernels and ours):
``max(a, b) -> select(isnan(a), a, select(isnan(b), b, max(a, b)))`` for float ``a, b``, and the same for ``min``;
the check of an operand that is a constant is left out (``max(x, 0)`` gets one ``x != x``). On CPU this is one
compare and one blend per vector beside the kernel's multiply-adds. Integer max/min are untouched.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx


def _isnan(x):
    """``isnan`` for every float type: TVM's has no bfloat16 rule, and widening to float32 keeps NaN a NaN."""
    return tirx.isnan(tirx.Cast("float32", x) if str(x.ty.dtype).startswith("bfloat") else x)


def _propagate(node, keep_ordered):
    """``node`` (a float Max or Min) with a NaN operand returned as is, the ordered comparison otherwise."""
    if not str(node.ty.dtype).startswith(("float", "bfloat")):
        return node
    result = keep_ordered(node.a, node.b)
    for operand in (node.b, node.a):  # the outer check is a's: max(NaN, NaN) is a, as in PyTorch either way
        if not isinstance(operand, tirx.FloatImm):
            result = tirx.Select(_isnan(operand), operand, result)
    return result


def propagate_nan_func(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """One PrimFunc with every float max/min made NaN-propagating (see the module docstring)."""
    return tvm_ffi.structural_map(func, [(tirx.Max, lambda node: _propagate(node, tirx.Max)),
                                         (tirx.Min, lambda node: _propagate(node, tirx.Min))])


def propagate_nan(mod: tvm.IRModule) -> tvm.IRModule:
    """Every PrimFunc of ``mod`` rewritten in place by ``propagate_nan_func``; Relax functions stay as they are."""
    updated = {gv: propagate_nan_func(func) for gv, func in mod.functions.items() if isinstance(func, tirx.PrimFunc)}
    for gv, func in updated.items():
        mod[gv] = func
    return mod
