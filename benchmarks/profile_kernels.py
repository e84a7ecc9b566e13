"""Where the time goes: our conv/dense kernels of a zoo model timed one by one, against the whole model.

    python benchmarks/profile_kernels.py resnet18 [GHZ] [ROWS]  # a model of benchmarks/run.py or a zoo name;
                                                                # ROWS: kernels listed, slowest first (default 12)

Each kernel spec of the optimized graph (``backends.tvm.tune.extract_tasks``) is built with its default tile and
timed with TVM's time evaluator, times the number of nodes using it; the remainder of the end-to-end time is every
other kernel (elementwise, pools, pads, copies). Each line also gives the kernel's schedule (``blocked``: the NCHWc
direct conv, ``depthwise``, ``conv2d_expand_dw``: the fused expand + depthwise kernel, else the
column/channel-vectorized ones) and its share of the CPU's fp32 peak:
2 FMA pipes x ``lanes`` x 2 flops x GHZ (default 3.0) x cores (two Zen 3 cores: ~190 GFLOP/s).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import make_model  # noqa: E402  (benchmarks/run.py: torchvision models and the LSTMs)

import passes  # noqa: E402
from backends.tvm.expand_depthwise import ExpandDepthwiseSpec  # noqa: E402
from backends.tvm.kernels import DenseSpec  # noqa: E402
from backends.tvm.target import resolve_target  # noqa: E402
from backends.tvm.tune import LocalRunner, build_candidate, extract_tasks  # noqa: E402
from examples import zoo  # noqa: E402


def main() -> int:
    name = sys.argv[1] if len(sys.argv) > 1 else "resnet18"
    ghz = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0
    listed = int(sys.argv[3]) if len(sys.argv) > 3 else 12
    model, inputs = zoo.make(name, full=True) if name in zoo.ZOO else make_model(name)
    opt = passes.optimize(model, example_inputs=inputs, measure=False)
    target, runner = resolve_target("llvm"), LocalRunner(number=10, repeat=3)
    rows = []
    for task in extract_tasks(opt.graph, target):
        tile = task.default
        lib, func = build_candidate(task, tile, target)
        ms = runner.measure(lib, func) * len(task.nodes)
        kind = task.kind if isinstance(task.spec, (DenseSpec, ExpandDepthwiseSpec)) else (
            "depthwise" if task.spec.blocked and task.spec.depthwise else "blocked" if task.spec.blocked
            else task.kind)
        rows.append((ms, kind, getattr(task.spec, "out_shape", ""), len(task.nodes), task.flops / ms / 1e6))
    total = opt.compiled.time_ms(*inputs, number=5, repeat=5)
    ours = sum(r[0] for r in rows)
    print(f"{name}: end-to-end {total:.2f} ms; conv/dense kernels {ours:.2f} ms ({ours / total:.0%}); "
          f"everything else {total - ours:.2f} ms")
    peak = 2 * 2 * target.lanes * ghz * target.cores
    for ms, kind, shape, count, gflops in sorted(rows, reverse=True)[:listed]:
        print(f"  {ms:6.2f} ms  {kind:<12} out {shape} x{count}  {gflops:.0f} GFLOP/s ({gflops / peak:.0%} of "
              f"{peak:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
