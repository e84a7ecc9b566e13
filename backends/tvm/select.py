"""Kernel selection: which kernel lowers each node on a target (our conv / dense / integer / recurrent kernels or
Relax ops), decided once per graph (``select_kernels``).

Lowering and tuning both read these decisions, so the tuner tunes exactly the kernels the build will use and
neither asks the other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from backends.tvm import cuda_conv, cuda_rnn, winograd
from backends.tvm.expand_depthwise import ExpandDepthwiseSpec
from backends.tvm.kernels import ConvSpec, DenseSpec, dense_spec, supports
from backends.tvm.qkernels import groups_fit
from backends.tvm.winograd import WinogradSpec
from passes.ir.graph import Graph, Value
from passes.ir.ops import conv_operands, layout_block


def conv_spec_of(graph: Graph, node: str, lanes: int = 16) -> ConvSpec:
    """The kernel spec of a conv2d / conv2d_pool / conv2d_nchwc node (also what the tuner tunes, so the keys agree).
    ``in_shape`` is always the logical NCHW shape; a blocked layout is in ``in_block`` / ``out_block``."""
    d = graph.nodes[node]
    a, p = d["attrs"], d["params"]
    operands = graph.operands(node)
    in_block, out_block = layout_block(a.get("in_layout", "NCHW")), layout_block(a.get("out_layout", "NCHW"))
    in_shape = graph.value_type(operands[0]).shape
    if in_block:  # (N, C/b, H, W, b) -> (N, C, H, W)
        in_shape = (in_shape[0], in_shape[1] * in_block, *in_shape[2:4])
    return ConvSpec(in_shape=in_shape, weight_shape=tuple(p["weight"].shape),
                    stride=a["stride"], padding=a["padding"], dilation=a["dilation"], groups=a["groups"],
                    has_bias="bias" in p, activation=a["activation"], activation_params=tuple(a["activation_params"]),
                    residual=conv_operands(operands, a)[1] is not None, pool=a.get("pool"),
                    pool_kernel=a.get("pool_kernel", (1, 1)),
                    pool_stride=a.get("pool_stride", (1, 1)), pool_padding=a.get("pool_padding", (0, 0)),
                    pool_ceil_mode=a.get("pool_ceil_mode", False), dtype=graph.value_type(operands[0]).dtype,
                    lanes=lanes, in_block=in_block, out_block=out_block)


KERNEL_DTYPES = ("float32", "bfloat16", "float16")  # our kernels store these and accumulate in fp32


def _kernel_dtype(graph: Graph, node: str) -> bool:
    """The node's float operands and params all have one dtype our kernels take (mixed-precision graphs)."""
    d = graph.nodes[node]
    dtypes = {graph.value_type(v).dtype for v in graph.operands(node)}
    dtypes |= {str(p.dtype) for k, p in d["params"].items() if k == "weight"}
    bias = d["params"].get("bias")
    return (len(dtypes) == 1 and next(iter(dtypes)) in KERNEL_DTYPES
            and (bias is None or str(bias.dtype) in dtypes | {"float32"}))


def uses_conv_kernel(graph: Graph, node: str, target_kind: str, lanes: int = 16) -> ConvSpec | None:
    """The spec when ``node`` lowers to our conv kernel on ``target_kind`` (CPU conv2d and conv2d_nchwc, any
    conv2d_pool)."""
    d = graph.nodes[node]
    if d["op"] not in ("conv2d", "conv2d_pool", "conv2d_nchwc") or not _kernel_dtype(graph, node):
        return None
    if d["op"] in ("conv2d", "conv2d_nchwc") and target_kind != "llvm":
        return None
    spec = conv_spec_of(graph, node, lanes)
    return spec if supports(spec) else None


def expand_dw_spec_of(graph: Graph, node: str, target_kind: str) -> ExpandDepthwiseSpec | None:
    """The fused kernel's spec for a ``conv2d_expand_dw`` on CPU, float32, NCHW[b]c in and out (fuse-expand-depthwise
    makes only these; the input's block may differ from the output's); None otherwise (it lowers as the two convs in
    Relax)."""
    d = graph.nodes[node]
    a, p = d["attrs"], d["params"]
    in_block, block = layout_block(a["in_layout"]), layout_block(a["out_layout"])
    x = graph.value_type(graph.operands(node)[0])
    if (target_kind != "llvm" or not in_block or not block
            or {x.dtype, *(str(v.dtype) for v in p.values())} != {"float32"}):
        return None
    n, cb, h, w, _ = x.shape
    return ExpandDepthwiseSpec(in_shape=(n, cb * in_block, h, w), expanded=p["weight"].shape[0],
                               kernel=tuple(p["dw_weight"].shape[2:]), stride=a["stride"], padding=a["padding"],
                               block=block, in_block=in_block if in_block != block else 0, has_bias="bias" in p,
                               dw_has_bias="dw_bias" in p,
                               activation=a["activation"], activation_params=tuple(a["activation_params"]),
                               dw_activation=a["dw_activation"],
                               dw_activation_params=tuple(a["dw_activation_params"]))


