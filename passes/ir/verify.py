"""``verify(graph)``: check every IR invariant and report all violations at once.

Checked: graph attributes; node and edge keys (exactly the vocabulary of ``graph.py``); known ops; attrs and
params against the op schema; operand slots (contiguous from 0, none fed twice, arity); producer output indices;
acyclicity; graph inputs and outputs; and that each node's ``out_types`` equal what the op table infers.
"""

from __future__ import annotations

import networkx as nx

from passes.ir.graph import EDGE_KEYS, GRAPH_KEYS, NODE_KEYS, Graph, IRError, TensorType, Value, origin_text
from passes.ir.ops import OPS


class VerificationError(IRError):
    """The graph breaks IR invariants; ``problems`` lists every one found."""

    def __init__(self, name: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"graph {name!r} is invalid ({len(problems)} problem(s)):\n  " + "\n  ".join(problems))


def _node_problems(graph: Graph, node: str, data: dict) -> list[str]:
    where = f"node {node!r} (from {origin_text(data.get('origin', ()))})"
    problems = [f"{where}: unknown key {k!r}" for k in data if k not in NODE_KEYS]
    problems += [f"{where}: missing key {k!r}" for k in NODE_KEYS if k not in data]
    if problems:
        return problems
    opdef = OPS.get(data["op"])
    if opdef is None:
        return [f"{where}: unknown op {data['op']!r}"]
    if not isinstance(data["origin"], tuple) or not all(isinstance(o, str) for o in data["origin"]):
        problems.append(f"{where}: origin must be a tuple of strings")
    if not isinstance(data["meta"], dict):
        problems.append(f"{where}: meta must be a dict")
    problems += [f"{where}: {p}" for p in opdef.attr_problems(data["attrs"])]
    problems += [f"{where}: {p}" for p in opdef.param_problems(data["params"])]
    out_types = data["out_types"]
    if not isinstance(out_types, list) or not all(isinstance(t, TensorType) for t in out_types):
        problems.append(f"{where}: out_types must be a list of TensorType")
        return problems

    slots = sorted(d.get("dst_in", -1) for _, _, d in graph.in_edges(node, data=True))
    if slots != list(range(len(slots))):
        problems.append(f"{where}: operand slots {slots} are not 0..{len(slots) - 1} each fed once")
    if not opdef.arity_ok(len(slots)):
        problems.append(f"{where}: op {data['op']!r} takes {opdef.arity} operands, has {len(slots)}")
    for src, _, d in graph.in_edges(node, data=True):
        if set(d) != set(EDGE_KEYS):
            problems.append(f"{where}: edge from {src!r} has keys {sorted(d)}, expected {list(EDGE_KEYS)}")
        elif d["src_out"] >= len(graph.nodes[src].get("out_types", [])):
            problems.append(f"{where}: reads output {d['src_out']} of {src!r}, which has fewer outputs")
    if problems or data["op"] == "input":
        return problems
    try:
        in_types = [graph.value_type(v) for v in graph.operands(node)]
        inferred = opdef.infer(in_types, data["attrs"], data["params"], where)
    except IRError as exc:
        return problems + [str(exc)]
    if inferred != out_types:
        problems.append(f"{where}: out_types {[str(t) for t in out_types]} but the op infers "
                        f"{[str(t) for t in inferred]}")
    return problems


def graph_problems(graph: Graph) -> list[str]:
    problems = [f"graph attribute {k!r} is not part of the IR" for k in graph.graph if k not in GRAPH_KEYS]
    if not nx.is_directed_acyclic_graph(graph):
        cycle = nx.find_cycle(graph)
        return problems + [f"graph has a cycle through {[e[0] for e in cycle]}"]
    for node in graph.topo_order():
        problems += _node_problems(graph, node, graph.nodes[node])
    for name in graph.inputs:
        if name not in graph or graph.nodes[name].get("op") != "input":
            problems.append(f"graph input {name!r} is not an 'input' node")
    for node, data in graph.nodes(data=True):
        if data.get("op") == "input" and node not in graph.inputs:
            problems.append(f"'input' node {node!r} is not listed in graph inputs")
    outputs = graph.output_values()
    if not outputs:
        problems.append("graph has no outputs")
    for value in outputs:
        if not isinstance(value, Value):
            problems.append(f"graph output {value!r} is not a Value")
        elif value.node not in graph:
            problems.append(f"graph output {value} names a missing node")
        elif value.index >= len(graph.nodes[value.node].get("out_types", [])):
            problems.append(f"graph output {value} reads a missing output index")
    return problems


def verify(graph: Graph) -> Graph:
    """Raise ``VerificationError`` listing every broken invariant; return the graph when it is valid."""
    problems = graph_problems(graph)
    if problems:
        raise VerificationError(graph.name, problems)
    return graph
