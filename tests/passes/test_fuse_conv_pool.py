"""fuse-conv-pool: structure, numerics (overlapping/padded/ceil-mode windows, BN, activations), one test per refusal,
idempotence. The fused kernel's numerics through TVM are in tests/backends/test_kernels.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from passes.core.pass_base import PassContext
from passes.ir.ops import commutes_with_max
from passes.ir.text import graph_text
from passes.transforms.fuse_conv_activation import FuseConvActivation
from passes.transforms.fuse_conv_add import FuseConvAdd
from passes.transforms.fuse_conv_pool import FuseConvPool
from tests.cases import Fn
from tests.passes.helpers import assert_graph_text, assert_idempotent, check_numerics, run_pass

X = (torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)


def seeded(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor]:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)),)


def conv_relu_pool(pool: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), pool)


def with_statistics(model: nn.Module) -> nn.Module:
    """Non-trivial batch-norm statistics, seeded, so a fold that forgets one is caught."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


def stem(channels: int = 8) -> nn.Module:
    """The ResNet stem: conv 7x7/2 (no bias), BN, ReLU, max pool 3x3/2 padding 1."""
    return with_statistics(nn.Sequential(nn.Conv2d(3, channels, 7, 2, 3, bias=False), nn.BatchNorm2d(channels),
                                         nn.ReLU(), nn.MaxPool2d(3, 2, 1)))


def test_structure_activation_node_absorbed_without_another_pass():
    graph = check_numerics(FuseConvPool(), conv_relu_pool(nn.MaxPool2d(2)), X)
    assert_graph_text(graph, """
graph Sequential(%input_1: f32[1,3,8,8]) {
  %n2 = conv2d_pool(%input_1) {activation='relu', activation_params=(), dilation=(1, 1), groups=1, out_layout='NCHW', padding=(1, 1), pool='max', pool_ceil_mode=False, pool_kernel=(2, 2), pool_padding=(0, 0), pool_stride=(2, 2), stride=(1, 1)} [bias: f32[4], weight: f32[4,3,3,3]] -> f32[1,4,4,4]
  return %n2
}""")
    assert graph.nodes["n2"]["origin"] == ("0", "1", "2")


def test_structure_resnet_stem_with_batch_norm():
    model = stem()
    graph = check_numerics([], model, seeded((1, 3, 32, 32)))
    result = run_pass(FuseConvPool(), graph)
    assert result.stats == {"fused": 1}
    assert_graph_text(graph, """
graph Sequential(%input_1: f32[1,3,32,32]) {
  %n3 = conv2d_pool(%input_1) {activation='relu', activation_params=(), dilation=(1, 1), groups=1, out_layout='NCHW', padding=(3, 3), pool='max', pool_ceil_mode=False, pool_kernel=(3, 3), pool_padding=(1, 1), pool_stride=(2, 2), stride=(2, 2)} [bias: f32[8], weight: f32[8,3,7,7]] -> f32[1,8,8,8]
  return %n3
}""")
    assert graph.nodes["n3"]["origin"] == ("0", "1", "2", "3")
    check_numerics(FuseConvPool(), model, seeded((1, 3, 32, 32)))


@pytest.mark.parametrize("pool", [
    nn.MaxPool2d(2), nn.AvgPool2d(2), nn.MaxPool2d((2, 1)), nn.AvgPool2d(3, 3),
    nn.MaxPool2d(3, 2), nn.AvgPool2d(3, 2), nn.MaxPool2d(3, 2, padding=1), nn.MaxPool2d(3, 1, padding=1),
    nn.MaxPool2d(3, 2, ceil_mode=True), nn.MaxPool2d(3, 2, padding=1, ceil_mode=True), nn.MaxPool2d((3, 2), (2, 1)),
    nn.AvgPool2d(2, ceil_mode=True),  # 10x10 conv output: ceil_mode adds no window, so it fuses
], ids=repr)
def test_numerics_for_each_window_shape(pool):
    graph = check_numerics(FuseConvPool(), conv_relu_pool(pool), seeded((1, 3, 10, 10)))
    assert [d["op"] for _, d in graph.nodes(data=True)] == ["input", "conv2d_pool"]


@pytest.mark.parametrize("act", [nn.ReLU6(), nn.LeakyReLU(0.2), nn.LeakyReLU(-0.5), nn.Hardtanh(-0.3, 0.5),
                                 nn.SiLU(), nn.GELU(), nn.Tanh()], ids=repr)
