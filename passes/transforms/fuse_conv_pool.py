"""fuse-conv-pool: ``pool(act(bn(conv2d(x))))`` becomes one ``conv2d_pool`` op, lowered to ONE kernel.

The fused kernel computes each pooled output straight from the convolution (bias and activation included): the
conv outputs a tile of pooling windows reads live in a small local buffer and are reduced at once, so the
full-size conv output is never written to memory. Exact: the same arithmetic per output.

Matched by itself, without another pass having run (a user asking for ``passes=["fuse-conv-pool"]`` gets every
conv-BN-ReLU-pool of a VGG or the ResNet stem): the batch norm and the activation between conv and pool are
optional roles. A batch norm is folded here with fold-batch-norm's algebra (``affine_of``/``folded_params``:
W' = s W, b' = s b + t per output channel); a ``requires`` would have needed a graph property that no pass
declares and would make users learn an ordering. An activation node, or one already fused into the conv, becomes
the op's ``activation``; the kernel applies those that commute with max (``ops.commutes_with_max``: relu, relu6,
clamp/hardtanh, leaky_relu with a non-negative slope) after a max pool, the others per element before it.

Windows may overlap (3x3/2) and a max pool may pad and use ceil mode (the ResNet stem: 7x7/2 conv, BN, ReLU,
maxpool 3x3/2 padding 1): the kernel computes the conv outputs a tile of windows shares once per tile (a halo),
and padding is -inf, never selected (torch guarantees every window holds a real element).

Refusals, each counted as ``skipped.<reason>``:
- ``no_producer``: the pool's input is not a conv2d (through an optional batch norm and activation).
- ``shared_output``: a conv/BN/activation output has other users or is a graph output (it must exist anyway).
- ``residual``: the conv adds a residual operand (the fused kernel takes one input).
- ``already_fused``: the conv carries an activation and another activation follows it.
- ``activation_first``: a batch norm follows a conv that already applies an activation (the norm does not
  commute with it; see fold-batch-norm).
- ``gapped_windows``: kernel < stride leaves conv outputs that no window reads (rare; the tiles would compute them).
- ``pool_dilation``: dilated pooling windows (rare; not in the kernel).
- ``pool_padding``, ``ceil_mode``: an average pool whose windows reach outside the conv output (its divisor then
  varies per window: torch's count_include_pad rules); max pools take both.
- ``cuda_target``: on cuda, unless ``on_cuda=true``. Measured on an H200 (``benchmarks/gpu_check.py``, VGG-style
  224x224): our fused GPU kernel took 1.69 ms against 1.08 ms unfused, so the pass holds back there until the GPU
  schedule of ``conv2d_pool`` wins. On CPU it pays where convs are memory-bound (``benchmarks/conv_pool.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from passes.core.pass_base import Decisions, Pass, PassContext, PassResult
from passes.core.pattern import Match, Pattern, scan_alternatives
from passes.core.rewrite import join_origin, replace_node
from passes.ir.graph import Graph
from passes.ir.ops import activation_of
from passes.transforms.fold_batch_norm import affine_of, folded_params
from passes.transforms.fold_batch_norm import refusal as fold_refusal
from passes.transforms.fuse_conv_activation import ACTIVATION_OPS

POOLS = ("max_pool2d", "avg_pool2d")


def _chain(*roles: str) -> Pattern:
    """conv -> [bn] -> [act] -> pool: each role feeds operand 0 of the next; all but the pool are private."""
    ops = {"conv": "conv2d", "bn": "batch_norm", "act": ACTIVATION_OPS, "pool": POOLS}
    return Pattern(roles={r: ops[r] for r in roles}, edges=tuple((a, b, 0) for a, b in zip(roles, roles[1:])),
                   anchor="pool", private=roles[:-1])


# Longest first: the optional roles written out as alternatives.
CONV_POOL_CHAINS = (_chain("conv", "bn", "act", "pool"), _chain("conv", "bn", "pool"), _chain("conv", "act", "pool"),
                    _chain("conv", "pool"))


def pool_refusal(graph: Graph, pool: str) -> tuple[str, str] | None:
    """Why the pool's attributes prevent fusion, or None."""
    attrs = graph.nodes[pool]["attrs"]
    kernel, stride = attrs["kernel_size"], attrs["stride"]
    if any(k < s for k, s in zip(kernel, stride)):
        return "gapped_windows", f"kernel {kernel} < stride {stride}"
    if any(d != 1 for d in attrs.get("dilation", (1, 1))):
        return "pool_dilation", f"dilation {attrs['dilation']}"
    if graph.nodes[pool]["op"] == "max_pool2d":
        return None
    if any(attrs["padding"]):
        return "pool_padding", f"average pool padding {attrs['padding']}: per-window divisors are not fused"
    in_shape = graph.value_type(graph.operands(pool)[0]).shape[2:]
    if attrs["ceil_mode"] and any((n - k) % s for n, k, s in zip(in_shape, kernel, stride)):
        return "ceil_mode", "ceil_mode adds partial average windows"
    return None


