"""alter-layout: activations between convs live in NCHW[b]c, so consecutive blocked convs hand each other their
layout and no conv packs its input or unpacks its output. b is the target's fp32 vector width where it divides a
tensor's channels, else 8 (``block_for``): NCHW8c on AVX2 (Zen 3), NCHW16c on AVX-512, where 8-channel blocks
left every FMA at half width (mobilenet_v2 0.79x, efficientnet_b0 0.82x the time with 16 on a 2-core AVX-512 Xeon).

Why: a CPU's blocked direct conv (oneDNN's jit_avx2, TVM's conv2d_NCHWc, our ``backends/tvm/kernels.py``) reads
one input pixel per broadcast and accumulates a vector of ``block`` output channels; in NCHW each conv first copies
its input into NCHW[b]c and scatters its output back into planes. For memory-bound depthwise convs (MobileNet,
EfficientNet) those two copies cost more than the arithmetic. Here each eligible ``conv2d`` becomes a
``conv2d_nchwc`` whose output is blocked when some user runs blocked (another eligible conv, as input or fused
residual, or a squeeze-excite op), and whose input is read in whatever layout its producer wrote. Squeeze-excite
stays blocked too: a global average pool of a blocked value becomes a ``mean`` over H, W (a blocked 1x1 map) and
the gate product ``x * s`` multiplies two blocked tensors (``runs_blocked``). Explicit ``layout_transform`` nodes
are inserted only where a blocked value reaches an op with no blocked form (flatten, linear, other pools, concat,
a graph output...). A conv whose output feeds only NCHW users stores NCHW itself (its last store is the
transform), and one fed by an NCHW value (the 3-channel stem) packs it as before: a MobileNetV2 or EfficientNet-B0
gets one transform, of its pooled 1x1 map before the classifier. A ``conv2d_pool`` (a stem's conv + max pool)
reads NCHW but stores blocked where a blocked user reads it (its ``out_layout``): ResNet's stem feeds its first
block (and that block's residual) NCHW16c, no transform between.

Exact: ``to_layout`` is a bijection (blocked[n, c / b, h, w, c % b] = plain[n, c, h, w]) and ``conv2d_nchwc``
computes the same sums as ``conv2d``. Channel rule: a conv whose output channels are not a multiple of the block
keeps NCHW (``skipped.channels``): no zero channels are padded in, so no shape grows.

Preconditions: shapes are current; float32. Refusals, each counted as ``skipped.<reason>``:
- ``target``: not a CPU (llvm) target; the CUDA kernels are NCHW.
- ``dtype``: not float32 (the blocked layouts are built and measured for float32 only).
- ``grouped``: groups neither 1 nor depthwise (groups = C = OC): the blocked kernel has no grouped form.
- ``channels``: output channels not a multiple of 8.

A 3x3 stride-1 conv the Winograd cost rule takes at lowering is blocked like any other: the Winograd kernel reads
and writes NCHW[b]c too (its tiles gather a pixel's channels as one vector; in NCHW it gathered them across planes
and stored them back one by one). Measured on a 2-core AVX-512 Xeon, whole torchvision resnet18 in one process:
0.974x the time of the Winograd convs left NCHW.
"""

from __future__ import annotations

from dataclasses import dataclass

from passes.core.pass_base import Decisions, Pass, PassContext, PassResult
from passes.core.rewrite import replace_node
from passes.ir.graph import Graph, Value

PLAIN = "NCHW"
LAYOUT_META = "alter_layout.layout"  # on a mean/mul this pass made blocked: its output's layout
BLOCKED_OPS = ("conv2d_nchwc", "conv2d_expand_dw")  # ops with in_layout / out_layout attrs (this pass's and later)


def cpu_target(target: str) -> bool:
    """``PassContext.target`` is a name or the text of a TVM target; the blocked layout is for llvm targets."""
    return "llvm" in target and "cuda" not in target


def block_for(channels: int, lanes: int) -> int:
    """Channels per block of a tensor of ``channels`` channels: the target's fp32 lanes (a whole vector register:
    16 on AVX-512) when they divide the channels, else 8 (AVX2's vector, half an AVX-512 one); 0: no block. A
    function of the channel count alone, so every tensor a conv's input, fused residual or squeeze-excite operand
    must match already has its layout: only convs change channels, and a conv reads any block."""
    return next((b for b in (lanes, 8) if channels % b == 0), 0)


def refusal(graph: Graph, conv: str, target: str, lanes: int) -> tuple[str, str] | None:
    """Why ``conv`` (a conv2d) keeps NCHW, or None when it runs blocked (``lanes``: as ``block_for``)."""
    data = graph.nodes[conv]
    a, weight = data["attrs"], data["params"]["weight"]
    x = graph.value_type(graph.operands(conv)[0])
    oc = weight.shape[0]
    if not cpu_target(target):
        return "target", f"target {target!r}: blocked layouts are for CPU (llvm) kernels"
    if x.dtype != "float32" or str(weight.dtype) != "float32":
        return "dtype", f"{x.dtype} data, {weight.dtype} weight: blocked layouts are float32 only"
    if a["groups"] != 1 and not a["groups"] == x.shape[1] == oc:
        return "grouped", f"groups={a['groups']} of {x.shape[1]} channels: no blocked grouped kernel"
    if not block_for(oc, lanes):
        return "channels", f"{oc} output channels do not fill blocks of 8"
    return None


