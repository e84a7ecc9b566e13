"""prune-channels: structured channel pruning over dependency groups — the graph physically shrinks.

Groups come from ``channel_groups.analyze``: conv/linear output channels with every batch norm, activation and
consumer in-channel that follows; residual adds and gating muls merge groups; concat offsets; depthwise convs tie
in to out; flatten -> linear maps a channel to its block of features; an LSTM/GRU/RNN's hidden size is a group.
Removing channel k of a group deletes, at every site of the group, the weight rows/columns, bias and norm entries,
constant slices and attribute counts that belong to k, so every consumer computes exactly what it computed before
minus the contribution of the removed channels. Nothing is masked: params and FLOPs drop (``opt.report``).

Importance of channel k in a group (summed over the group's weight sites s, each normalized by its mean so that
layers of different scale count alike):  ``I_k = sum_s ||W_s[k]|| / mean_j ||W_s[j]||`` with the L1 or L2 norm over
every weight element that belongs to k (producer rows and consumer columns: the whole slice that disappears);
``bn_scale`` uses ``|gamma_k|`` of the group's batch norms instead (network slimming; run before fold-batch-norm).

Allocation: ``uniform`` removes ``ratio`` of every prunable group; ``global`` ranks all channels of all groups by
normalized importance and removes the lowest ``ratio`` of the total (so groups with skewed importance lose more).
Keep counts are rounded to a multiple of ``round_to`` (kernels vectorize over channels) and kept >= ``min_channels``.

Refusals, counted once per group as ``skipped.<reason>`` (see ``explain``): ``graph_output`` (a model output's
size is the interface), ``grouped_conv``, ``features_not_last``, ``normalized_over_channels`` (softmax over them),
``channel_axis_changed`` (sliced, reshaped across, reduced), ``incompatible_layouts``, ``opaque_operand`` (combined
with a graph input or an unprunable tensor), ``shared_constant``, ``unsupported_op_<op>``, ``skipped_by_name``
(a producer's name or origin matches ``skip``), ``no_bn`` (``bn_scale`` without a batch norm), ``too_small``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from passes.core.pass_base import Decisions, Pass, PassContext, PassError, PassResult
from passes.ir.graph import Graph
from passes.transforms.channel_groups import ChannelGroups, Group, Site, analyze
from passes.transforms.infer_shapes import InferShapes


@dataclass(frozen=True)
class PruneChannels(Pass):
    name = "prune-channels"
    summary = "remove whole channels (conv/linear outputs, RNN hidden units) by dependency group"
    lossy = True
    ratio: float = 0.5
    importance: str = "l1"
    allocation: str = "uniform"
    round_to: int = 1
    min_channels: int = 1
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise PassError(f"prune-channels: ratio must be in [0, 1), got {self.ratio}")
        if self.importance not in ("l1", "l2", "bn_scale"):
            raise PassError(f"prune-channels: importance must be l1, l2 or bn_scale, got {self.importance!r}")
        if self.allocation not in ("uniform", "global"):
            raise PassError(f"prune-channels: allocation must be uniform or global, got {self.allocation!r}")
        if self.round_to < 1 or self.min_channels < 1:
            raise PassError("prune-channels: round_to and min_channels must be >= 1")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decide = Decisions(self, graph, ctx, work=("pruned_groups", "removed_channels"))
        cg, keep = self.plan(graph, decide)
        groups, order = cg.groups(), {n: i for i, n in enumerate(graph.topo_order())}
        for root, kept in keep.items():
            size, producers = cg.size[root], sorted(groups[root].producers, key=order.__getitem__)
            decide.done(producers[0], "pruned_groups", f"{size} -> {len(kept)} channels, layers {producers}")
            decide.stats["removed_channels"] += size - len(kept)
            for node in producers:
                graph.nodes[node]["meta"]["prune.channels"] = [size, len(kept)]
        if keep:
            _apply(graph, cg, keep)
        return decide.result()

    def plan(self, graph: Graph, decide: Decisions | None = None) -> tuple[ChannelGroups, dict[int, np.ndarray]]:
        """The groups and, for each group that loses channels, the sorted channel indices it keeps."""
        cg = analyze(graph)
        candidates: dict[int, np.ndarray] = {}
        for root, group in cg.groups().items():
            if not group.producers:
                continue
            reason, detail = self._refusal(graph, group)
            scores = None if reason else self._importance(graph, cg, root)
            if scores is None:
                reason, detail = reason or "no_bn", detail or "importance=bn_scale needs a batch norm in the group"
                if decide is not None:
                    decide.skip(group.producers[0], reason, detail)
                continue
            candidates[root] = scores
        keep = self._allocate(cg, candidates)
        return cg, {root: kept for root, kept in keep.items() if len(kept) < cg.size[root]}

    def _refusal(self, graph: Graph, group: Group) -> tuple[str | None, str]:
        if group.frozen:
            return group.frozen, group.frozen_detail
        for node in group.producers:
            if graph.matches(node, self.skip):
                return "skipped_by_name", f"{node} matches skip={list(self.skip)}"
        if group.size <= self.min_channels:
            return "too_small", f"{group.size} channels <= min_channels={self.min_channels}"
        return None, ""

    def _importance(self, graph: Graph, cg: ChannelGroups, root: int) -> np.ndarray | None:
        total, any_site = np.zeros(cg.size[root]), False
        for site in cg.sites:
            if site.kind != "param" or not _touches(cg, site, root):
                continue
            if self.importance == "bn_scale":
                if graph.nodes[site.node]["op"] != "batch_norm" or site.name != "weight":
                    continue
                per_position = np.abs(np.asarray(graph.nodes[site.node]["params"]["weight"], np.float64))
            elif site.importance:
                weight = np.moveaxis(np.asarray(graph.nodes[site.node]["params"][site.name], np.float64),
                                     site.axis, 0)
                flat = weight.reshape(weight.shape[0], -1)
                per_position = np.abs(flat).sum(1) if self.importance == "l1" else (flat ** 2).sum(1)
            else:
                continue
            scores = cg.channel_scores(site.space, root, per_position)
            if self.importance == "l2":
                scores = np.sqrt(scores)
            mean = scores.mean()
            total += scores / mean if mean > 0 else scores
            any_site = True
        return total if any_site else None

    def _allocate(self, cg: ChannelGroups, scores: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Channels each group keeps (sorted indices)."""
        if self.allocation == "uniform":
            counts = {root: len(s) - int(np.floor(len(s) * self.ratio)) for root, s in scores.items()}
        else:
            ranked = sorted((float(v), root, i) for root, s in scores.items() for i, v in enumerate(s / s.mean()
                            if s.mean() > 0 else s))
            budget = int(np.floor(sum(len(s) for s in scores.values()) * self.ratio))
            counts = {root: len(s) for root, s in scores.items()}
            for _, root, _ in ranked:
                if budget == 0:
                    break
                if counts[root] > self.min_channels:
                    counts[root] -= 1
                    budget -= 1
        keep = {}
        for root, s in scores.items():
            n = len(s)
            count = max(self.round_to, int(round(counts[root] / self.round_to)) * self.round_to)
            count = min(n, max(count, self.min_channels))
            keep[root] = np.sort(np.argsort(-s, kind="stable")[:count])
        return keep


def _touches(cg: ChannelGroups, site: Site, root: int) -> bool:
    return any(cg.find(d) == root for d, _ in site.space.segments)


def _apply(graph: Graph, cg: ChannelGroups, keep: dict[int, np.ndarray]) -> None:
    """Cut every site down to the kept positions, then re-infer every node's output types."""
    for site in cg.sites:
        if not any(cg.find(d) in keep for d, _ in site.space.segments):
            continue
        positions = cg.positions(site.space, keep)
        data = graph.nodes[site.node]
        if site.kind in ("param", "constant"):
            data["params"][site.name] = np.take(data["params"][site.name], positions, axis=site.axis)
        elif site.name == "shape":
            shape = list(data["attrs"]["shape"])
            if shape[site.axis] != -1:
                shape[site.axis] = len(positions)
            data["attrs"]["shape"] = tuple(shape)
        else:  # groups of a depthwise conv, hidden_size of an RNN
            data["attrs"][site.name] = len(positions)
    InferShapes().run(graph, PassContext())
