"""IR graph: builder, operand order, parallel edges, rewiring, determinism, networkx interoperability."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from passes.ir.graph import Graph, IRError, TensorType, Value


def tiny() -> tuple[Graph, Value, Value]:
    g = Graph(name="tiny")
    x = g.add_input("x", TensorType((1, 3, 8, 8)))
    w = np.ones((4, 3, 3, 3), np.float32)
    y = g.add_op("conv2d", [x], attrs={"padding": (1, 1)}, params={"weight": w}, origin=("features.0",))
    z = g.add_op("relu", [y], origin=("features.1",))
    g.set_outputs(z)
    return g, y, z


def test_builder_infers_types_and_fills_default_attrs():
    g, y, z = tiny()
    conv = g.nodes[y.node]
    assert conv["out_types"] == [TensorType((1, 4, 8, 8))]
    assert conv["attrs"] == {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1,
                             "activation": "none", "activation_params": ()}
    assert y.node == "features_0" and conv["origin"] == ("features.0",)
    assert isinstance(g, nx.MultiDiGraph) and nx.is_directed_acyclic_graph(g)


def test_parallel_edges_keep_operand_slots():
    g = Graph()
    x = g.add_input("x", TensorType((2, 3)))
    s = g.add_op("add", [x, x])
    assert g.number_of_edges(x.node, s.node) == 2
    assert g.operands(s.node) == [x, x]
    assert g.users(x) == [(s.node, 0), (s.node, 1)]


def test_multi_output_ops_return_one_value_per_output():
    g = Graph()
    x = g.add_input("x", TensorType((1, 6, 4)))
    parts = g.add_op("split", [x], attrs={"split_sizes": (2, 4), "dim": 1})
    assert parts == (Value("split", 0), Value("split", 1))
    assert [t.shape for t in g.nodes["split"]["out_types"]] == [(1, 2, 4), (1, 4, 4)]


def test_replace_all_uses_rewires_consumers_and_outputs():
    g, y, z = tiny()
    g.replace_all_uses(z, y)
    assert g.outputs == y
    g.set_outputs((z, (y, z)))
    new = g.add_op("sigmoid", [y])
    g.replace_all_uses(z, new)
    assert g.outputs == (new, (y, new))


def test_topological_order_is_deterministic_and_insertion_stable():
    g = Graph()
    x = g.add_input("x", TensorType((2,)))
    names = [g.add_op("relu", [x], name=f"b{i}").node for i in range(5)]
    assert g.topo_order() == ["x", *names]
    assert g.copy_graph().topo_order() == g.topo_order()


def test_bad_attrs_and_shapes_are_refused_with_the_origin():
    g = Graph()
    x = g.add_input("x", TensorType((1, 3, 8, 8)))
    with pytest.raises(IRError, match=r"'conv2d' \(from stem\): unknown attribute 'kernel'"):
        g.add_op("conv2d", [x], attrs={"kernel": 3}, params={"weight": np.ones((4, 3, 3, 3))}, origin=("stem",))
    with pytest.raises(IRError, match="missing param 'weight'"):
        g.add_op("conv2d", [x], origin=("stem",))
    with pytest.raises(IRError, match=r"cannot apply to operands \(f32\[1,3,8,8\]\)"):
        g.add_op("conv2d", [x], params={"weight": np.ones((4, 5, 3, 3), np.float32)}, origin=("stem",))
    with pytest.raises(IRError, match="unknown op 'conv3d'"):
        g.add_op("conv3d", [x])


def test_unique_names_never_collide():
    g = Graph()
    x = g.add_input("x", TensorType((2,)))
    a = g.add_op("relu", [x], origin=("block.act",))
    b = g.add_op("relu", [a], origin=("block.act",))
    assert (a.node, b.node) == ("block_act", "block_act_1")
