"""fold-batch-norm: structure, numerics against PyTorch, one negative per refusal, idempotence."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from passes.ir.graph import Graph, TensorType
from passes.transforms.fold_batch_norm import FoldBatchNorm
from tests.cases import Fn
from tests.passes.helpers import assert_graph_text, assert_idempotent, check_numerics, run_pass

RNG = np.random.default_rng(0)


def _bn_params(c: int) -> dict:
    return {"running_mean": RNG.standard_normal(c).astype(np.float32),
            "running_var": RNG.uniform(0.5, 2, c).astype(np.float32),
            "weight": RNG.uniform(0.5, 1.5, c).astype(np.float32), "bias": RNG.standard_normal(c).astype(np.float32)}


def conv_bn(activation: str = "none", extra_user: bool = False) -> Graph:
    g = Graph(name="conv_bn")
    x = g.add_input("x", TensorType((1, 2, 5, 5)))
    conv = g.add_op("conv2d", [x], attrs={"activation": activation},
                    params={"weight": RNG.standard_normal((3, 2, 1, 1)).astype(np.float32)}, origin=("conv",))
    bn = g.add_op("batch_norm", [conv], params=_bn_params(3), origin=("bn",))
    g.set_outputs((bn, conv) if extra_user else bn)
    return g


def test_structure_and_stats():
    g = conv_bn()
    result = run_pass(FoldBatchNorm(), g)
    assert result.changed and result.stats == {"folded": 1}
    assert_graph_text(g, """
graph conv_bn(%x: f32[1,2,5,5]) {
  %conv = conv2d(%x) {activation='none', activation_params=(), dilation=(1, 1), groups=1, padding=(0, 0), stride=(1, 1)} [bias: f32[3], weight: f32[3,2,1,1]] -> f32[1,3,5,5]
  return %conv
}""")
    assert g.nodes["conv"]["origin"] == ("conv", "bn")


def test_numerics_on_conv_linear_and_transpose_with_and_without_bias():
    def bn(m):
        with torch.no_grad():
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1, 1)
        return m

    models = [
        (nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), bn(nn.BatchNorm2d(4))), (torch.randn(1, 3, 8, 8),)),
        (nn.Sequential(nn.Conv2d(3, 4, 3, groups=1), bn(nn.BatchNorm2d(4)), nn.ReLU()), (torch.randn(1, 3, 8, 8),)),
        (nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), bn(nn.BatchNorm2d(4))), (torch.randn(1, 4, 8, 8),)),
        (nn.Sequential(nn.Conv1d(3, 5, 3), bn(nn.BatchNorm1d(5))), (torch.randn(2, 3, 9),)),
        (nn.Sequential(nn.Linear(6, 5), bn(nn.BatchNorm1d(5))), (torch.randn(4, 6),)),
        (nn.Sequential(nn.ConvTranspose2d(3, 4, 2, stride=2), bn(nn.BatchNorm2d(4))), (torch.randn(1, 3, 4, 4),)),
    ]
    for model, inputs in models:
        graph = check_numerics(FoldBatchNorm(), model, inputs)
        assert not [n for n, d in graph.nodes(data=True) if d["op"] == "batch_norm"]


def test_refuses_when_conv_output_is_shared():
    g = conv_bn(extra_user=True)
    result = run_pass(FoldBatchNorm(), g)
    assert not result.changed and result.stats == {"folded": 0, "skipped.shared_output": 1}


def test_refuses_after_fused_activation():
    g = conv_bn(activation="relu")
    result = run_pass(FoldBatchNorm(), g)
    assert result.stats == {"folded": 0, "skipped.activation_first": 1}


def test_refuses_without_producer_and_on_wrong_channel_axis():
    model = Fn(lambda s, x: s.bn(x + 1.0), bn=nn.BatchNorm2d(3))
    graph = check_numerics(FoldBatchNorm(), model, (torch.randn(1, 3, 4, 4),))
    assert [d["op"] for _, d in graph.nodes(data=True)].count("batch_norm") == 1

    g = Graph(name="linear_3d")
    x = g.add_input("x", TensorType((2, 3, 4)))
    lin = g.add_op("linear", [x], params={"weight": np.ones((3, 4), np.float32)})
    g.set_outputs(g.add_op("batch_norm", [lin], params=_bn_params(3)))
    assert run_pass(FoldBatchNorm(), g).stats == {"folded": 0, "skipped.channel_axis": 1}


def test_refuses_grouped_transpose():
    g = Graph(name="grouped_t")
    x = g.add_input("x", TensorType((1, 4, 3, 3)))
    t = g.add_op("conv_transpose2d", [x], attrs={"groups": 2}, params={"weight": np.ones((4, 2, 2, 2), np.float32)})
    g.set_outputs(g.add_op("batch_norm", [t], params=_bn_params(4)))
    assert run_pass(FoldBatchNorm(), g).stats == {"folded": 0, "skipped.grouped_transpose": 1}


def test_idempotent():
    g = conv_bn()
    run_pass(FoldBatchNorm(), g)
    assert_idempotent(FoldBatchNorm(), g)
