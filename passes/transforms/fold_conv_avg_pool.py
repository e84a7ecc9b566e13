"""fold-conv-avg-pool: a linear conv followed by an average pool becomes a cheaper equivalent, exact up to rounding.

An average pool is linear and a conv without activation is affine, so they can trade places or merge. With
``A`` the pool (window weights a_u, summing to 1 over each window) and ``y = W * x + b`` the conv:

(a) ``pooled_first`` -- a 1x1 conv (stride 1, no padding) acts per pixel: A(W x + b) = W (A x) + b, since A
    mixes pixels only and sum a_u = 1 keeps the bias. The pool moves in front of the conv, which then runs on
    k^2/s^2 fewer pixels (a DenseNet transition: BN, ReLU, 1x1 conv, 2x2/2 avg pool runs its conv on a quarter of
    the pixels). Any window (overlap, ceil mode, padding with count_include_pad=False) keeps sum a_u = 1; with
    ``count_include_pad`` and padding the border windows sum to less than 1 and scale the bias, so the swap
    holds only for a conv without bias.
(b) ``combined`` -- a k x k conv of stride s followed by a p x p pool of stride q is ONE conv of kernel
    K = (p - 1) s + k and stride s q, per axis:
        out[y] = 1/p^2 sum_u sum_j W[j] x[(y q + u) s + j] = sum_i W'[i] x[y (s q) + i],
        W'[i]  = 1/p^2 sum_{u: 0 <= i - u s < k} W[i - u s]
    (the conv's own padding is unchanged, the bias too). Used only where it has fewer multiply-adds
    than conv + pool: a 3x3 conv + 2x2/2 pool needs 16/4 = 4 instead of 9 MACs per conv output.

Run it before fuse-conv-pool (which would otherwise fuse the pair into one kernel that still does all the MACs)
and after fold-batch-norm (a folded norm makes conv -> BN -> pool a conv -> pool).

Refusals, each counted as ``skipped.<reason>``:
- ``no_producer``: the pool's input is not a conv2d; ``shared_output``: the conv output has other users.
- ``activation_between``: an activation (a node, or one fused into the conv) sits between conv and pool:
  nothing commutes with a non-linear map.
- ``residual``: the conv adds a residual operand (not a function of the conv input alone).
- ``count_include_pad``: (a) with pool padding counted in the divisor and a conv bias (see above).
- ``dilation``: (b) for a dilated conv (the combined kernel would interleave taps; rare).
- ``pool_padding``: (b) with pool padding: the zero rows are padded after the bias, not before the conv.
- ``ceil_mode``: (b) with a partial ceil-mode window (its divisor differs).
- ``more_macs``: (b) where the combined kernel costs more multiply-adds than conv + pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from passes.core.pass_base import Decisions, Pass, PassContext, PassResult
from passes.core.pattern import Match, Pattern, scan_alternatives
from passes.core.rewrite import join_origin, replace_node
from passes.ir.cost import node_flops
from passes.ir.graph import Graph, TensorType
from passes.ir.ops import get_op
from passes.transforms.fuse_conv_activation import ACTIVATION_OPS

CONV_AVG_POOL = Pattern(roles={"conv": "conv2d", "pool": "avg_pool2d"}, edges=(("conv", "pool", 0),),
                        anchor="pool", private=("conv",))
# Matched only to say why it is refused (``activation_between``), so ``explain`` shows the near miss.
CONV_ACT_AVG_POOL = Pattern(roles={"conv": "conv2d", "act": ACTIVATION_OPS, "pool": "avg_pool2d"},
                            edges=(("conv", "act", 0), ("act", "pool", 0)), anchor="pool", private=("conv", "act"))


def pooled_first(graph: Graph, conv: str) -> bool:
    """Rewrite (a) applies: a 1x1 conv, stride 1, no padding (a per-pixel affine map)."""
    d = graph.nodes[conv]
    return d["params"]["weight"].shape[2:] == (1, 1) and d["attrs"]["stride"] == (1, 1) and \
        d["attrs"]["padding"] == (0, 0)


def combined_weight(weight: np.ndarray, stride: tuple[int, int], pool_kernel: tuple[int, int]) -> np.ndarray:
    """W' of rewrite (b): the conv kernel shifted by every pool offset (u s, v s), averaged; float64 math."""
    oc, cg, kh, kw = weight.shape
    (sh, sw), (ph, pw) = stride, pool_kernel
    out = np.zeros((oc, cg, (ph - 1) * sh + kh, (pw - 1) * sw + kw))
    for u in range(ph):
        for v in range(pw):
            out[:, :, u * sh:u * sh + kh, v * sw:v * sw + kw] += weight
    return (out / (ph * pw)).astype(weight.dtype)


