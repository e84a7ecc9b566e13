"""Patterns declared as data, matched with networkx isomorphism (``MultiDiGraphMatcher``).

A ``Pattern`` names roles and the op(s) each role may have, the edges between roles (producer output, consumer
operand slot), an ``anchor`` role where matching starts, and ``private`` roles whose outputs must have no users
outside the match (so rewriting them away loses nothing). Matching runs the VF2 matcher on the neighbourhood of
each anchor candidate only, in stable (topological) order, and keeps non-overlapping matches: passes collect all
matches first, then rewrite, and never mutate the graph while iterating.

Example (conv followed by batch norm, the conv output used only by the norm)::

    CONV_BN = Pattern(roles={"conv": ("conv1d", "conv2d"), "bn": "batch_norm"},
                      edges=(("conv", "bn", 0),), anchor="bn", private=("conv",))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import networkx as nx
from networkx.algorithms.isomorphism import MultiDiGraphMatcher

from passes.ir.graph import Graph

Match = dict[str, str]  # role -> node


@dataclass(frozen=True)
class Pattern:
    roles: Mapping[str, str | tuple[str, ...]]
    edges: tuple[tuple[str, str, int | None], ...]  # (producer role, consumer role, operand slot or None: any)
    anchor: str
    private: tuple[str, ...] = ()
    _graph: nx.MultiDiGraph = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        unknown = {r for edge in self.edges for r in edge[:2]} - set(self.roles)
        if unknown or self.anchor not in self.roles or set(self.private) - set(self.roles):
            raise ValueError(f"pattern names roles it does not declare: {sorted(unknown)}")
        g = nx.MultiDiGraph()
        for role, ops in self.roles.items():
            g.add_node(role, ops=(ops,) if isinstance(ops, str) else tuple(ops))
        for src, dst, slot in self.edges:
            g.add_edge(src, dst, dst_in=slot)
        object.__setattr__(self, "_graph", g)

    @property
    def radius(self) -> int:
        return max(1, len(self.roles) - 1)

    def ops(self, role: str) -> tuple[str, ...]:
        return self._graph.nodes[role]["ops"]

    def candidates(self, graph: Graph) -> list[str]:
        """Anchor candidates: nodes whose op fits the anchor role, in topological order."""
        return [n for n in graph.topo_order() if graph.nodes[n]["op"] in self.ops(self.anchor)]

    def match_at(self, graph: Graph, anchor: str) -> Match | None:
        """The first structural match with ``anchor`` in the anchor role (privacy not checked), or None."""
        for match in self._matches_at(graph, anchor):
            return match
        return None

    def _matches_at(self, graph: Graph, anchor: str) -> Iterator[Match]:
        neighbourhood = nx.ego_graph(graph.to_undirected(as_view=True), anchor, radius=self.radius).nodes
        local = graph.subgraph(neighbourhood)
        matcher = MultiDiGraphMatcher(local, self._graph, node_match=_node_match, edge_match=_edge_match)
        for mapping in matcher.subgraph_monomorphisms_iter():
            match = {role: node for node, role in mapping.items()}
            if match[self.anchor] == anchor:
                yield match

    def private_violations(self, graph: Graph, match: Match) -> list[str]:
        """Private roles whose outputs escape the match (other users, or a graph output)."""
        inside = set(match.values())
        outputs = {v.node for v in graph.output_values()}
        return [role for role in self.private
                if match[role] in outputs or any(user not in inside for user, _ in graph.users(match[role]))]

    def scan(self, graph: Graph, decide, check: Callable[[Match], tuple[str, str] | None] | None = None,
             rewrite: Callable[[Match], None] | None = None) -> list[Match]:
        """Every anchor candidate, decided: matches that are structurally right, private where required, and pass
        ``check`` (returning ``(reason, detail)`` to refuse) are returned for rewriting; each refusal is counted on
        ``decide`` (a ``Decisions``) as ``skipped.no_producer``, ``skipped.shared_output`` or ``skipped.<reason>``.

        With ``rewrite``, each accepted match is rewritten at once, before the next candidate (in topological
        order) is matched: for fusions where an earlier rewrite is what makes a later match possible.
        """
        return scan_alternatives((self,), graph, decide, check, rewrite)

    def _first_acceptable(self, graph: Graph, anchor: str, check: Callable[[Match], tuple[str, str] | None] | None
                          ) -> tuple[Match | None, tuple[str, str] | None]:
        """The first structural match at ``anchor`` that is private where required and passes ``check`` (an
        ``add`` of two convs may fuse either one), else (None, why): the first ``check`` refusal of a private
        match (the more telling reason), else ``shared_output``, else None when nothing matched at all."""
        refused = shared_refusal = None
        for match in self._matches_at(graph, anchor):
            shared = self.private_violations(graph, match)
            if shared:
                shared_refusal = shared_refusal or ("shared_output",
                                                    f"{', '.join(match[r] for r in shared)} has other users")
                continue
            why = check(match) if check else None
            if why is None:
                return match, None
            refused = refused or why
        return None, refused or shared_refusal

    def find(self, graph: Graph) -> list[Match]:
        """All non-overlapping matches whose private roles are really private, in stable order."""
        taken: set[str] = set()
        found = []
        for anchor in self.candidates(graph):
            for match in self._matches_at(graph, anchor):
                if taken & set(match.values()) or self.private_violations(graph, match):
                    continue
                found.append(match)
                taken |= set(match.values())
                break
        return found


def scan_alternatives(patterns: Sequence[Pattern], graph: Graph, decide,
                      check: Callable[[Match], tuple[str, str] | None] | None = None,
                      rewrite: Callable[[Match], None] | None = None) -> list[Match]:
    """``Pattern.scan`` over alternative patterns (optional roles written out, longest first): per anchor candidate
    of any pattern, in topological order, the first pattern with an acceptable match wins; a refused candidate is
    counted once, with the first pattern's ``check`` refusal, else ``shared_output``, else ``no_producer``."""
    accepted = []
    anchor_ops = {op for p in patterns for op in p.ops(p.anchor)}
    for anchor in [n for n in graph.topo_order() if graph.nodes[n]["op"] in anchor_ops]:
        if anchor not in graph:  # removed by an earlier rewrite
            continue
        match, refused = None, None
        for pattern in patterns:
            if graph.nodes[anchor]["op"] not in pattern.ops(pattern.anchor):
                continue
            match, why = pattern._first_acceptable(graph, anchor, check)
            if match is not None:
                break
            refused = refused or why
        if match is None:
            decide.skip(anchor, *(refused or ("no_producer", f"input comes from {graph.operands(anchor)[0].node}")))
            continue
        accepted.append(match)
        if rewrite is not None:
            rewrite(match)
    return accepted


def _node_match(graph_node: dict, pattern_node: dict) -> bool:
    return graph_node["op"] in pattern_node["ops"]


def _edge_match(graph_edges: dict, pattern_edges: dict) -> bool:
    """Every pattern edge between two roles needs a graph edge into the same operand slot."""
    slots = {d["dst_in"] for d in graph_edges.values()}
    return all(d["dst_in"] is None or d["dst_in"] in slots for d in pattern_edges.values())
