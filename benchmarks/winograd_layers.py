"""Winograd against the direct conv kernel, layer by layer: every distinct 3x3 stride-1 conv of a model.

    python benchmarks/winograd_layers.py resnet18 [--rounds 7]     # a model of benchmarks/run.py or a zoo name

Each layer is built three ways, the direct kernel with its default tile (``kernels.conv_kernel``), F(2x2,3x3)
and F(4x4,3x3) (``winograd.winograd_kernel``), and timed with TVM's time evaluator on the threads a compiled model
uses, the three interleaved for ``--rounds`` rounds (the machine may be shared: medians). GFLOP/s are
direct-conv-equivalent (2 * 9 * C * OC * OH * OW per layer), so the columns compare. The column "rule" is the
tile the cost rule picks (``winograd.choose``; "-" where it keeps the direct kernel). Each layer's error against
PyTorch is checked in ``tests/backends/test_winograd.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import make_model  # noqa: E402  (benchmarks/run.py: torchvision models and the LSTMs)

import passes  # noqa: E402
from backends.tvm import winograd  # noqa: E402
from backends.tvm.kernels import ConvSpec, default_tile  # noqa: E402
from backends.tvm.select import select_kernels  # noqa: E402
from backends.tvm.target import resolve_target  # noqa: E402
from backends.tvm.tune import LocalRunner, TuneTask, build_candidate  # noqa: E402
from examples import zoo  # noqa: E402


def three_by_three_layers(name: str, lanes: int) -> dict[ConvSpec, int]:
    """Distinct 3x3 stride-1 groups-1 conv specs of the optimized model (direct kernel chosen with Winograd off),
    with how many nodes use each."""
    model, inputs = zoo.make(name, full=True) if name in zoo.ZOO else make_model(name)
    opt = passes.optimize(model, example_inputs=inputs, measure=False, winograd=False)
    found: dict[ConvSpec, int] = {}
    for choice in select_kernels(opt.graph, "llvm", lanes, allow_winograd=False).choices.values():
        spec = choice.spec
        if (choice.kernel == "conv" and spec.weight_shape[2:] == (3, 3) and spec.stride == (1, 1)
                and spec.groups == 1 and spec.pool is None):
            found[spec] = found.get(spec, 0) + 1
    return found


def winograd_build(spec: winograd.WinogradSpec, target):
    import tvm

    func = winograd.winograd_kernel(spec).with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": func}), target=target.tvm), func


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="resnet18")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    target, runner = resolve_target("llvm"), LocalRunner(number=5, repeat=1)
    print("| layer (C -> OC, out) | x | direct ms | F(2) ms | F(4) ms | direct GFLOP/s | F(2) | F(4) | rule |")
    print("|---|---|---|---|---|---|---|---|---|")
    total = {"direct": 0.0, "rule": 0.0}
    for spec, count in three_by_three_layers(args.model, target.lanes).items():
        builds = {"direct": build_candidate(TuneTask(spec, 0, ()), default_tile(spec), target)}
        for tile in winograd.TILES:
            wspec = winograd.WinogradSpec(spec.in_shape, spec.weight_shape, spec.padding, spec.has_bias,
                                          spec.activation, spec.activation_params, spec.residual, tile, spec.lanes)
            builds[f"F{tile}"] = winograd_build(wspec, target)
        times: dict[str, list[float]] = {k: [] for k in builds}
        for _ in range(args.rounds):
            for key, (lib, func) in builds.items():
                times[key].append(runner.measure(lib, func))
        ms = {k: float(np.median(v)) for k, v in times.items()}
        n, c, _, _ = spec.in_shape
        _, oc, oh, ow = spec.out_shape
        gflop = 2 * 9 * n * c * oc * oh * ow / 1e9
        chosen = winograd.choose(spec)
        rule = f"F({chosen.tile})" if chosen else "-"
        total["direct"] += ms["direct"] * count
        total["rule"] += (ms[f"F{chosen.tile}"] if chosen else ms["direct"]) * count
        label = f"{c} -> {oc}, {oh}x{ow}" + (" +residual" if spec.residual else "")
        print(f"| {label} | {count} | " + " | ".join(f"{ms[k]:.3f}" for k in builds) + " | "
              + " | ".join(f"{gflop / ms[k] * 1e3:.0f}" for k in builds) + f" | {rule} |", flush=True)
    print(f"\nall these layers (x count): direct {total['direct']:.2f} ms, as the rule picks {total['rule']:.2f} ms "
          f"({total['rule'] / total['direct']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
