"""Deterministic text form of a graph, for dumps, ``explain`` and structural test diffs.

Nodes print in topological order (ties by insertion order); attrs sorted by name; params as types only, so two
graphs print the same text exactly when they have the same structure, attrs and shapes::

    graph tiny(%x: f32[1,3,8,8]) {
      %c = conv2d(%x) {dilation=(1, 1), groups=1, padding=(1, 1), stride=(1, 1)} [weight: f32[4,3,3,3]] -> f32[1,4,8,8]
      return %c
    }
"""

from __future__ import annotations

import numpy as np

from passes.ir.graph import Graph, TensorType, Value
from passes.ir.ops import describe_attrs


def _param_type(array) -> str:
    array = np.asarray(array)
    return str(TensorType(array.shape, array.dtype.name))


def _structure_text(structure) -> str:
    if isinstance(structure, Value):
        return str(structure)
    return "(" + ", ".join(_structure_text(s) for s in structure) + ("," if len(structure) == 1 else "") + ")"


def node_text(graph: Graph, node: str, with_origin: bool = False) -> str:
    d = graph.nodes[node]
    operands = ", ".join(str(v) for v in graph.operands(node))
    line = f"%{node} = {d['op']}({operands})"
    if d["attrs"]:
        line += " {" + describe_attrs(d["attrs"]) + "}"
    if d["params"]:
        line += " [" + ", ".join(f"{k}: {_param_type(v)}" for k, v in sorted(d["params"].items())) + "]"
    line += " -> " + ", ".join(str(t) for t in d["out_types"])
    if d["meta"]:
        line += "  meta{" + ", ".join(f"{k}={v!r}" for k, v in sorted(d["meta"].items())) + "}"
    if with_origin and d["origin"]:
        line += f"  # {'+'.join(d['origin'])}"
    return line


def graph_text(graph: Graph, with_origin: bool = False) -> str:
    inputs = ", ".join(f"%{n}: {graph.nodes[n]['out_types'][0]}" for n in graph.inputs)
    lines = [f"graph {graph.name}({inputs}) {{"]
    lines += ["  " + node_text(graph, n, with_origin) for n in graph.topo_order()
              if graph.nodes[n]["op"] != "input"]
    lines.append(f"  return {_structure_text(graph.outputs)}")
    lines.append("}")
    return "\n".join(lines)
