"""infer-shapes, fold-constants, eliminate-dead-nodes, eliminate-common-subexpressions, remove-identities."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from passes.core.pass_base import PassContext
from passes.ir.graph import Graph, TensorType
from passes.transforms.eliminate_common_subexpressions import EliminateCommonSubexpressions
from passes.transforms.eliminate_dead_nodes import EliminateDeadNodes
from passes.transforms.fold_constants import FoldConstants
from passes.transforms.infer_shapes import InferShapes
from passes.transforms.remove_identities import RemoveIdentities
from tests.cases import Fn
from tests.passes.helpers import assert_graph_text, assert_idempotent, check_numerics, run_pass


def test_infer_shapes_updates_stale_types_after_a_param_change():
    g = Graph(name="stale")
    x = g.add_input("x", TensorType((1, 4)))
    lin = g.add_op("linear", [x], params={"weight": np.ones((3, 4), np.float32)})
    g.set_outputs(g.add_op("relu", [lin]))
    g.nodes[lin.node]["params"]["weight"] = np.ones((2, 4), np.float32)  # as a pruning pass would
    result = InferShapes().run(g, PassContext())
    assert result.stats == {"updated": 2}
    assert g.nodes["relu"]["out_types"] == [TensorType((1, 2))]
    assert_idempotent(InferShapes(), g)


def test_fold_constants_then_dce():
    g = Graph(name="consts")
    x = g.add_input("x", TensorType((2,)))
    a = g.add_op("constant", [], params={"value": np.array([1.0, 2.0], np.float32)}, name="a")
    b = g.add_op("constant", [], params={"value": np.array([3.0, 4.0], np.float32)}, name="b")
    s = g.add_op("mul", [a, b], name="ab")
    g.set_outputs(g.add_op("add", [x, s], name="out"))
    assert run_pass(FoldConstants(), g).stats == {"folded": 1}
    assert run_pass(EliminateDeadNodes(), g).stats == {"removed": 2}
    assert_graph_text(g, """
graph consts(%x: f32[2]) {
  %ab = constant() [value: f32[2]] -> f32[2]
  %out = add(%x, %ab) -> f32[2]
  return %out
}""")
    np.testing.assert_array_equal(g.nodes["ab"]["params"]["value"], [3.0, 8.0])
    assert_idempotent(FoldConstants(), g)


def test_fold_constants_refusals():
    g = Graph(name="refuse")
    x = g.add_input("x", TensorType((4,)))
    c = g.add_op("constant", [], params={"value": np.arange(4, dtype=np.float32)})
    parts = g.add_op("split", [c], attrs={"split_sizes": (2, 2), "dim": 0})
    big = g.add_op("relu", [c])
    g.set_outputs((g.add_op("add", [x, big]), parts[0]))
    result = FoldConstants(max_elements=2).run(g, PassContext())
    assert result.stats == {"folded": 0, "skipped.multi_output": 1, "skipped.too_large": 1}


def test_cse_merges_identical_work_and_keeps_distinct_params():
    model = Fn(lambda s, x: torch.relu(x) + torch.relu(x) + s.a(x) + s.b(x), a=nn.Linear(3, 3), b=nn.Linear(3, 3))
    graph = check_numerics(EliminateCommonSubexpressions(), model, (torch.randn(2, 3),))
    ops = [d["op"] for _, d in graph.nodes(data=True)]
    assert ops.count("relu") == 1 and ops.count("linear") == 2
    assert_idempotent(EliminateCommonSubexpressions(), graph)


def test_remove_identities():
    model = Fn(lambda s, x: s.drop(s.ident(x)).reshape(2, 3).permute(0, 1).float()[:, 0:3] + 1.0,
               drop=nn.Dropout(0.5), ident=nn.Identity())
    graph = check_numerics(RemoveIdentities(), model, (torch.randn(2, 3),))
    assert [d["op"] for _, d in graph.nodes(data=True) if d["op"] != "constant"] == ["input", "add"]
    assert_idempotent(RemoveIdentities(), graph)


def test_dce_keeps_inputs_and_live_nodes():
    g = Graph(name="dce")
    x = g.add_input("x", TensorType((2,)))
    unused_input = g.add_input("y", TensorType((2,)))
    g.add_op("relu", [unused_input], name="dead")
    g.set_outputs(g.add_op("sigmoid", [x]))
    assert run_pass(EliminateDeadNodes(), g).stats == {"removed": 1}
    assert set(g.nodes) == {"x", "y", "sigmoid"}
