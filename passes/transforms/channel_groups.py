"""Channel dependency groups: which tensor axes must lose the same channels when a layer's channels are pruned.

Model. Every value carries a *channel space*: the axis that holds its channels and a tuple of segments
``(dim, repeat)`` read left to right: dim ``d`` occupies ``size(d) * repeat`` consecutive positions, its channel
``k`` at positions ``k*repeat .. k*repeat + repeat - 1`` (after ``flatten`` a conv channel is a block of H*W
features). A *dim* is a set of channels that one producer creates: a conv's or linear's output channels, an RNN's
hidden units. How ops move spaces:

- conv / linear / RNN outputs start a fresh dim; their inputs' spaces become *sites* (weight axis 1 is sliced);
- channel-wise ops (activations, pools, batch norm, dropout...) pass the space through; batch norm is a site;
- elementwise ops with two channel operands (residual add, squeeze-excite's gating mul) *unify* their dims
  (union-find): they must keep the same channels, so their producers form one group;
- ``concat`` on the channel axis joins the segment lists (offsets), ``flatten``/flatten-like ``reshape`` multiply
  the repeats, ``permute``/``select``/reductions over other axes move the axis;
- a depthwise conv (groups == in == out) ties its output to its input: same dim, the weight's axis 0 is a site;
- an LSTM/GRU/RNN's hidden size is one dim shared by every layer and direction: its gate blocks (rows of
  ``weight_ih``/``weight_hh``/biases: one segment per gate), ``weight_hh``'s columns, the next layer's input columns
  and the ``hidden_size`` attribute are sites, and its outputs carry one segment per direction.

Anything else that touches a channel axis (matmul, softmax over channels, slicing channels, grouped convs, graph
inputs and outputs...) *freezes* the dims involved, with a reason: they are never pruned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from passes.ir.graph import Graph, Value

CONVS = ("conv1d", "conv2d", "conv2d_pool")
TRANSPOSED = ("conv_transpose1d", "conv_transpose2d")
RECURRENT_GATES = {"lstm": 4, "gru": 3, "rnn": 1}
CHANNEL_WISE = ("relu", "relu6", "leaky_relu", "elu", "gelu", "silu", "mish", "sigmoid", "tanh", "hardswish",
                "hardsigmoid", "exp", "sqrt", "neg", "abs", "erf", "clamp", "dropout", "identity", "cast",
                "max_pool1d", "avg_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d", "max_pool2d",
                "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "batch_norm")
ELEMENTWISE = ("add", "sub", "mul", "div", "maximum", "minimum")
REDUCTIONS = ("mean", "sum", "amax")


@dataclass(frozen=True)
class Space:
    """Channels of a value: ``axis`` and segments ``((dim, repeat), ...)`` laid out along it."""

    axis: int
    segments: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Site:
    """Something that changes when channels go: ``params[name]`` of ``node`` along ``axis`` (kind ``param``), the
    ``value`` of constant node ``node`` (kind ``constant``), or attribute ``name`` of ``node`` (kind ``attr``;
    for ``reshape`` the entry ``axis`` of its ``shape``). ``importance``: the site's magnitudes rank channels."""

    kind: str
    node: str
    name: str
    axis: int
    space: Space
    importance: bool = False


@dataclass
class Group:
    """Dims that must keep the same channels; ``producers`` are the layers whose outputs define them."""

    root: int
    size: int
    producers: list[str] = field(default_factory=list)
    frozen: str | None = None
    frozen_detail: str = ""


