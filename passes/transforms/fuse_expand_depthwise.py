"""fuse-expand-depthwise: a 1x1 expand conv and the depthwise conv reading it become one ``conv2d_expand_dw``.

Why: an inverted residual block (MobileNetV2, EfficientNet, MnasNet) is expand 1x1 (+BN, activation) -> depthwise
KxK (+BN, activation) -> project 1x1. The expanded tensor is 4-6x the block's input (mobilenet_v2: 96x112x112,
4.8 MB; 144x56x56, 1.8 MB) and only the depthwise conv reads it. Fused, each task of the kernel expands a band of
rows of a few channel blocks into a cache-resident buffer and filters it there (``backends/tvm/expand_depthwise.py``):
the expanded tensor is never written to memory, and the depthwise conv's zero-border copy of it disappears. Exact:
the same arithmetic per output (the zero padding is applied after the expand's activation, as in the two convs).

Runs after alter-layout, on its ``conv2d_nchwc`` pairs (the CPU kernels, NCHW[b]c in and out; the input's block
may differ from the output's); part of ``optimize()``'s default pipeline. Shown by ``explain`` and the printed IR;
``passes=[...]`` without it keeps the two kernels.

Refusals, each counted as ``skipped.<reason>``:
- ``no_expand``: the depthwise conv's input is not a 1x1, stride-1, unpadded, ungrouped ``conv2d_nchwc``.
- ``shared``: the expanded tensor has other users or is a graph output (it must be materialized anyway).
- ``residual``: either conv adds a residual operand or scales its input (fuse-conv-add, fold-channel-scale).
- ``layout``: the expand's input or the depthwise output is not in the blocked layout (the kernel is NCHW[b]c).
- ``dilation``: a dilated depthwise window.
- ``dtype``: not float32.
- ``small_map``: the depthwise output is smaller than ``min_size`` x ``min_size`` (default 28): there the expanded
  tensor fits in cache anyway, and the kernel's overheads (the border rows and columns it expands and then zeroes:
  16 x 18 pixels for 14 x 14 at 14x14) outweigh what it saves. Measured on Zen 3 (2 cores), mobilenet_v2 in one
  process against the default (15 alternating rounds): also fusing the 14x14 blocks 1.036x the time, the 14x14 and
  7x7 ones 1.033x.
- ``target``: not a CPU (llvm) target (alter-layout makes no ``conv2d_nchwc`` there; no CUDA kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

from passes.core.pass_base import Decisions, Pass, PassContext, PassResult
from passes.core.rewrite import join_origin, replace_node
from passes.ir.graph import Graph
from passes.transforms.alter_layout import PLAIN, cpu_target

MIN_SIZE = 28  # the smallest depthwise output map fused by default (``small_map``)


def is_depthwise(graph: Graph, conv: str) -> bool:
    """A conv with one group per channel (groups = C = OC > 1)."""
    data = graph.nodes[conv]
    oc, per_group = data["params"]["weight"].shape[:2]
    return data["attrs"]["groups"] == oc > 1 and per_group == 1


def is_expand(data: dict) -> bool:
    """An ungrouped, unpadded, stride-1 1x1 ``conv2d_nchwc`` (a node's data)."""
    a = data["attrs"]
    return (data["op"] == "conv2d_nchwc" and a["groups"] == 1 and data["params"]["weight"].shape[2:] == (1, 1)
            and a["stride"] == (1, 1) and a["padding"] == (0, 0))


def refusal(graph: Graph, dw: str, target: str, min_size: int) -> tuple[str, str] | None:
    """Why the depthwise ``conv2d_nchwc`` ``dw`` is not fused with the conv producing its input, or None."""
    expanded = graph.operands(dw)[0]
    expand, d = graph.nodes[expanded.node], graph.nodes[dw]
    if not cpu_target(target):
        return "target", f"target {target!r}: the fused kernel is CPU (llvm) only"
    if not is_expand(expand):
        return "no_expand", f"{expanded.node} ({expand['op']}) is not a 1x1 stride-1 unpadded conv"
    if len(graph.users(expanded)) != 1 or graph.is_graph_output(expanded):
        return "shared", f"{expanded.node} has other users"
    if len(graph.operands(dw)) > 1 or len(graph.operands(expanded.node)) > 1:
        return "residual", "a fused residual or input scale"
    a, da = expand["attrs"], d["attrs"]
    layouts = {a["out_layout"], da["in_layout"], da["out_layout"]}
    if len(layouts) != 1 or PLAIN in layouts | {a["in_layout"]}:
        return "layout", f"{a['in_layout']} -> {da['out_layout']}: the fused kernel is NCHW[b]c in and out"
    if da["dilation"] != (1, 1):
        return "dilation", f"dilation {da['dilation']}"
    dtypes = {graph.value_type(expanded).dtype, *(str(p.dtype) for n in (expand, d) for p in n["params"].values())}
    if dtypes != {"float32"}:
        return "dtype", f"{sorted(dtypes)}: the fused kernel is float32"
    size = d["out_types"][0].shape[2:4]
    if min(size) < min_size:
        return "small_map", f"{size[0]}x{size[1]} output < {min_size}x{min_size}: the expanded tensor fits in cache"
    return None


@dataclass(frozen=True)
class FuseExpandDepthwise(Pass):
    name = "fuse-expand-depthwise"
    summary = "fuse a 1x1 expand conv and the depthwise conv reading it into one conv2d_expand_dw kernel (CPU)"
    min_size: int = MIN_SIZE  # the smallest depthwise output map fused

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decide = Decisions(self, graph, ctx, work=("fused",))
        chosen = []
        for dw in graph.op_nodes("conv2d_nchwc"):
            if not is_depthwise(graph, dw):
                continue
            why = refusal(graph, dw, str(ctx.target), self.min_size)
            if why is None:
                chosen.append(dw)
            else:
                decide.skip(dw, *why)
        for dw in chosen:
            expand = graph.operands(dw)[0].node
            e, d = graph.nodes[expand], graph.nodes[dw]
            attrs = {"stride": d["attrs"]["stride"], "padding": d["attrs"]["padding"],
                     "activation": e["attrs"]["activation"], "activation_params": e["attrs"]["activation_params"],
                     "dw_activation": d["attrs"]["activation"], "dw_activation_params": d["attrs"]["activation_params"],
                     "in_layout": e["attrs"]["in_layout"], "out_layout": d["attrs"]["out_layout"]}
            params = {**e["params"], **{"dw_" + k: v for k, v in d["params"].items()}}
            replace_node(graph, dw, "conv2d_expand_dw", graph.operands(expand), attrs, params,
                         join_origin(e["origin"], d["origin"]), removed=(expand,))
            decide.done(dw, "fused", f"with {expand}")
        return decide.result()
