"""Software prefetch inserted at a marked loop (``backends/tvm/prefetch.py``): structure, results unchanged, and
the refusal when nothing is marked."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

from backends.tvm import prefetch
from backends.tvm.target import resolve_target
from backends.tvm.winograd import WinogradSpec, winograd_kernel

pytestmark = pytest.mark.tvm


def doubled(marked: bool) -> tirx.PrimFunc:
    """B = 2 A over 64 rows of 32, each row's body prefetching the next row of A (when ``marked``)."""
    a = te.placeholder((64, 32), "float32", name="A")
    b = te.compute((64, 32), lambda i, j: a[i, j] * 2.0, name="B")
    func = te.create_prim_func([a, b])
    sch = Schedule(func)
    rows, cols = sch.get_loops(sch.get_sblock("B"))
    sch.vectorize(cols)
    if marked:
        prefetch.mark(sch, rows, row=rows)
    func = sch.mod["main"]
    if marked:
        func = prefetch.insert_prefetch(func, lambda roles: prefetch.prefetch(
            func.params[0], [tirx.min(roles["row"] + 1, 63), 0]))
    return func.with_attr("global_symbol", "main")


def run(func) -> np.ndarray:
    lib = tvm.compile(tvm.IRModule({"main": func}), target=resolve_target("llvm").tvm)
    x = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((64, 32), np.float32))
    lib["main"](tvm.runtime.tensor(x), out)
    return x, out.numpy()


def test_prefetch_is_the_first_statement_of_the_marked_loop_and_the_marks_are_gone():
    text = doubled(marked=True).script()
    assert text.count("llvm.prefetch") == 1
    assert prefetch.AT not in text and prefetch.AXIS not in text
    loop = text.index("for i in range(64):")
    assert loop < text.index("llvm.prefetch") < text.index('T.sblock("B")')


def test_results_unchanged():
    x, out = run(doubled(marked=True))
    np.testing.assert_array_equal(out, 2 * x)


def test_no_marked_loop_is_an_error():
    with pytest.raises(ValueError, match="no loop marked"):
        prefetch.insert_prefetch(doubled(marked=False), lambda roles: tirx.Evaluate(0))


def test_winograd_gemm_prefetches_the_next_weight_panel():
    """One prefetch loop in the GEMM, over the next panel's share per pass of tiles: 256 channels x 32 output
    channels = 512 cache lines over 7 passes of 7 tiles (a 14x14 map in 2x2 tiles): 74 a pass."""
    spec = WinogradSpec((1, 256, 14, 14), (256, 256, 3, 3), (1, 1), True, "relu", tile=2, lanes=16)
    assert (spec.oc_block, spec.tile_block, spec.padded_tiles) == (32, 7, 49)
    text = winograd_kernel(spec).script()
    assert text.count("llvm.prefetch") == 1 and "for q in range(74):" in text