def runs_blocked(graph: Graph, node: str) -> bool:
    """Squeeze-excite's ops, which run on blocked values as they are: a global average pool (a mean over H, W) and
    the product of a tensor with its per-channel gate (N, C, 1, 1) or with a tensor of its own shape."""
    data = graph.nodes[node]
    if data["op"] == "adaptive_avg_pool2d":
        return data["attrs"]["output_size"] == (1, 1)
    if data["op"] != "mul" or len(graph.operands(node)) != 2:
        return False
    a, b = (graph.value_type(v) for v in graph.operands(node))
    gate = lambda t, full: t.shape == full.shape or t.shape == (*full.shape[:2], 1, 1)  # noqa: E731
    return a.rank == b.rank == 4 and a.dtype == b.dtype == "float32" and (gate(a, b) or gate(b, a))


def blocked_values(graph: Graph, eligible: set[str], producers: set[str] = frozenset()) -> set[str]:
    """The nodes whose output is stored blocked: the largest set in which every eligible conv and every
    ``producers`` node (a conv2d_pool: it reads NCHW, may store blocked) has a blocked consumer (an eligible conv,
    or a squeeze-excite op that runs blocked) and every squeeze-excite op reads only blocked values (a fixed
    point, from all candidates down)."""
    squeeze_excite = {n for n in graph.op_nodes(("adaptive_avg_pool2d", "mul")) if runs_blocked(graph, n)}
    chosen = eligible | producers | squeeze_excite
    while True:
        consumers = eligible | (chosen & squeeze_excite)
        drop = {n for n in chosen if (
            not any(user in consumers for user, _ in graph.users(Value(n, 0))) if n not in squeeze_excite
            else not all(v.node in chosen for v in graph.operands(n)))}
        if not drop:
            return chosen
        chosen -= drop


def layout_of(graph: Graph, value: Value) -> str:
    data = graph.nodes[value.node]
    if LAYOUT_META in data["meta"]:
        return data["meta"][LAYOUT_META]
    if data["op"] in BLOCKED_OPS or data["op"] == "conv2d_pool":
        return data["attrs"]["out_layout"]
    return data["attrs"]["dst"] if data["op"] == "layout_transform" else PLAIN


@dataclass(frozen=True)
class AlterLayout(Pass):
    name = "alter-layout"
    summary = "keep activations between CPU convs in NCHW[b]c (blocked), with layout transforms only at the edges"
    requires = ("shapes",)
    block: int = 0         # channels per block (``block_for``): 0 = ``PassContext.lanes``, 16 AVX-512 / 8 AVX2

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decide = Decisions(self, graph, ctx, work=("blocked", "transforms"))
        lanes = self.block or ctx.lanes

        def blocked_layout(node: str) -> str:
            return f"NCHW{block_for(graph.value_type(Value(node, 0)).shape[1], lanes)}c"

        eligible, producers = set(), set()
        for conv in graph.op_nodes(("conv2d", "conv2d_pool")):
            why = refusal(graph, conv, ctx.target, lanes)
            if why is None:
                (eligible if graph.nodes[conv]["op"] == "conv2d" else producers).add(conv)
            else:
                decide.skip(conv, *why)
        stores_blocked = blocked_values(graph, eligible, producers)
        transforms: dict[tuple[Value, str], Value] = {}

        def convert(value: Value, dst: str) -> Value:
            src = layout_of(graph, value)
            if src == dst:
                return value
            if (value, dst) not in transforms:
                transforms[value, dst] = graph.add_op("layout_transform", [value], {"src": src, "dst": dst},
                                                      origin=graph.nodes[value.node]["origin"],
                                                      name=f"{value.node}_to_{dst}")
                decide.done(value.node, "transforms", f"{src} -> {dst}")
            return transforms[value, dst]

        for node in graph.topo_order():
            data, operands = graph.nodes[node], graph.operands(node)
            out_layout = blocked_layout(node) if node in stores_blocked else PLAIN
            in_layout = layout_of(graph, operands[0]) if operands else PLAIN
            if node in eligible and (in_layout, out_layout) != (PLAIN, PLAIN):
                # the kernel reads its input in either layout; a fused residual comes in the output's layout
                operands = [operands[0], *(convert(r, out_layout) for r in operands[1:])]
                attrs = {**data["attrs"], "in_layout": in_layout, "out_layout": out_layout}
                replace_node(graph, node, "conv2d_nchwc", operands, attrs, data["params"], data["origin"])
                decide.done(node, "blocked", f"{in_layout} -> {out_layout}")
            elif node in producers and node in stores_blocked:  # a conv2d_pool: NCHW in, its pooled output blocked
                replace_node(graph, node, "conv2d_pool", [convert(v, PLAIN) for v in operands],
                             {**data["attrs"], "out_layout": out_layout}, data["params"], data["origin"])
                decide.done(node, "blocked", f"{PLAIN} -> {out_layout}")
            elif node in stores_blocked and node not in eligible:  # squeeze-excite: the pool as a mean over H, W
                pool = data["op"] == "adaptive_avg_pool2d"
                new = replace_node(graph, node, "mean" if pool else "mul", operands,
                                   {"dim": (2, 3), "keepdim": True} if pool else data["attrs"], data["params"],
                                   data["origin"])
                graph.nodes[new.node]["meta"][LAYOUT_META] = out_layout
                decide.done(node, "blocked", f"{data['op']} on {out_layout}")
            elif data["op"] in BLOCKED_OPS or LAYOUT_META in data["meta"]:  # laid out by an earlier run
                continue
            elif data["op"] not in ("input", "layout_transform"):
                plain = [convert(v, PLAIN) for v in operands]
                if plain != operands:
                    graph.set_operands(node, plain)
        for value in graph.output_values():
            if layout_of(graph, value) != PLAIN:
                graph.replace_output(value, convert(value, PLAIN))
        return decide.result()