def test_numerics_for_each_activation(act):
    model = with_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), act, nn.MaxPool2d(3, 2, 1, ceil_mode=True)))
    graph = check_numerics(FuseConvPool(), model, seeded((1, 3, 12, 11)))
    assert [d["op"] for _, d in graph.nodes(data=True)] == ["input", "conv2d_pool"]


def test_grouped_strided_conv_without_activation():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, groups=2, bias=False), nn.MaxPool2d(2))
    graph = check_numerics(FuseConvPool(), model, seeded((1, 4, 11, 11)))
    assert "conv2d_pool" in [d["op"] for _, d in graph.nodes(data=True)]


def test_every_conv_act_pool_of_a_vgg_stack_fuses_by_itself():
    layers, channels = [], 3
    for width in (8, 16, 16):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                   nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    graph = check_numerics([], with_statistics(nn.Sequential(*layers)), seeded((1, 3, 16, 16)))
    assert run_pass(FuseConvPool(), graph).stats == {"fused": 3}
    ops = [d["op"] for _, d in graph.nodes(data=True)]
    assert ops.count("conv2d_pool") == 3 and "max_pool2d" not in ops and "batch_norm" not in ops


def test_activations_that_commute_with_max():
    assert all(commutes_with_max(a, p) for a, p in [("relu", ()), ("relu6", ()), ("clamp", (-1.0, 2.0)),
                                                    ("leaky_relu", (0.1,)), ("hardsigmoid", ()), ("none", ())])
    assert not any(commutes_with_max(a, p) for a, p in [("leaky_relu", (-0.5,)), ("silu", ()), ("gelu", ()),
                                                        ("tanh", ()), ("sigmoid", ())])


def assert_refused(graph, reason: str, ctx: PassContext | None = None) -> None:
    before = graph_text(graph)
    assert run_pass(FuseConvPool(), graph, ctx).stats == {"fused": 0, f"skipped.{reason}": 1}
    assert graph_text(graph) == before


@pytest.mark.parametrize("pool, reason", [
    (nn.MaxPool2d(2, 3), "gapped_windows"),
    (nn.MaxPool2d(2, 2, dilation=2), "pool_dilation"),
    (nn.AvgPool2d(3, 2, padding=1), "pool_padding"),
    (nn.AvgPool2d(2, 2, ceil_mode=True), "ceil_mode"),  # conv output 7x7: odd, so ceil_mode adds a window
], ids=lambda v: str(v))
def test_refusals_by_pool_attributes(pool, reason):
    graph = check_numerics([], nn.Sequential(nn.Conv2d(3, 4, 3), pool), seeded((1, 3, 9, 9)))
    assert_refused(graph, reason)


def test_refuses_shared_output():
    shared = Fn(lambda s, x: (lambda y: (s.pool(y), y))(s.conv(x)), conv=nn.Conv2d(3, 4, 3), pool=nn.MaxPool2d(2))
    assert_refused(check_numerics([], shared, X), "shared_output")


def test_refuses_shared_activation_output():
    shared = Fn(lambda s, x: (lambda y: (s.pool(y), y))(torch.relu(s.conv(x))), conv=nn.Conv2d(3, 4, 3),
                pool=nn.MaxPool2d(2))
    assert_refused(check_numerics([], shared, X), "shared_output")


def test_refuses_no_producer():
    assert_refused(check_numerics([], Fn(lambda s, x: s.pool(x * 2.0), pool=nn.MaxPool2d(2)), X), "no_producer")


def test_refuses_residual():
    model = Fn(lambda s, x: s.pool(s.conv(x) + x), conv=nn.Conv2d(3, 3, 3, padding=1), pool=nn.MaxPool2d(2))
    assert_refused(check_numerics(FuseConvAdd(), model, X), "residual")


def test_refuses_second_activation():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.ReLU(), nn.MaxPool2d(2))
    assert_refused(check_numerics(FuseConvActivation(), model, X), "already_fused")


def test_refuses_batch_norm_after_fused_activation():
    model = with_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.MaxPool2d(2)))
    assert_refused(check_numerics(FuseConvActivation(), model, X), "activation_first")


def test_cuda_target_is_refused_unless_forced():
    graph = check_numerics([], conv_relu_pool(nn.MaxPool2d(2)), X)
    cuda = PassContext(target="cuda")
    assert_refused(graph, "cuda_target", cuda)
    assert FuseConvPool(on_cuda=True).run(graph, cuda).stats == {"fused": 1}


def test_idempotent():
    graph = check_numerics(FuseConvPool(), stem(), seeded((1, 3, 32, 32)))
    assert_idempotent(FuseConvPool(), graph)
