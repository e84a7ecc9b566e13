"""One rank of ``test_distributed.py``: ``python -m tests.passes.distributed_worker OUTDIR`` under torchrun's
environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Without it, the same code runs in one process.

Distills a pruned student on ``ITEMS`` (this rank's shard), calibrates ``quantize`` with every observer and once
accuracy-aware, and writes what it ended with to ``OUTDIR/rank<r>.npz`` (the student's weights) and
``rank<r>.json`` (the scales and the accuracy-aware stats).
Progress goes to stdout through ``print``: only rank 0 may print.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from frontend.torch_fx import from_torch
from passes.core import distributed
from passes.core.pass_base import PassContext
from passes.core.pipeline import Pipeline
from passes.transforms.distill import Distill
from passes.transforms.prune_channels import PruneChannels
from passes.transforms.quantize import Quantize

torch.manual_seed(0)
MODEL = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).eval()
X = (torch.randn(1, 3, 6, 6),)
ITEMS = [(torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))) for _ in range(8)]  # 8 items of 4: 4 steps on 2 ranks
DISTILL = Distill(epochs=3, lr=0.01, alpha=0.7)
OBSERVERS = ("minmax", "percentile", "entropy")


def distilled(items: list, progress=None) -> dict[str, np.ndarray]:
    """The pruned + distilled student's weights, ``node.param`` -> array."""
    graph = from_torch(MODEL, X)
    Pipeline([PruneChannels(ratio=0.5), DISTILL]).run(graph, PassContext(data=items, progress=progress))
    return {f"{n}.{k}": np.asarray(v) for n, d in graph.nodes(data=True) for k, v in d["params"].items()}


def scales(items: list) -> dict[str, list]:
    """Per observer and quantized layer: the (scale, zero_point) of its input and output."""
    found = {}
    for observer in OBSERVERS:
        graph = from_torch(MODEL, X)
        Quantize(observer=observer).run(graph, PassContext(data=items))
        for node, data in graph.nodes(data=True):
            if "quantize.input" in data["meta"]:
                found[f"{observer}.{node}"] = [list(data["meta"]["quantize.input"]),
                                               list(data["meta"]["quantize.output"])]
    return found


def top1(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((outputs.argmax(-1) == labels).float().mean())


def accuracy_aware_stats(items: list) -> dict[str, int]:
    """The stats of an accuracy-aware quantize (metric totals and SQNR sums reduced over the ranks)."""
    graph = from_torch(MODEL, X)
    return Quantize(metric=top1, tolerance=0.0).run(graph, PassContext(data=items)).stats


def main(out: Path) -> None:
    rank = distributed.world().rank
    np.savez(out / f"rank{rank}.npz", **distilled(ITEMS, progress=print))
    (out / f"rank{rank}.json").write_text(json.dumps({"scales": scales(ITEMS), "stats": accuracy_aware_stats(ITEMS)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
