"""fuse-conv-add: residual adds (and the activation after them) folded into the conv that feeds them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backends.tvm import build
from passes.core.pass_base import PassContext
from passes.transforms.fuse_conv_activation import FuseConvActivation
from passes.transforms.fuse_conv_add import FuseConvAdd
from tests.cases import Fn
from tests.helpers import assert_outputs_close
from tests.passes.helpers import assert_graph_text, assert_idempotent, check_numerics, run_pass


class Block(nn.Module):
    """A ResNet basic block's tail: relu(conv(x) + x)."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x) + x)


X = (torch.randn(1, 4, 6, 6),)


def test_structure_and_stats():
    graph = check_numerics(FuseConvAdd(), Block(), X)
    assert_graph_text(graph, """
graph Block(%x: f32[1,4,6,6]) {
  %conv = conv2d(%x, %x) {activation='relu', activation_params=(), dilation=(1, 1), groups=1, padding=(1, 1), stride=(1, 1)} [bias: f32[4], weight: f32[4,4,3,3]] -> f32[1,4,6,6]
  return %conv
}""")
    assert graph.nodes["conv"]["origin"] == ("conv", "add", "relu")


def test_residual_on_either_side_and_without_activation():
    left = Fn(lambda s, x, r: r + s.conv(x), conv=nn.Conv2d(3, 5, 1))
    graph = check_numerics(FuseConvAdd(), left, (torch.randn(1, 3, 4, 4), torch.randn(1, 5, 4, 4)))
    assert [d["op"] for _, d in graph.nodes(data=True)] == ["input", "input", "conv2d"]
    assert graph.nodes["conv"]["attrs"]["activation"] == "none"


def test_downsample_branch_where_both_operands_are_convs():
    model = Fn(lambda s, x: torch.relu(s.a(x) + s.b(x)), a=nn.Conv2d(3, 4, 3, stride=2, padding=1),
               b=nn.Conv2d(3, 4, 1, stride=2))
    graph = check_numerics(FuseConvAdd(), model, (torch.randn(1, 3, 8, 8),))
    assert sorted(d["op"] for _, d in graph.nodes(data=True)) == ["conv2d", "conv2d", "input"]


@pytest.mark.parametrize("model, reason", [
    (Fn(lambda s, x: (lambda y: (y + x, y))(s.conv(x)), conv=nn.Conv2d(4, 4, 3, padding=1)), "shared_output"),
    (Fn(lambda s, x: s.conv(x) + x[:, :1], conv=nn.Conv2d(4, 4, 3, padding=1)), "broadcast"),
    (Fn(lambda s, x: x * 2.0 + x), "no_producer"),
], ids=["shared_output", "broadcast", "no_producer"])
def test_refusals(model, reason):
    graph = check_numerics(FuseConvAdd(), model, X)
    assert run_pass(FuseConvAdd(), graph).stats == {"fused": 0, f"skipped.{reason}": 1}


def test_refuses_a_conv_with_an_activation_already():
    graph = check_numerics([FuseConvActivation()], Fn(lambda s, x: torch.relu(s.conv(x)) + x,
                                                       conv=nn.Conv2d(4, 4, 3, padding=1)), X)
    assert run_pass(FuseConvAdd(), graph).stats == {"fused": 0, "skipped.already_fused": 1}


def test_idempotent():
    graph = check_numerics(FuseConvAdd(), Block(), X)
    assert_idempotent(FuseConvAdd(), graph)


@pytest.mark.tvm
@pytest.mark.parametrize("channels, size", [(4, 6), (32, 8), (16, 20)])  # both conv schedules
def test_residual_epilogue_in_the_compiled_kernel(channels, size):
    model = Block(channels).eval()
    x = torch.randn(1, channels, size, size)
    graph = check_numerics(FuseConvAdd(), model, (x,))
    FuseConvAdd().run(graph, PassContext())
    with torch.no_grad():
        assert_outputs_close(model(x), build(graph, "llvm")(x))
