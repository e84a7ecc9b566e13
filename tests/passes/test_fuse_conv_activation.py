"""fuse-conv-activation: structure, numerics for every activation, refusals, idempotence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from passes.ir.graph import Graph, TensorType
from passes.transforms.fuse_conv_activation import FuseConvActivation
from tests.cases import Fn
from tests.passes.helpers import assert_graph_text, assert_idempotent, check_numerics, run_pass


def linear_relu(shared: bool = False, activation: str = "none") -> Graph:
    g = Graph(name="lin")
    x = g.add_input("x", TensorType((2, 3)))
    lin = g.add_op("linear", [x], attrs={"activation": activation},
                   params={"weight": np.ones((4, 3), np.float32)}, origin=("fc",))
    act = g.add_op("relu", [lin], origin=("act",))
    g.set_outputs((act, lin) if shared else act)
    return g


def test_structure_and_stats():
    g = linear_relu()
    result = run_pass(FuseConvActivation(), g)
    assert result.stats == {"fused": 1}
    assert_graph_text(g, """
graph lin(%x: f32[2,3]) {
  %fc = linear(%x) {activation='relu', activation_params=()} [weight: f32[4,3]] -> f32[2,4]
  return %fc
}""")


@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.3), nn.ELU(0.5), nn.GELU(), nn.GELU("tanh"),
                                 nn.SiLU(), nn.Mish(), nn.Sigmoid(), nn.Tanh(), nn.Hardswish(), nn.Hardsigmoid(),
                                 nn.Hardtanh(-0.2, 0.4)], ids=lambda m: repr(m))
def test_numerics_for_each_activation(act):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), act)
    graph = check_numerics(FuseConvActivation(), model, (torch.randn(1, 3, 6, 6),))
    assert [d["op"] for _, d in graph.nodes(data=True)] == ["input", "conv2d"]


def test_conv1d_and_linear():
    check_numerics(FuseConvActivation(), nn.Sequential(nn.Conv1d(2, 3, 3), nn.SiLU()), (torch.randn(1, 2, 7),))
    check_numerics(FuseConvActivation(), nn.Sequential(nn.Linear(3, 3), nn.ReLU6()), (torch.randn(2, 3),))


def test_refusals():
    assert run_pass(FuseConvActivation(), linear_relu(shared=True)).stats == {"fused": 0,
                                                                              "skipped.shared_output": 1}
    assert run_pass(FuseConvActivation(), linear_relu(activation="tanh")).stats == {"fused": 0,
                                                                                    "skipped.already_fused": 1}
    model = Fn(lambda s, x: torch.relu(x * 2.0))
    graph = check_numerics(FuseConvActivation(), model, (torch.randn(3),))
    assert "relu" in [d["op"] for _, d in graph.nodes(data=True)]


def test_idempotent():
    g = linear_relu()
    run_pass(FuseConvActivation(), g)
    assert_idempotent(FuseConvActivation(), g)