def uses_dense_kernel(graph: Graph, node: str, target_kind: str, lanes: int = 16) -> DenseSpec | None:
    """The spec when a ``linear`` node lowers to our dense kernel on ``target_kind`` (CPU; the tuner asks too)."""
    d = graph.nodes[node]
    if d["op"] != "linear" or target_kind != "llvm" or not _kernel_dtype(graph, node):
        return None
    x = graph.value_type(graph.operands(node)[0])
    return dense_spec(x.shape, d["params"]["weight"].shape, "bias" in d["params"], d["attrs"]["activation"],
                      d["attrs"]["activation_params"], x.dtype, lanes)


def is_depthwise(graph: Graph, node: str) -> bool:
    """A ``qconv2d`` with one group per channel (groups = C = OC) and no fused residual."""
    data = graph.nodes[node]
    channels = graph.value_type(graph.operands(node)[0]).shape[1]
    return (data["op"] == "qconv2d" and data["attrs"]["groups"] == channels == data["params"]["weight"].shape[0]
            and channels > 1 and len(graph.operands(node)) == 1)


def uses_integer_kernel(graph: Graph, node: str, target_kind: str) -> bool:
    """Whether ``qconv2d``/``qlinear`` lowers to our kernels (``qkernels.py``: dense-reduction, grouped with
    ``groups_fit``, or depthwise) rather than Relax integer ops (other grouped convs, cuda)."""
    data = graph.nodes[node]
    if target_kind != "llvm" or data["op"] not in ("qlinear", "qconv2d"):
        return False
    channels = graph.value_type(graph.operands(node)[0]).shape[1] if data["op"] == "qconv2d" else 0
    return data["op"] == "qlinear" or is_depthwise(graph, node) or groups_fit(
        channels, data["params"]["weight"].shape[0], data["attrs"]["groups"])


def nhwc_values(graph: Graph, target_kind: str) -> frozenset[Value]:
    """Integer conv outputs that only our integer conv kernels read (as input or fused residual): those stay NHWC
    in memory. The graph's semantics are NCHW; between two of our kernels NHWC is the better layout: the
    producer's epilogue stores 16 channels of a pixel as one contiguous vector, and the consumer's padding stage
    (``qkernels.qconv_compute``) copies channel vectors instead of gathering each pixel's channels across planes."""
    def reads_nhwc(user: str) -> bool:  # as its input or its fused residual
        return graph.nodes[user]["op"] == "qconv2d" and uses_integer_kernel(graph, user, target_kind)

    chosen = set()
    for node in graph.op_nodes("qconv2d"):
        value = Value(node, 0)
        users = graph.users(value)
        if (uses_integer_kernel(graph, node, target_kind) and users and not graph.is_graph_output(value)
                and all(reads_nhwc(user) for user, _ in users)):
            chosen.add(value)
    return frozenset(chosen)


RECURRENT_OPS = ("lstm", "gru", "rnn")
DYNAMIC_RECURRENT_OPS = ("qlstm_dynamic", "qgru_dynamic", "qrnn_dynamic")


@dataclass(frozen=True)
class Choice:
    """How one node lowers. ``kernel``: one of ours (``conv``: ``kernels.conv_kernel``, also conv2d_pool, with
    ``spec.pool_epilogue`` the blocked conv with the pool in its epilogue; ``dense``: ``kernels.dense_kernel``;
    ``integer``: ``qkernels.qconv_kernel`` for qconv2d/qlinear; ``depthwise``: ``qkernels.depthwise_kernel``;
    ``integer_max_pool``; ``recurrent``: a layer's whole time loop in one kernel; ``integer_recurrent``: the dynamic
    int8 RNNs; ``tensor_core``: ``cuda_conv.conv_kernel``, a cuda fp16/bf16 conv2d as implicit GEMM on tensor cores;
    ``winograd``: ``winograd.winograd_kernel`` for 3x3 stride-1 convs where its cost rule says it pays;
    ``expand_dw``: ``expand_depthwise.expand_depthwise_kernel`` for a conv2d_expand_dw;
    ``blocked_conv_pool``: a conv2d_pool whose window rows are too wide for the blocked kernel's epilogue, as the
    blocked conv, ``spec`` without its pool, then the pool as a Relax op) or ``relax`` (TVM's Relax ops, scheduled
    by ``schedule.py``). ``spec``: the conv/dense/Winograd kernel's spec (conv and dense specs are also tuning
    tasks)."""

    kernel: str
    spec: ConvSpec | DenseSpec | WinogradSpec | ExpandDepthwiseSpec | None = None


