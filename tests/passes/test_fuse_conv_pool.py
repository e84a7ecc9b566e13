"""fuse-conv-pool: structure, numerics, refusals, and the fused kernel's TIR (one PrimFunc, no full conv buffer)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from passes.transforms.fuse_conv_activation import FuseConvActivation
from passes.transforms.fuse_conv_pool import FuseConvPool
from tests.cases import Fn
from tests.passes.helpers import assert_graph_text, assert_idempotent, check_numerics, run_pass

X = (torch.randn(1, 3, 8, 8),)


def conv_relu_pool(pool: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), pool)


def test_structure_and_stats():
    graph = check_numerics([FuseConvActivation(), FuseConvPool()], conv_relu_pool(nn.MaxPool2d(2)), X)
    assert_graph_text(graph, """
graph Sequential(%input_1: f32[1,3,8,8]) {
  %n2 = conv2d_pool(%input_1) {activation='relu', activation_params=(), dilation=(1, 1), groups=1, padding=(1, 1), pool='max', pool_kernel=(2, 2), pool_stride=(2, 2), stride=(1, 1)} [bias: f32[4], weight: f32[4,3,3,3]] -> f32[1,4,4,4]
  return %n2
}""")
    assert graph.nodes["n2"]["origin"] == ("0", "1", "2")


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.AvgPool2d(2), nn.MaxPool2d((2, 1)), nn.AvgPool2d(3, 3)],
                         ids=repr)
def test_numerics(pool):
    graph = check_numerics([FuseConvActivation(), FuseConvPool()], conv_relu_pool(pool), (torch.randn(1, 3, 9, 9),))
    assert [d["op"] for _, d in graph.nodes(data=True)] == ["input", "conv2d_pool"]


def test_grouped_strided_conv_without_activation():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, groups=2, bias=False), nn.MaxPool2d(2))
    graph = check_numerics(FuseConvPool(), model, (torch.randn(1, 4, 11, 11),))
    assert "conv2d_pool" in [d["op"] for _, d in graph.nodes(data=True)]


@pytest.mark.parametrize("pool, reason", [
    (nn.MaxPool2d(3, 2), "overlapping_windows"),
    (nn.MaxPool2d(2, 3), "gapped_windows"),
    (nn.MaxPool2d(2, 2, padding=1), "pool_padding"),
    (nn.MaxPool2d(2, 2, dilation=2), "pool_dilation"),
    (nn.MaxPool2d(2, 2, ceil_mode=True), "ceil_mode"),
], ids=lambda v: str(v))
def test_refusals_by_pool_attributes(pool, reason):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), pool)  # conv output 7x7: odd, so ceil_mode adds a window
    graph = check_numerics(FuseConvPool(), model, (torch.randn(1, 3, 9, 9),))
    from passes.core.pass_base import PassContext

    result = FuseConvPool().run(graph, PassContext())
    assert result.stats == {"fused": 0, f"skipped.{reason}": 1}


def test_refusals_by_structure():
    shared = Fn(lambda s, x: (lambda y: (s.pool(y), y))(s.conv(x)), conv=nn.Conv2d(3, 4, 3), pool=nn.MaxPool2d(2))
    graph = check_numerics(FuseConvPool(), shared, X)
    assert run_pass(FuseConvPool(), graph).stats == {"fused": 0, "skipped.shared_output": 1}
    no_conv = Fn(lambda s, x: s.pool(x * 2.0), pool=nn.MaxPool2d(2))
    graph = check_numerics(FuseConvPool(), no_conv, X)
    assert run_pass(FuseConvPool(), graph).stats == {"fused": 0, "skipped.no_producer": 1}


def test_cuda_target_is_refused_unless_forced():
    from passes.core.pass_base import PassContext

    graph = check_numerics(FuseConvActivation(), conv_relu_pool(nn.MaxPool2d(2)), X)
    cuda = PassContext(target="cuda")
    assert FuseConvPool().run(graph, cuda).stats == {"fused": 0, "skipped.cuda_target": 1}
    assert FuseConvPool(on_cuda=True).run(graph, cuda).stats == {"fused": 1}


def test_idempotent():
    graph = check_numerics(FuseConvPool(), conv_relu_pool(nn.MaxPool2d(2)), X)
    assert_idempotent(FuseConvPool(), graph)
