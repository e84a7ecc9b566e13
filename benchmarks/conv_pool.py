"""Conv+pool: the fused kernel and the algebraic avg-pool fold against their unfused pipelines, same process.

    python benchmarks/conv_pool.py [--rounds 7] [--cases stem,stack,densenet] [--json out.json]

Cases (batch 1, fp32, CPU, seeded random weights; torchvision's densenet121 is built without a download):
- ``stem``: ResNet-18's stem, conv 7x7/2 3->64 + BN + ReLU + max pool 3x3/2 padding 1 over 224x224
  (overlapping, padded windows): ``fuse-conv-pool`` on vs off.
- ``stack``: conv3x3-ReLU-maxpool2x2 three times over a 512x512 image with 3->8->16->16 channels (memory-bound
  convs): ``fuse-conv-pool`` on vs off.
- ``vgg``: torchvision vgg11_bn at 224x224, the default pipeline with and without ``fuse-conv-pool`` (its five
  conv-BN-ReLU-maxpool 2x2/2: the first runs as the blocked conv with the pool in its epilogue, the other four as
  Winograd then the pool).
- ``densenet``: torchvision densenet121 at 224x224, the default pipeline with and without ``fold-conv-avg-pool``
  (its three transitions: BN, ReLU, 1x1 conv, 2x2/2 avg pool): FLOPs, latency and the worst error against PyTorch.

Each round times A then B with TVM's time evaluator (``CompiledModule.time_ms``, median of its repeats); the rows
report the median over rounds, the spread (min-max) and the median of per-round ratios B/A. The machine may be
shared: read ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import passes  # noqa: E402
from passes.core.registry import PRESETS  # noqa: E402

UNFUSED = ["fold-batch-norm", "fuse-conv-activation"]
FUSED = [*UNFUSED, "fuse-conv-pool"]
DEFAULT = list(PRESETS["default"])
DEFAULT_WITHOUT_FOLD = [p for p in DEFAULT if p != "fold-conv-avg-pool"]
DEFAULT_WITHOUT_FUSE = [p for p in DEFAULT if p != "fuse-conv-pool"]


def seeded(model: nn.Module) -> nn.Module:
    """Deterministic weights and non-trivial batch-norm statistics."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / (m.weight[0].numel() ** 0.5))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def stem() -> tuple[nn.Module, torch.Tensor]:
    return seeded(nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                nn.MaxPool2d(3, 2, 1))), torch.randn(1, 3, 224, 224)


def stack() -> tuple[nn.Module, torch.Tensor]:
    layers, channels = [], 3
    for width in (8, 16, 16):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    return seeded(nn.Sequential(*layers)), torch.randn(1, 3, 512, 512)


def vgg() -> tuple[nn.Module, torch.Tensor]:
    import torchvision

    return seeded(torchvision.models.vgg11_bn(weights=None)), torch.randn(1, 3, 224, 224)


def densenet() -> tuple[nn.Module, torch.Tensor]:
    import torchvision

    return seeded(torchvision.models.densenet121(weights=None)), torch.randn(1, 3, 224, 224)


# name -> (model maker, passes A, passes B, calls per timing: TVM's time evaluator number x repeat)
CASES = {"stem": (stem, UNFUSED, FUSED, (10, 5)), "stack": (stack, UNFUSED, FUSED, (10, 5)),
         "vgg": (vgg, DEFAULT_WITHOUT_FUSE, DEFAULT, (1, 3)),
         "densenet": (densenet, DEFAULT_WITHOUT_FOLD, DEFAULT, (1, 3))}


def compare(name: str, rounds: int) -> dict:
    make, passes_a, passes_b, (number, repeat) = CASES[name]
    torch.manual_seed(0)
    model, x = make()
    with torch.no_grad():
        expected = model(x)
    built = {}
    for label, spec in (("A", passes_a), ("B", passes_b)):
        opt = passes.optimize(model, passes=spec, example_inputs=(x,), measure=False)
        got = torch.as_tensor(opt(x))
        scale = float(expected.abs().max())
        built[label] = {"opt": opt, "flops": opt.report.flops["after"], "times": [],
                        "max_error_rel": float((got - expected).abs().max()) / scale,
                        "ops": sorted({d["op"] for _, d in opt.graph.nodes(data=True)})}
    for _ in range(rounds):  # interleaved: A, B, A, B, ...
        for label in ("A", "B"):
            built[label]["times"].append(built[label]["opt"].compiled.time_ms(x, number=number, repeat=repeat))
    ratios = [b / a for a, b in zip(built["A"]["times"], built["B"]["times"])]
    row = {"case": name, "A": passes_a, "B": passes_b, "ratio_median": statistics.median(ratios),
           "ratio_min": min(ratios), "ratio_max": max(ratios)}
    for label, b in built.items():
        row[label + "_ms_median"] = statistics.median(b["times"])
        row[label + "_ms_min"], row[label + "_ms_max"] = min(b["times"]), max(b["times"])
        row[label + "_flops"] = b["flops"]
        row[label + "_max_error_rel"] = b["max_error_rel"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cases", default="stem,stack,densenet")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    print("| case | A | B | A ms (min-max) | B ms (min-max) | B/A median (min-max) | GFLOP A -> B | max rel err A, B |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.cases.split(","):
        row = compare(name, args.rounds)
        rows.append(row)
        a_desc = {"densenet": "default - fold-conv-avg-pool", "vgg": "default - fuse-conv-pool"}.get(name, "unfused")
        b_desc = "default" if name in ("densenet", "vgg") else "fuse-conv-pool"
        print(f"| {name} | {a_desc} | {b_desc} "
              f"| {row['A_ms_median']:.2f} ({row['A_ms_min']:.2f}-{row['A_ms_max']:.2f}) "
              f"| {row['B_ms_median']:.2f} ({row['B_ms_min']:.2f}-{row['B_ms_max']:.2f}) "
              f"| {row['ratio_median']:.3f} ({row['ratio_min']:.3f}-{row['ratio_max']:.3f}) "
              f"| {row['A_flops'] / 1e9:.3f} -> {row['B_flops'] / 1e9:.3f} "
              f"| {row['A_max_error_rel']:.1e}, {row['B_max_error_rel']:.1e} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