RELAX = Choice("relax")


def choose(graph: Graph, node: str, target_kind: str, lanes: int = 16, allow_winograd: bool = True,
           tiles: Mapping | None = None) -> Choice:
    """The kernel that lowers ``node`` on ``target_kind`` ("llvm" | "cuda"); kernel tiles sized for ``lanes``-wide
    vectors (``Target.lanes``); ``allow_winograd``: False keeps every conv on the direct kernel; ``tiles``: tuned
    tiles by spec, whose ``winograd`` field overrides the Winograd cost rule for that conv (0: direct, m: F(m))."""
    data = graph.nodes[node]
    op = data["op"]
    if op == "conv2d_expand_dw":
        fused = expand_dw_spec_of(graph, node, target_kind)
        return Choice("expand_dw", fused) if fused is not None else RELAX
    spec = uses_conv_kernel(graph, node, target_kind, lanes) or uses_dense_kernel(graph, node, target_kind, lanes)
    # a conv2d_pool stored blocked (alter-layout): only the pool epilogue stores NCHW[b]c itself; the other paths
    # (Winograd or a kernel, then the pool) store NCHW, laid out after (``lower._conv2d_pool``)
    pool_stored_blocked = op == "conv2d_pool" and isinstance(spec, ConvSpec) and spec.out_block
    nchw = dataclasses.replace(spec, out_block=0) if pool_stored_blocked else spec
    # the Winograd kernel is CPU-only; it reads and writes NCHW or NCHW[b]c, not an input scale (fold-channel-scale)
    cpu_conv = (target_kind == "llvm" and isinstance(spec, ConvSpec)
                and not (op == "conv2d_nchwc" and data["attrs"].get("input_scale")))
    tuned = (tiles or {}).get(spec) if cpu_conv else None
    if tuned is not None and allow_winograd:
        fast = winograd.choose(nchw, tuned.winograd) if tuned.winograd else None
    else:
        fast = winograd.choose(nchw) if allow_winograd and cpu_conv else None
    if fast is not None:
        return Choice("winograd", fast)
    if spec is not None and blocked_with_pool(spec, target_kind):
        return Choice("conv", dataclasses.replace(spec, pool_epilogue=True))
    spec = nchw
    if spec is not None and blocked_then_pool(spec, target_kind):
        return Choice("blocked_conv_pool", spec.without_pool())
    if spec is not None:
        return Choice("dense" if isinstance(spec, DenseSpec) else "conv", spec)
    if uses_integer_kernel(graph, node, target_kind):
        return Choice("depthwise" if is_depthwise(graph, node) else "integer")
    if target_kind == "cuda" and op in RECURRENT_OPS and cuda_rnn.fits(op, data["attrs"]["hidden_size"]):
        return Choice("recurrent")  # the persistent kernel: one launch per layer for the whole sequence
    if tensor_core_refusal(graph, node, target_kind) is None:
        return Choice("tensor_core", conv_spec_of(graph, node, lanes))
    if target_kind != "llvm":
        return RELAX
    if op in RECURRENT_OPS:
        return Choice("recurrent")
    if op in DYNAMIC_RECURRENT_OPS:
        return Choice("integer_recurrent")
    if op == "max_pool2d" and graph.value_type(graph.operands(node)[0]).dtype in ("uint8", "int8"):
        return Choice("integer_max_pool")  # LLVM scalarizes an 8-bit max pool written as Relax ops
    return RELAX


def blocked_with_pool(spec: ConvSpec | DenseSpec, target_kind: str) -> bool:
    """A conv2d_pool whose windows tile the conv output (VGG's 2x2/2 max pools, a conv-ReLU-maxpool stack) runs as
    the blocked (NCHWc) conv with the pool in its epilogue (``ConvSpec.pool_epilogue``): the register tile holds
    whole windows, only the pooled output is stored. CPU only (the CUDA kernel is one thread per pooled output)."""
    return (target_kind == "llvm" and isinstance(spec, ConvSpec) and spec.pool is not None
            and spec.blocked_pool_fits is None)


def tensor_core_refusal(graph: Graph, node: str, target_kind: str) -> str | None:
    """None when ``node`` is a cuda conv2d the tensor-core kernel takes (``cuda_conv.refusal``), else why not."""
    if target_kind != "cuda" or graph.nodes[node]["op"] != "conv2d":
        return f"not a conv2d on cuda ({graph.nodes[node]['op']} on {target_kind})"
    if not _kernel_dtype(graph, node):
        return "mixed operand/weight dtypes"
    return cuda_conv.refusal(conv_spec_of(graph, node))


