"""Small graph-rewrite helpers shared by passes (pure functions over ``Graph``)."""

from __future__ import annotations

from typing import Any

import networkx as nx
import numpy as np

from passes.ir.graph import Graph, Value, map_structure


def bypass(graph: Graph, node: str, replacement: Value) -> None:
    """Make every user of ``node``'s (single) output read ``replacement``, then delete ``node``."""
    graph.replace_all_uses(Value(node, 0), replacement)
    graph.remove_node(node)


def remove_unused(graph: Graph, nodes: list[str]) -> None:
    """Delete those of ``nodes`` that no op reads and the graph does not return (a float copy a rewrite left
    without readers, e.g. a dequantize whose users now read the integer tensor)."""
    outputs = {v.node for v in graph.output_values()}
    for node in nodes:
        if node in graph and graph.out_degree(node) == 0 and node not in outputs:
            graph.remove_node(node)


def constant_of(graph: Graph, value: Value) -> np.ndarray | None:
    d = graph.nodes[value.node]
    return d["params"]["value"] if d["op"] == "constant" else None


def join_origin(*origins: tuple[str, ...]) -> tuple[str, ...]:
    """Origins of fused nodes, in order, without repeats."""
    joined: list[str] = []
    for origin in origins:
        joined += [o for o in origin if o not in joined]
    return tuple(joined)


def replace_node(graph: Graph, old: str, op: str, operands: list[Value], attrs: dict[str, Any],
                 params: dict[str, Any], origin: tuple[str, ...], removed: tuple[str, ...] = ()) -> Value:
    """Add a new node computing what ``old`` computed, move ``old``'s users to it, delete ``old`` and ``removed``.

    The new node takes ``old``'s name (so dumps stay readable) after ``old`` is gone. Every output moves, index
    for index (an LSTM's ``h_n`` and ``c_n`` too).
    """
    name = old
    new = graph.add_op(op, operands, attrs=attrs, params=params, origin=origin, name=f"{name}_new")
    new = new if isinstance(new, tuple) else (new,)  # add_op returns a tuple for a multi-output op
    for index, value in enumerate(new[:len(graph.nodes[old]["out_types"])]):
        graph.replace_all_uses(Value(old, index), value)
    for node in (old, *removed):
        graph.remove_node(node)
    return _rename(graph, new[0].node, name)


def _rename(graph: Graph, node: str, name: str) -> Value:
    if name in graph:
        return Value(node, 0)
    nx.relabel_nodes(graph, {node: name}, copy=False)
    graph.graph["inputs"] = [name if n == node else n for n in graph.inputs]
    graph.graph["outputs"] = map_structure(lambda v: Value(name, v.index) if v.node == node else v, graph.outputs)
    return Value(name, 0)