class ChannelGroups:
    """Union-find over dims plus the sites that depend on them. Build with ``analyze(graph)``."""

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.producers: dict[int, list[str]] = {}
        self.frozen: dict[int, tuple[str, str]] = {}
        self.sites: list[Site] = []

    # ----------------------------------------------------------------------------------------------- union-find
    def new_dim(self, size: int, producer: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        dim = len(self.parent) - 1
        self.producers[dim] = [producer] if producer else []
        return dim

    def find(self, dim: int) -> int:
        while self.parent[dim] != dim:
            self.parent[dim] = self.parent[self.parent[dim]]
            dim = self.parent[dim]
        return dim

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        self.parent[b] = a
        self.producers[a] += self.producers.pop(b, [])
        if b in self.frozen:
            self.frozen.setdefault(a, self.frozen.pop(b))

    def freeze(self, space: Space | None, reason: str, detail: str) -> None:
        for dim, _ in space.segments if space is not None else ():
            self.frozen.setdefault(self.find(dim), (reason, detail))

    def unify(self, a: Space | None, b: Space | None, detail: str) -> Space | None:
        """Tie two spaces that must keep the same channels; mismatched layouts freeze both."""
        if a is None or b is None:
            return a or b
        shape = [(self.size[d], r) for d, r in a.segments]
        if a.axis != b.axis or shape != [(self.size[d], r) for d, r in b.segments]:
            self.freeze(a, "incompatible_layouts", detail)
            self.freeze(b, "incompatible_layouts", detail)
            return a
        for (da, _), (db, _) in zip(a.segments, b.segments):
            self.union(da, db)
        return a

    def width(self, space: Space) -> int:
        return sum(self.size[d] * r for d, r in space.segments)

    # ----------------------------------------------------------------------------------------------- results
    def groups(self) -> dict[int, Group]:
        """Every group (by root dim) with its producers and, if frozen, the first reason."""
        found: dict[int, Group] = {}
        for dim in range(len(self.parent)):
            root = self.find(dim)
            group = found.setdefault(root, Group(root, self.size[root], list(self.producers.get(root, []))))
            if root in self.frozen:
                group.frozen, group.frozen_detail = self.frozen[root]
        return found

    def positions(self, space: Space, keep: dict[int, np.ndarray]) -> np.ndarray:
        """Positions along ``space.axis`` that survive when each group root keeps ``keep[root]`` channels."""
        kept, base = [], 0
        for dim, repeat in space.segments:
            root = self.find(dim)
            channels = keep.get(root, np.arange(self.size[dim]))
            kept.append((base + channels[:, None] * repeat + np.arange(repeat)[None, :]).ravel())
            base += self.size[dim] * repeat
        return np.concatenate(kept) if kept else np.arange(0)

    def channel_scores(self, space: Space, root: int, per_position: np.ndarray) -> np.ndarray:
        """Sum ``per_position`` scores over the positions of each channel of group ``root`` in ``space``."""
        scores, base = np.zeros(self.size[root]), 0
        for dim, repeat in space.segments:
            n = self.size[dim]
            if self.find(dim) == root:
                scores += per_position[base:base + n * repeat].reshape(n, repeat).sum(axis=1)
            base += n * repeat
        return scores


class _Analysis:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.cg = ChannelGroups()
        self.spaces: dict[Value, Space | None] = {}

    def run(self) -> ChannelGroups:
        graph = self.graph
        for node in graph.topo_order():
            data = graph.nodes[node]
            spaces = [self.spaces.get(v) for v in graph.operands(node)]
            outs = self.visit(node, data["op"], spaces)
            for i in range(len(data["out_types"])):
                self.spaces[Value(node, i)] = outs[i] if i < len(outs) else None
        for value in graph.output_values():
            self.cg.freeze(self.spaces.get(value), "graph_output", f"{value} is a model output")
        return self.cg

    # ----------------------------------------------------------------------------------------------- helpers
    def fresh(self, node: str, size: int, axis: int) -> Space:
        return Space(axis, ((self.cg.new_dim(size, node), 1),))

    def frozen_fresh(self, node: str, size: int, axis: int, reason: str) -> Space:
        space = Space(axis, ((self.cg.new_dim(size), 1),))
        self.cg.freeze(space, reason, self.graph.describe(node))
        return space

    def site(self, kind: str, node: str, name: str, axis: int, space: Space | None, importance=False) -> None:
        if space is not None and (kind != "param" or name in self.graph.nodes[node]["params"]):
            self.cg.sites.append(Site(kind, node, name, axis, space, importance))

    def opaque(self, node: str, spaces: list[Space | None], reason: str) -> list[Space | None]:
        for space in spaces:
            self.cg.freeze(space, reason, self.graph.describe(node))
        return []

    def rank(self, value: Value) -> int:
        return self.graph.value_type(value).rank

    # ----------------------------------------------------------------------------------------------- visitor
    def visit(self, node: str, op: str, spaces: list[Space | None]) -> list[Space | None]:
        graph, data = self.graph, self.graph.nodes[node]
        attrs, params = data["attrs"], data["params"]
        operands = graph.operands(node)
        if op in ("input", "constant"):
            return []
        if op in CONVS:
            return [self.conv(node, spaces)]
        if op in TRANSPOSED:
            if attrs["groups"] != 1:
                return self.opaque(node, spaces, "grouped_conv")
            self.site("param", node, "weight", 0, spaces[0], importance=True)
            out = self.fresh(node, params["weight"].shape[1], 1)
            self.site("param", node, "weight", 1, out, importance=True)
            self.site("param", node, "bias", 0, out)
            return [out]
        if op == "linear":
            last = self.rank(operands[0]) - 1
            if spaces[0] is not None and spaces[0].axis != last:
                self.opaque(node, spaces, "features_not_last")
            else:
                self.site("param", node, "weight", 1, spaces[0], importance=True)
            out = self.fresh(node, params["weight"].shape[0], last)
            self.site("param", node, "weight", 0, out, importance=True)
            self.site("param", node, "bias", 0, out)
            return [out]
        if op == "embedding":
            out = self.fresh(node, params["weight"].shape[1], self.rank(operands[0]))
            self.site("param", node, "weight", 1, out, importance=True)
            return [out]
        if op in RECURRENT_GATES:
            return self.recurrent(node, op, spaces)
        if op in CHANNEL_WISE:
            if op == "batch_norm" and spaces[0] is not None:
                for name in ("running_mean", "running_var", "weight", "bias"):
                    self.site("param", node, name, 0, spaces[0])
            return [spaces[0]]
        if op in ("softmax", "log_softmax"):
            if spaces[0] is not None and attrs["dim"] % self.rank(operands[0]) == spaces[0].axis:
                return self.opaque(node, spaces, "normalized_over_channels")
            return [spaces[0]]
        if op == "pad":
            padded = range(self.rank(operands[0]) - len(attrs["pad"]) // 2, self.rank(operands[0]))
            if spaces[0] is not None and spaces[0].axis in padded:
                return self.opaque(node, spaces, "channel_axis_changed")
            return [spaces[0]]
        if op in ELEMENTWISE:
            return [self.elementwise(node, spaces)]
        if op == "concat":
            return [self.concat(node, spaces)]
        if op == "split":
            if spaces[0] is not None and attrs["dim"] % self.rank(operands[0]) == spaces[0].axis:
                return self.opaque(node, spaces, "channel_axis_changed")
            return [spaces[0]] * len(data["out_types"])
        if op in ("flatten", "reshape"):
            return [self.flatten(node, op, spaces[0])]
        if spaces[0] is None and all(s is None for s in spaces):
            return []
        if op == "permute":
            return [Space(list(attrs["dims"]).index(spaces[0].axis), spaces[0].segments)]
        if op in ("select", "slice"):
            dim = attrs["dim"] % self.rank(operands[0])
            if dim == spaces[0].axis:
                return self.opaque(node, spaces, "channel_axis_changed")
            shift = 1 if op == "select" and dim < spaces[0].axis else 0
            return [Space(spaces[0].axis - shift, spaces[0].segments)]
        if op in REDUCTIONS:
            rank, dims = self.rank(operands[0]), attrs["dim"]
            dims = {d % rank for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
            if spaces[0].axis in dims:
                return self.opaque(node, spaces, "channel_axis_changed")
            shift = 0 if attrs["keepdim"] else sum(d < spaces[0].axis for d in dims)
            return [Space(spaces[0].axis - shift, spaces[0].segments)]
        return self.opaque(node, spaces, f"unsupported_op_{op}")

    def conv(self, node: str, spaces: list[Space | None]) -> Space:
        data = self.graph.nodes[node]
        weight, groups = data["params"]["weight"], data["attrs"]["groups"]
        cout, cin = weight.shape[0], weight.shape[1] * groups
        if groups == 1:
            self.site("param", node, "weight", 1, spaces[0], importance=True)
            out = self.fresh(node, cout, 1)
            self.site("param", node, "weight", 0, out, importance=True)
        elif groups == cin == cout and spaces[0] is not None:  # depthwise: output channel c reads input channel c
            out = spaces[0]
            self.site("param", node, "weight", 0, out, importance=True)
            self.site("attr", node, "groups", 0, out)
        else:
            self.opaque(node, spaces[:1], "grouped_conv")
            out = self.frozen_fresh(node, cout, 1, "grouped_conv")
        self.site("param", node, "bias", 0, out)
        if len(spaces) > 1:  # fused residual operand: added channel by channel
            out = self.cg.unify(out, spaces[1], self.graph.describe(node))
            if spaces[1] is None:
                self.cg.freeze(out, "opaque_operand", self.graph.describe(node))
        return out

    def recurrent(self, node: str, op: str, spaces: list[Space | None]) -> list[Space | None]:
        attrs = self.graph.nodes[node]["attrs"]
        if spaces[0] is not None and spaces[0].axis != 2:
            self.opaque(node, spaces[:1], "features_not_last")
            spaces = [None] + spaces[1:]
        hidden = self.cg.new_dim(attrs["hidden_size"], node)
        one, directions = ((hidden, 1),), ("", "_reverse")[: 2 if attrs["bidirectional"] else 1]
        gates = Space(0, one * RECURRENT_GATES[op])
        for layer in range(attrs["num_layers"]):
            for suffix in directions:
                self.site("param", node, f"weight_ih_l{layer}{suffix}", 1,
                          spaces[0] if layer == 0 else Space(1, one * len(directions)), importance=True)
                for name in (f"weight_ih_l{layer}{suffix}", f"weight_hh_l{layer}{suffix}",
                             f"bias_ih_l{layer}{suffix}", f"bias_hh_l{layer}{suffix}"):
                    self.site("param", node, name, 0, gates, importance=name.startswith("weight"))
                self.site("param", node, f"weight_hh_l{layer}{suffix}", 1, Space(1, one), importance=True)
        self.site("attr", node, "hidden_size", 0, Space(0, one))
        state = Space(2, one)
        for value, initial in zip(self.graph.operands(node)[1:], spaces[1:]):
            if initial is not None:
                self.cg.unify(state, initial, self.graph.describe(node))
            elif self.graph.nodes[value.node]["op"] == "constant" and len(self.graph.users(value)) == 1:
                self.site("constant", value.node, "value", 2, state)  # ONNX spells zero states as constants
            else:
                self.cg.freeze(state, "opaque_operand", f"{self.graph.describe(node)} initial state {value}")
        return [Space(2, one * len(directions))] + [state] * (len(self.graph.nodes[node]["out_types"]) - 1)

    def elementwise(self, node: str, spaces: list[Space | None]) -> Space | None:
        graph = self.graph
        out_rank = graph.nodes[node]["out_types"][0].rank
        operands = graph.operands(node)
        merged: Space | None = None
        for value, space in zip(operands, spaces):
            if space is not None:
                aligned = Space(space.axis + out_rank - self.rank(value), space.segments)
                merged = aligned if merged is None else self.cg.unify(merged, aligned, graph.describe(node))
        if merged is None:
            return None
        width = self.cg.width(merged)
        for value, space in zip(operands, spaces):
            if space is not None:
                continue
            axis = merged.axis - (out_rank - self.rank(value))
            size = graph.value_type(value).shape[axis] if axis >= 0 else 1
            if size == 1:
                continue
            if graph.nodes[value.node]["op"] == "constant" and len(graph.users(value)) == 1 and size == width:
                self.site("constant", value.node, "value", axis, merged)
            else:
                reason = "shared_constant" if graph.nodes[value.node]["op"] == "constant" else "opaque_operand"
                self.cg.freeze(merged, reason, f"{graph.describe(node)} operand {value}")
        return merged

    def concat(self, node: str, spaces: list[Space | None]) -> Space | None:
        graph = self.graph
        operands = graph.operands(node)
        rank = self.rank(operands[0])
        dim = graph.nodes[node]["attrs"]["dim"] % rank
        known = [s for s in spaces if s is not None]
        if not known:
            return None
        if any(s.axis != dim for s in known):  # concat along another axis: channels line up element by element
            merged = known[0]
            for space in known[1:]:
                merged = self.cg.unify(merged, space, graph.describe(node))
            if len(known) < len(spaces):
                self.cg.freeze(merged, "opaque_operand", graph.describe(node))
            return merged
        segments = []
        for value, space in zip(operands, spaces):
            if space is None:
                space = self.frozen_fresh(node, graph.value_type(value).shape[dim], dim, "opaque_operand")
            segments += space.segments
        return Space(dim, tuple(segments))

    def flatten(self, node: str, op: str, space: Space | None) -> Space | None:
        """flatten, or a reshape that only merges dims (``x.view(n, -1)``): the channel axis may only be merged
        with the dims after it (channel-major blocks), never split or merged into a dim before it."""
        if space is None:
            return None
        graph = self.graph
        in_shape = graph.value_type(graph.operands(node)[0]).shape
        out_shape = graph.nodes[node]["out_types"][0].shape
        axis = space.axis
        out = None
        if out_shape[:axis] == in_shape[:axis]:
            for end in range(axis + 1, len(in_shape) + 1):
                if out_shape[axis] == math.prod(in_shape[axis:end]) and out_shape[axis + 1:] == in_shape[end:]:
                    repeat = math.prod(in_shape[axis + 1:end])
                    out = Space(axis, tuple((d, r * repeat) for d, r in space.segments))
                    break
        if out is None and op == "reshape":
            out = self.regroup(space, in_shape, out_shape)
        if out is None:
            return self.opaque(node, [space], "channel_axis_changed") or None
        if op == "reshape":
            self.site("attr", node, "shape", out.axis, out)
        return out

    @staticmethod
    def regroup(space: Space, in_shape: tuple, out_shape: tuple) -> Space | None:
        """Reshapes that move whole segments between the channel axis and the axis before it (ONNX spells a
        bidirectional RNN's output (T, N, 2H) as (T, N, 2, H) and back): merging (k, C) -> k*C repeats the
        segments k times; splitting C -> (k, C/k) needs k identical runs of segments and keeps one."""
        axis, segments = space.axis, space.segments
        if (axis > 0 and out_shape[:axis - 1] == in_shape[:axis - 1] and out_shape[axis:] == in_shape[axis + 1:]
                and out_shape[axis - 1] == in_shape[axis - 1] * in_shape[axis]):
            return Space(axis - 1, segments * in_shape[axis - 1])
        if out_shape[:axis] == in_shape[:axis] and out_shape[axis + 2:] == in_shape[axis + 1:]:
            k = out_shape[axis] if len(out_shape) > axis + 1 else 0
            if k > 1 and len(segments) % k == 0 and segments == segments[:len(segments) // k] * k:
                return Space(axis + 1, segments[:len(segments) // k])
        return None


def analyze(graph: Graph) -> ChannelGroups:
    """Channel groups of ``graph`` (needs current ``out_types``)."""
    return _Analysis(graph).run()
