"""prune-weights: unstructured magnitude pruning — zero the smallest-magnitude weights of conv and linear layers.

For each prunable layer (``scope="layer"``) or across all of them (``scope="global"``), the weights whose absolute
value is at or below the ``sparsity``-quantile are set to zero; biases are kept. The graph keeps its shape (lowering
stays dense: this pass shrinks nothing by itself, it prepares compression and sparse kernels), so every layer records
its achieved sparsity in ``meta["prune.sparsity"]`` and the pass stats count ``zeroed`` weights.

Refusals: ``too_small`` (fewer than ``min_weights`` weights: depthwise and tiny layers lose accuracy fastest and save
nothing), ``skipped_by_name`` (origin listed in ``skip``, ``;``-separated).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from passes.core.pass_base import Decisions, Pass, PassContext, PassError, PassResult
from passes.ir.graph import Graph

PRUNABLE = ("conv1d", "conv2d", "conv2d_pool", "conv_transpose1d", "conv_transpose2d", "linear")


@dataclass(frozen=True)
class PruneWeights(Pass):
    name = "prune-weights"
    summary = "zero the smallest-magnitude conv/linear weights (unstructured sparsity)"
    lossy = True
    sparsity: float = 0.5
    scope: str = "layer"
    min_weights: int = 1024
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise PassError(f"prune-weights: sparsity must be in [0, 1), got {self.sparsity}")
        if self.scope not in ("layer", "global"):
            raise PassError(f"prune-weights: scope must be 'layer' or 'global', got {self.scope!r}")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decide = Decisions(self, graph, ctx, work=("zeroed",))
        layers = []
        for node in graph.op_nodes(PRUNABLE):
            data = graph.nodes[node]
            if any(o in self.skip for o in data["origin"]):
                decide.skip(node, "skipped_by_name")
            elif data["params"]["weight"].size < self.min_weights:
                decide.skip(node, "too_small", f"{data['params']['weight'].size} < {self.min_weights} weights")
            else:
                layers.append(node)
        if not layers or self.sparsity == 0.0:
            return decide.result()
        magnitudes = {n: np.abs(graph.nodes[n]["params"]["weight"]) for n in layers}
        if self.scope == "global":
            threshold = np.quantile(np.concatenate([m.ravel() for m in magnitudes.values()]), self.sparsity)
        for node in layers:
            weight = graph.nodes[node]["params"]["weight"]
            cut = threshold if self.scope == "global" else np.quantile(magnitudes[node], self.sparsity)
            keep = magnitudes[node] > cut
            zeroed = int(np.count_nonzero(weight) - np.count_nonzero(weight * keep))
            graph.nodes[node]["params"]["weight"] = np.where(keep, weight, 0).astype(weight.dtype)
            graph.nodes[node]["meta"]["prune.sparsity"] = round(float(1.0 - keep.mean()), 6)
            if zeroed:
                decide.done(node, "zeroed", f"sparsity {1.0 - keep.mean():.3f}", count=zeroed)
        return decide.result()