def flops(op: str, in_type: TensorType, out_type: TensorType, attrs: dict, params: dict) -> int:
    return int(get_op(op).flops([in_type], [out_type], attrs, params))


def refusal(graph: Graph, match: Match) -> tuple[str, str] | None:
    """Why this conv -> avg pool is not folded, or None."""
    conv, pool = match["conv"], match["pool"]
    d, p = graph.nodes[conv], graph.nodes[pool]["attrs"]
    if "act" in match or d["attrs"]["activation"] != "none":
        return "activation_between", f"{match.get('act', conv)} applies a non-linear activation before {pool}"
    if len(graph.operands(conv)) > 1:
        return "residual", f"{conv} adds a residual"
    if pooled_first(graph, conv):
        if any(p["padding"]) and p["count_include_pad"] and "bias" in d["params"]:
            return "count_include_pad", f"{pool} counts padding in its divisor, which would scale {conv}'s bias"
        return None
    if d["attrs"]["dilation"] != (1, 1):
        return "dilation", f"{conv} has dilation {d['attrs']['dilation']}"
    if any(p["padding"]):
        return "pool_padding", f"{pool} pads the conv output with {p['padding']}"
    conv_shape = d["out_types"][0].shape[2:]
    if p["ceil_mode"] and any((n - k) % s for n, k, s in zip(conv_shape, p["kernel_size"], p["stride"])):
        return "ceil_mode", f"{pool} adds a partial ceil-mode window"
    weight = d["params"]["weight"]
    before = node_flops(graph, conv) + node_flops(graph, pool)
    after = flops("conv2d", graph.value_type(graph.operands(conv)[0]), graph.nodes[pool]["out_types"][0],
                  d["attrs"], {**d["params"], "weight": combined_stand_in(weight.shape, d["attrs"]["stride"],
                                                                          p["kernel_size"])})
    if after >= before:
        return "more_macs", f"a combined kernel costs {after} FLOPs against {before} for conv + pool"
    return None


def combined_stand_in(shape: tuple[int, ...], stride: tuple[int, int], pool_kernel: tuple[int, int]) -> np.ndarray:
    """A zero-strided stand-in of W''s shape, for FLOP counting without allocating it."""
    oc, cg, kh, kw = shape
    return np.broadcast_to(np.float32(0), (oc, cg, (pool_kernel[0] - 1) * stride[0] + kh,
                                           (pool_kernel[1] - 1) * stride[1] + kw))


@dataclass(frozen=True)
class FoldConvAvgPool(Pass):
    name = "fold-conv-avg-pool"
    summary = "avg_pool(conv(x)) -> conv(avg_pool(x)) for 1x1 convs, or one strided conv with a combined kernel"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        decide = Decisions(self, graph, ctx, work=("pooled_first", "combined"))
        matches = scan_alternatives((CONV_AVG_POOL, CONV_ACT_AVG_POOL), graph, decide,
                                    lambda match: refusal(graph, match))
        for match in matches:
            conv, pool = match["conv"], match["pool"]
            d, p = graph.nodes[conv], graph.nodes[pool]
            origin = join_origin(d["origin"], p["origin"])
            if pooled_first(graph, conv):
                pooled = graph.add_op("avg_pool2d", graph.operands(conv), attrs=p["attrs"], origin=p["origin"])
                replace_node(graph, pool, "conv2d", [pooled], d["attrs"], d["params"], origin, removed=(conv,))
                decide.done(pool, "pooled_first", f"{pool} now runs before {conv}")
                continue
            attrs = {**d["attrs"], "stride": tuple(s * q for s, q in zip(d["attrs"]["stride"], p["attrs"]["stride"]))}
            params = {**d["params"], "weight": combined_weight(d["params"]["weight"], d["attrs"]["stride"],
                                                               p["attrs"]["kernel_size"])}
            replace_node(graph, pool, "conv2d", graph.operands(conv), attrs, params, origin, removed=(conv,))
            decide.done(pool, "combined", f"{conv} and {pool} as one {params['weight'].shape[2:]} conv")
        return decide.result()
