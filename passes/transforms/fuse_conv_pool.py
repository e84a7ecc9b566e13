"""fuse-conv-pool: ``pool(conv2d(x))`` becomes one ``conv2d_pool`` op, lowered to ONE kernel.

The fused kernel computes each pooled output straight from the convolution (bias and fused activation
included): a tile of conv outputs lives in registers/local memory and is reduced by the pooling window at once,
so the full-size conv output is never written to memory. Exact: same arithmetic, in the same order per output.

Fused when pooling windows tile the conv output (kernel == stride, the common 2x2/2 case): then every conv
output is computed exactly once, in the tile that pools it. Refusals, each counted as ``skipped.<reason>``:
- ``no_producer``: the pool's input is not a conv2d.
- ``shared_output``: the conv output has other users or is a graph output (it must be materialized anyway).
- ``overlapping_windows``: kernel > stride would recompute conv outputs (kernel^2/stride^2 times the FLOPs).
- ``gapped_windows``: kernel < stride leaves conv outputs no window reads (rare; our kernel tiles need coverage).
- ``pool_padding``, ``pool_dilation``, ``ceil_mode``: windows reaching outside the conv output are not fused.
- ``residual``: the conv adds a residual operand (the fused kernel takes one input).
- ``cuda_target``: on cuda, unless ``on_cuda=true``. Measured on an H200 (``benchmarks/gpu_check.py``, VGG-style
  224x224): our fused GPU kernel took 1.69 ms against 1.08 ms unfused, so the pass holds back there until the GPU
  schedule of ``conv2d_pool`` wins. On CPU it pays where convs are memory-bound (see the README's benchmark).
"""

from __future__ import annotations

from dataclasses import dataclass

from passes.core.pass_base import Decisions, Pass, PassContext, PassResult
from passes.core.pattern import Pattern
from passes.core.rewrite import join_origin, replace_node
from passes.ir.graph import Graph

CONV_POOL = Pattern(roles={"conv": "conv2d", "pool": ("max_pool2d", "avg_pool2d")},
                    edges=(("conv", "pool", 0),), anchor="pool", private=("conv",))


def refusal(graph: Graph, pool: str) -> tuple[str, str] | None:
    """Why the pool's attributes prevent fusion, or None."""
    attrs = graph.nodes[pool]["attrs"]
    if any(k > s for k, s in zip(attrs["kernel_size"], attrs["stride"])):
        return "overlapping_windows", f"kernel {attrs['kernel_size']} > stride {attrs['stride']}"
    if any(k < s for k, s in zip(attrs["kernel_size"], attrs["stride"])):
        return "gapped_windows", f"kernel {attrs['kernel_size']} < stride {attrs['stride']}"
    if any(attrs["padding"]):
        return "pool_padding", f"padding {attrs['padding']}"
    if any(d != 1 for d in attrs.get("dilation", (1, 1))):
        return "pool_dilation", f"dilation {attrs['dilation']}"
    in_shape = graph.value_type(graph.operands(pool)[0]).shape[2:]
    if attrs["ceil_mode"] and any((n - k) % s for n, k, s in zip(in_shape, attrs["kernel_size"], attrs["stride"])):
        return "ceil_mode", "ceil_mode adds partial windows"
    return None


@dataclass(frozen=True)
class FuseConvPool(Pass):
    name = "fuse-conv-pool"
    summary = "fuse conv2d [+bias] [+activation] + max/avg pool into one conv2d_pool kernel"
    on_cuda: bool = False

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decide = Decisions(self, graph, ctx, work=("fused",))
        cuda = "cuda" in str(ctx.target) and not self.on_cuda
        matches = CONV_POOL.scan(graph, decide, lambda match: (
            ("cuda_target", "slower than unfused on GPU so far; on_cuda=true forces it") if cuda
            else ("residual", f"{match['conv']} adds a residual") if len(graph.operands(match["conv"])) > 1
            else refusal(graph, match["pool"])))
        fusions = [(m["conv"], m["pool"]) for m in matches]
        for conv, pool in fusions:
            conv_data, pool_data = graph.nodes[conv], graph.nodes[pool]
            pool_attrs = pool_data["attrs"]
            attrs = {**conv_data["attrs"], "pool": pool_data["op"][:3], "pool_kernel": pool_attrs["kernel_size"],
                     "pool_stride": pool_attrs["stride"]}
            decide.done(pool, "fused", f"with {conv}")
            replace_node(graph, pool, "conv2d_pool", graph.operands(conv), attrs, dict(conv_data["params"]),
                         join_origin(conv_data["origin"], pool_data["origin"]), removed=(conv,))
        return decide.result()
