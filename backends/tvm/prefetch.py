"""Software prefetch in a scheduled CPU PrimFunc: ``llvm.prefetch`` calls placed at the top of a marked loop's body.

Why: a kernel whose weights come from L3 or memory (in a whole model they do: the other layers' weights and
activations passed through the caches since the last call) reads them in bursts the hardware prefetcher cannot
run ahead of. Winograd's GEMM reads each weight panel (C x a register tile's output channels) from L3 on its first
pass over the tiles, at compute speed (twice L3's per-core bandwidth), then reuses it from L1 on the other passes;
prefetching the next panel a slice per pass spreads that read over time the core spends computing.

TVM's schedule has no prefetch primitive, so the schedule marks loops with annotations (``AXIS``: a loop whose
variable the addresses use, by role; ``AT``: the loop whose body starts with the prefetches) and ``insert_prefetch``
rebuilds the few statements on the path to the marked loop, dropping the marks. Prefetches never change results:
a hint to the cache, not a load; an address past the buffer is still not dereferenced (the callers clamp anyway).
"""

from __future__ import annotations

from collections.abc import Callable

from tvm import tirx
from tvm.s_tir import SBlock, SBlockRealize, Schedule

AXIS = "passes.prefetch_axis"  # annotation value: the loop variable's role (a name the caller's builder reads)
AT = "passes.prefetch_at"      # annotation on the loop whose body starts with the prefetches
L2 = 2                         # llvm.prefetch locality: 3 = all levels (prefetcht0), 2 = L2 and out (prefetcht1)


def mark(sch: Schedule, at, **axes) -> None:
    """Mark loop ``at`` (its body gets the prefetches) and the loops whose variables the addresses use, by role."""
    for role, loop in axes.items():
        sch.annotate(loop, AXIS, role)
    sch.annotate(at, AT, 1)


def prefetch(buffer: tirx.Var, indices: list, locality: int = L2) -> tirx.Stmt:
    """One ``llvm.prefetch`` (read, data cache) of the cache line of ``buffer[indices]`` (``buffer``: a PrimFunc
    parameter, a Var of buffer type in TVM 0.27)."""
    address = tirx.address_of(tirx.BufferLoad(buffer, indices))
    return tirx.Evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch.p0", address, tirx.const(0, "int32"),
                                               tirx.const(locality, "int32"), tirx.const(1, "int32")))


def insert_prefetch(func: tirx.PrimFunc, build: Callable[[dict[str, tirx.Var]], tirx.Stmt]) -> tirx.PrimFunc:
    """``func`` with ``build(roles)`` (roles: {role: loop variable} of the ``AXIS``-marked loops around it) at the
    top of the ``AT``-marked loop's body; the marks removed. Raises if no loop is marked."""
    found = []

    def visit(stmt, roles):
        if isinstance(stmt, tirx.For):
            annotations = dict(stmt.annotations)
            if AXIS in annotations:
                roles = {**roles, str(annotations.pop(AXIS)): stmt.loop_var}
            body = visit(stmt.body, roles)
            if annotations.pop(AT, None) is not None:
                found.append(stmt)
                body = tirx.SeqStmt([build(roles), body])
            if body.same_as(stmt.body) and len(annotations) == len(stmt.annotations):
                return stmt
            return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding,
                            annotations, stmt.step)
        if isinstance(stmt, tirx.SeqStmt):
            seq = [visit(s, roles) for s in stmt.seq]
            return stmt if all(a.same_as(b) for a, b in zip(seq, stmt.seq)) else tirx.SeqStmt(seq)
        if isinstance(stmt, SBlockRealize):
            block = visit(stmt.block, roles)
            return stmt if block.same_as(stmt.block) else SBlockRealize(stmt.iter_values, stmt.predicate, block)
        if isinstance(stmt, SBlock):
            body = visit(stmt.body, roles)
            return stmt if body.same_as(stmt.body) else SBlock(
                stmt.iter_vars, stmt.reads, stmt.writes, stmt.name_hint, body, stmt.init, stmt.alloc_buffers,
                stmt.match_buffers, stmt.annotations)
        return stmt

    body = visit(func.body, {})
    if not found:
        raise ValueError(f"no loop marked {AT!r} for the prefetches")
    return func.with_body(body)