def blocked_then_pool(spec: ConvSpec | DenseSpec, target_kind: str) -> bool:
    """A conv2d_pool whose windows tile the conv output but do not fit the blocked kernel's register tile (more
    than ``accumulator_vectors`` pixels per window) runs as the blocked (NCHWc) conv, then the pool as a Relax op:
    measured on Zen 3 (AVX2, one thread), VGG's 3x3 conv + 2x2 max pool shapes took 3.0-4.6x longer in the fused
    column-vectorized kernel than the blocked conv alone; the pool rereads the conv output once (1/(C*9*2) of the
    conv's work). Overlapping windows (ResNet's stem) stay fused (banded)."""
    return (target_kind == "llvm" and isinstance(spec, ConvSpec) and spec.pool is not None and not spec.banded
            and spec.without_pool().blocked and not blocked_with_pool(spec, target_kind))


def explain_winograd(graph: Graph, target_kind: str, lanes: int = 16, allow_winograd: bool = True
                     ) -> list[tuple[str, str]]:
    """(node, decision) for every conv2d / conv2d_pool: "F(4x4,3x3)", or why the direct kernel stays
    (``winograd.refusal``, or the switch). What ``python -m passes.cli explain winograd MODEL`` prints."""
    rows = []
    for node in graph.topo_order():
        if graph.nodes[node]["op"] not in ("conv2d", "conv2d_pool", "conv2d_nchwc"):
            continue
        choice = choose(graph, node, target_kind, lanes, allow_winograd)
        if target_kind == "cuda":  # no Winograd on cuda: say whether the conv runs on tensor cores, else why not
            rows.append((node, "tensor cores (implicit GEMM, WMMA)" if choice.kernel == "tensor_core" else
                         f"SIMT kernel: {tensor_core_refusal(graph, node, target_kind)}"))
        elif choice.kernel == "winograd":
            rows.append((node, f"F({choice.spec.tile}x{choice.spec.tile},3x3)"))
        elif not allow_winograd:
            rows.append((node, "Winograd turned off"))
        elif choice.kernel not in ("conv", "blocked_conv_pool"):
            rows.append((node, f"lowered by {choice.kernel!r}, not our conv kernel ({target_kind})"))
        else:
            rows.append((node, winograd.refusal(choice.spec)))
        if graph.nodes[node]["op"] == "conv2d_pool":
            decision = rows[-1][1]
            rows[-1] = (node, f"{decision}; {pool_path(graph, node, choice, lanes)}")
    return rows


def pool_path(graph: Graph, node: str, choice: Choice, lanes: int = 16) -> str:
    """How the CPU build runs a conv2d_pool's pool, and why (``explain winograd`` prints it after the conv's row)."""
    spec = conv_spec_of(graph, node, lanes)
    if choice.kernel == "winograd":
        return "pool: after the Winograd conv (a Relax op)"
    if choice.kernel == "conv" and choice.spec.pool_epilogue and spec.banded:
        return ("pool: in the blocked conv's epilogue, from a band of conv rows per task (overlapping or padded "
                "windows; one kernel, only the pooled output stored)")
    if choice.kernel == "conv" and choice.spec.pool_epilogue:
        return "pool: in the blocked conv's epilogue (one kernel, only the pooled output stored)"
    if choice.kernel == "blocked_conv_pool":
        return f"pool: after the blocked conv (a Relax op): {spec.blocked_pool_fits}"
    if choice.kernel == "conv":
        kind = "banded fused kernel" if spec.banded else "fused kernel"
        return f"pool: {kind} (the conv output never stored): {spec.blocked_pool_fits}"
    return f"pool: lowered by {choice.kernel!r}"


@dataclass(frozen=True)
class Selection:
    """Every node's ``Choice`` on one target, decided once per graph, and the values our integer conv kernels
    hand each other in NHWC (``nhwc_values``)."""

    target_kind: str
    choices: Mapping[str, Choice]
    nhwc: frozenset[Value]

    def __getitem__(self, node: str) -> Choice:
        return self.choices[node]


def select_kernels(graph: Graph, target_kind: str, lanes: int = 16, allow_winograd: bool = True,
                   tiles: Mapping | None = None) -> Selection:
    choices = {node: choose(graph, node, target_kind, lanes, allow_winograd, tiles) for node in graph.topo_order()
               if graph.nodes[node]["op"] != "input"}
    return Selection(target_kind, choices, nhwc_values(graph, target_kind))
