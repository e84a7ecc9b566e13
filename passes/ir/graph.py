"""The IR: a dataflow graph of tensor ops stored in a ``networkx.MultiDiGraph``.

Why networkx: every graph algorithm (topological order, isomorphism matching, reachability) is available to
passes and plug-in authors without a bespoke API, and ``for n, d in graph.nodes(data=True)`` just works.

Vocabulary (``verify`` enforces it):

- graph attributes: ``name``; ``inputs`` (node names of the ``input`` ops, in call order); ``outputs`` (the model's
  output structure: a ``Value`` or a nested tuple/list of ``Value``s).
- node attributes: ``op`` (key of ``passes.ir.ops.OPS``), ``attrs`` (hyper-parameters named like the arguments of
  ``torch.nn.functional``), ``params`` (name -> numpy array: ``weight``, ``bias``...), ``out_types`` (one
  ``TensorType`` per output), ``origin`` (source names, e.g. module paths; joined when nodes are fused; used in
  every error message) and ``meta`` (namespaced notes such as ``quantize.scale``). Nothing else.
- edge attributes: ``src_out`` (producer output index) and ``dst_in`` (consumer operand slot). Parallel edges are
  allowed, so ``add(x, x)`` is two edges between the same pair of nodes.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np

from passes.ir.types import IRError, TensorType  # noqa: F401 (IRError: re-exported, users import it from here)

NODE_KEYS = ("op", "attrs", "params", "out_types", "origin", "meta")
EDGE_KEYS = ("src_out", "dst_in")
GRAPH_KEYS = ("name", "inputs", "outputs")
# meta key of a node whose outputs are model outputs with names of their own (ONNX): {"<output index>": "name"}.
# replace_all_uses moves an entry to the replacement value, so names survive rewrites.
OUTPUT_NAMES = "io.output_names"


@dataclass(frozen=True)
class Value:
    """A reference to output ``index`` of node ``node``: what an op consumes and the graph returns."""

    node: str
    index: int = 0

    def __str__(self) -> str:
        return f"%{self.node}" if self.index == 0 else f"%{self.node}.{self.index}"


def flatten_structure(structure: Any) -> list[Any]:
    """Leaves of a nested tuple/list structure, depth first (the order compiled modules return outputs)."""
    if isinstance(structure, (tuple, list)):
        return [leaf for item in structure for leaf in flatten_structure(item)]
    return [structure]


def rebuild_structure(structure: Any, leaves: Iterator[Any]) -> Any:
    """Inverse of ``flatten_structure``: put ``leaves`` back into the shape of ``structure`` (lists become tuples)."""
    if isinstance(structure, (tuple, list)):
        return tuple(rebuild_structure(item, leaves) for item in structure)
    return next(leaves)


def map_structure(fn, structure: Any) -> Any:
    if isinstance(structure, (tuple, list)):
        return tuple(map_structure(fn, item) for item in structure)
    return fn(structure)


def origin_text(origin: Iterable[str]) -> str:
    return "+".join(origin) or "<unknown>"


class Graph(nx.MultiDiGraph):
    """A model as a graph of ops. Build with ``add_input``/``add_op``/``set_outputs``; inspect with networkx.

    Example::

        g = Graph(name="tiny")
        x = g.add_input("x", TensorType((1, 3, 8, 8)))
        y = g.add_op("conv2d", [x], attrs={"padding": (1, 1)}, params={"weight": w}, origin=("conv",))
        g.set_outputs(g.add_op("relu", [y]))
    """

    def __init__(self, incoming_graph_data=None, name: str = "graph", **attr):
        super().__init__(incoming_graph_data, **attr)
        self.graph.setdefault("name", name)
        self.graph.setdefault("inputs", [])
        self.graph.setdefault("outputs", ())

    # ----------------------------------------------------------------------------------------------- accessors
    @property
    def name(self) -> str:
        return self.graph["name"]

    @property
    def inputs(self) -> list[str]:
        return self.graph["inputs"]

    @property
    def outputs(self) -> Any:
        return self.graph["outputs"]

    def output_values(self) -> list[Value]:
        return flatten_structure(self.outputs)

    def input_types(self) -> list[TensorType]:
        return [self.nodes[n]["out_types"][0] for n in self.inputs]

    def value_type(self, value: Value) -> TensorType:
        return self.nodes[value.node]["out_types"][value.index]

    def operands(self, node: str) -> list[Value]:
        """Operand values of ``node`` ordered by operand slot."""
        edges = sorted(self.in_edges(node, data=True), key=lambda e: e[2]["dst_in"])
        return [Value(src, d["src_out"]) for src, _, d in edges]

    def users(self, value_or_node: Value | str) -> list[tuple[str, int]]:
        """``(consumer, operand slot)`` pairs that read ``value`` (or any output of a node), in stable order."""
        if isinstance(value_or_node, Value):
            node, index = value_or_node.node, value_or_node.index
        else:
            node, index = value_or_node, None
        found = [(dst, d["dst_in"]) for _, dst, d in self.out_edges(node, data=True)
                 if index is None or d["src_out"] == index]
        if len(found) < 2:
            return found
        order = {n: i for i, n in enumerate(self._node)}  # insertion order, once per call
        return sorted(found, key=lambda u: (order[u[0]], u[1]))

    def is_graph_output(self, value: Value) -> bool:
        return value in self.output_values()

    def origin(self, node: str) -> str:
        return origin_text(self.nodes[node].get("origin", ()))

    def describe(self, node: str) -> str:
        """``'conv2d' node 'layer1_0_conv1' (from layer1.0.conv1)``: how errors name a model element."""
        data = self.nodes[node]
        return f"{data.get('op')!r} node {node!r} (from {origin_text(data.get('origin', ()))})"

    def topo_order(self) -> list[str]:
        """Deterministic topological order: ties broken by insertion order."""
        order = {n: i for i, n in enumerate(self._node)}
        return list(nx.lexicographical_topological_sort(self, key=order.__getitem__))

    def op_nodes(self, op: str | tuple[str, ...]) -> list[str]:
        ops = (op,) if isinstance(op, str) else op
        return [n for n in self.topo_order() if self.nodes[n]["op"] in ops]

    # ----------------------------------------------------------------------------------------------- building
    def unique_name(self, base: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_]", "_", base).strip("_") or "v"
        if base[0].isdigit():
            base = "n" + base
        if base not in self:
            return base
        for i in itertools.count(1):
            candidate = f"{base}_{i}"
            if candidate not in self:
                return candidate
        raise AssertionError("unreachable")

    def add_input(self, name: str, type_: TensorType, origin: tuple[str, ...] | None = None) -> Value:
        node = self.unique_name(name)
        self.add_node(node, op="input", attrs={}, params={}, out_types=[type_],
                      origin=tuple(origin) if origin is not None else (name,), meta={})
        self.graph["inputs"].append(node)
        return Value(node, 0)

    def add_op(self, op: str, operands: Iterable[Value], attrs: Mapping[str, Any] | None = None,
               params: Mapping[str, Any] | None = None, origin: Iterable[str] = (), name: str | None = None,
               meta: Mapping[str, Any] | None = None) -> Value | tuple[Value, ...]:
        """Add one op node: attrs are checked and defaulted, output types inferred from the op table.

        Returns the single output ``Value``, or a tuple of them for multi-output ops (split, lstm...).
        """
        from passes.ir.ops import get_op  # at call time: the graph alone needs no torch

        opdef = get_op(op)
        operands = list(operands)
        origin = tuple(origin)
        where = f"{op!r} (from {origin_text(origin)})"
        attrs = opdef.check_attrs(attrs or {}, where)
        params = {k: np.asarray(v) for k, v in (params or {}).items()}
        opdef.check_params(params, where)
        in_types = [self.value_type(v) for v in operands]
        out_types = opdef.infer(in_types, attrs, params, where)
        node = self.unique_name(name or (origin[-1] if origin else op))
        self.add_node(node, op=op, attrs=attrs, params=params, out_types=list(out_types), origin=origin,
                      meta=dict(meta or {}))
        for slot, value in enumerate(operands):
            self.add_edge(value.node, node, src_out=value.index, dst_in=slot)
        outs = tuple(Value(node, i) for i in range(len(out_types)))
        return outs[0] if len(outs) == 1 and opdef.num_outputs(attrs) == 1 else outs

    def set_outputs(self, structure: Any) -> None:
        self.graph["outputs"] = structure

    # ----------------------------------------------------------------------------------------------- rewriting
    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Make every consumer of ``old`` (and the graph outputs) read ``new`` instead."""
        for src, dst, key, d in list(self.out_edges(old.node, keys=True, data=True)):
            if d["src_out"] != old.index:
                continue
            self.remove_edge(src, dst, key)
            self.add_edge(new.node, dst, src_out=new.index, dst_in=d["dst_in"])
        self.replace_output(old, new)

    def replace_output(self, old: Value, new: Value) -> None:
        """Make the graph return ``new`` where it returned ``old``; the output's name (ONNX) moves along."""
        self.graph["outputs"] = map_structure(lambda v: new if v == old else v, self.outputs)
        name = self.nodes[old.node]["meta"].get(OUTPUT_NAMES, {}).pop(str(old.index), None)
        if name is not None:
            self.nodes[new.node]["meta"].setdefault(OUTPUT_NAMES, {})[str(new.index)] = name

    def matches(self, node: str, patterns: Iterable[str]) -> bool:
        """Whether the node's name or one of its origins matches a shell-style pattern (``layer1.*``)."""
        import fnmatch

        return any(fnmatch.fnmatchcase(n, p) for n in (node, *self.nodes[node]["origin"]) for p in patterns)

    def output_name(self, value: Value, default: str) -> str:
        return self.nodes[value.node]["meta"].get(OUTPUT_NAMES, {}).get(str(value.index), default)

    def set_operands(self, node: str, operands: Iterable[Value]) -> None:
        for src, dst, key in list(self.in_edges(node, keys=True)):
            self.remove_edge(src, dst, key)
        for slot, value in enumerate(operands):
            self.add_edge(value.node, node, src_out=value.index, dst_in=slot)

    def live_nodes(self) -> set[str]:
        """Nodes that some graph output depends on (inputs always count as live: they are the signature)."""
        live: set[str] = set(self.inputs)
        for value in self.output_values():
            live.add(value.node)
            live |= nx.ancestors(self, value.node)
        return live

    def num_params(self) -> int:
        return int(sum(np.asarray(p).size for _, d in self.nodes(data=True) for p in d["params"].values()))

    def copy_graph(self) -> Graph:
        """A deep-enough copy for passes: node dicts, attrs, params dicts and meta are new objects (arrays shared)."""
        g = Graph(name=self.name)
        g.graph["inputs"] = list(self.inputs)
        g.graph["outputs"] = self.outputs
        for n, d in self.nodes(data=True):
            g.add_node(n, op=d["op"], attrs=dict(d["attrs"]), params=dict(d["params"]),
                       out_types=list(d["out_types"]), origin=tuple(d["origin"]), meta=dict(d["meta"]))
        for u, v, d in self.edges(data=True):
            g.add_edge(u, v, **d)
        return g