def refusal(graph: Graph, match: Match) -> tuple[str, str] | None:
    """Why this conv -> [bn] -> [act] -> pool chain is not fused, or None."""
    conv = match["conv"]
    if len(graph.operands(conv)) > 1:
        return "residual", f"{conv} adds a residual"
    activation = graph.nodes[conv]["attrs"]["activation"]
    if "act" in match and activation != "none":
        return "already_fused", f"{conv} applies {activation} before {match['act']}"
    if "bn" in match:
        why = fold_refusal(graph, conv)
        if why is not None:
            return why
    return pool_refusal(graph, match["pool"])


def fused_node(graph: Graph, match: Match) -> tuple[dict, dict, tuple[str, ...]]:
    """(attrs, params, origin) of the ``conv2d_pool`` replacing the match."""
    conv = graph.nodes[match["conv"]]
    attrs, params = dict(conv["attrs"]), dict(conv["params"])
    if "bn" in match:
        bn = graph.nodes[match["bn"]]
        params = folded_params("conv2d", params, *affine_of(bn["params"], bn["attrs"]["eps"],
                                                            conv["out_types"][0].shape[1]))
    if "act" in match:
        act = graph.nodes[match["act"]]
        attrs["activation"], attrs["activation_params"] = activation_of(act["op"], act["attrs"])
    pool = graph.nodes[match["pool"]]
    p = pool["attrs"]
    attrs |= {"pool": pool["op"][:3], "pool_kernel": p["kernel_size"], "pool_stride": p["stride"],
              "pool_padding": p["padding"], "pool_ceil_mode": p["ceil_mode"]}
    origin = join_origin(*(graph.nodes[match[r]]["origin"] for r in ("conv", "bn", "act", "pool") if r in match))
    return attrs, params, origin


@dataclass(frozen=True)
class FuseConvPool(Pass):
    name = "fuse-conv-pool"
    summary = "fuse conv2d [+bias/BN] [+activation] + max/avg pool into one conv2d_pool kernel"
    on_cuda: bool = False

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decide = Decisions(self, graph, ctx, work=("fused",))
        cuda = "cuda" in str(ctx.target) and not self.on_cuda
        matches = scan_alternatives(CONV_POOL_CHAINS, graph, decide, lambda match: (
            ("cuda_target", "slower than unfused on GPU so far; on_cuda=true forces it") if cuda
            else refusal(graph, match)))
        for match in matches:
            attrs, params, origin = fused_node(graph, match)
            inner = tuple(match[r] for r in ("conv", "bn", "act") if r in match)
            decide.done(match["pool"], "fused", "with " + ", ".join(inner))
            replace_node(graph, match["pool"], "conv2d_pool", graph.operands(match["conv"]), attrs, params, origin,
                         removed=inner)
        return decide.result()
