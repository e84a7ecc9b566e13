"""Graph-level cost statistics: FLOPs (a multiply-add counts 2), parameter counts and bytes, activation memory."""

from __future__ import annotations

from collections import Counter

import numpy as np

from passes.ir.graph import Graph, Value
from passes.ir.ops import get_op


def node_flops(graph: Graph, node: str) -> int:
    d = graph.nodes[node]
    if d["op"] == "input":
        return 0
    in_types = [graph.value_type(v) for v in graph.operands(node)]
    return int(get_op(d["op"]).flops(in_types, d["out_types"], d["attrs"], d["params"]))


def graph_flops(graph: Graph) -> int:
    return sum(node_flops(graph, n) for n in graph.nodes)


def graph_params(graph: Graph) -> int:
    """Number of parameter elements (constants included)."""
    return graph.num_params()


def op_histogram(graph: Graph) -> dict[str, int]:
    return dict(sorted(Counter(d["op"] for _, d in graph.nodes(data=True) if d["op"] != "input").items()))


def _nbytes(array) -> int:
    """Bytes of a parameter at its stored dtype (numpy, ml_dtypes bf16 or torch)."""
    if hasattr(array, "nbytes"):
        return int(array.nbytes)
    return int(array.numel() * array.element_size())  # torch.Tensor


def graph_weight_bytes(graph: Graph) -> int:
    """Bytes of every parameter and constant at its stored dtype: int8 weights count 1 byte each, bf16 2, so the
    report shows what quantization and mixed precision save in memory, not only in FLOPs."""
    return sum(_nbytes(p) for _, d in graph.nodes(data=True) for p in d["params"].values())


def _value_bytes(graph: Graph, value) -> int:
    t = graph.value_type(value)
    return t.numel * np.dtype(_STORAGE_DTYPES.get(t.dtype, t.dtype)).itemsize


_STORAGE_DTYPES = {"bfloat16": "float16"}  # numpy has no bf16; both are 2 bytes


def peak_activation_bytes(graph: Graph) -> int:
    """Peak bytes of live intermediate values when the graph runs node by node in topological order: a value lives
    from its producer until its last consumer (graph outputs to the end; inputs are the caller's and not counted).
    An IR-level bound for comparing graphs before and after passes; the compiled plan's own peak is measured by the
    backend (``CompiledModule.activation_bytes``)."""
    order = graph.topo_order()
    position = {n: i for i, n in enumerate(order)}
    frees: dict[int, int] = {}
    live = peak = 0
    for node in order:
        if graph.nodes[node]["op"] != "input":
            for index in range(len(graph.nodes[node]["out_types"])):
                value = Value(node, index)
                size = _value_bytes(graph, value)
                users = [position[user] for user, _ in graph.users(value)]
                last = len(order) if graph.is_graph_output(value) else max(users, default=position[node])
                live += size
                frees[last] = frees.get(last, 0) + size
        peak = max(peak, live)
        live -= frees.pop(position[node], 0)
    return peak
