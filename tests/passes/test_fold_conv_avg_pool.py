"""fold-conv-avg-pool: structure with exact stats, numerics of both rewrites, one test per refusal, idempotence.
Through TVM: tests/backends/test_kernels.py builds a folded model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from passes.core.pass_base import PassContext
from passes.ir.cost import graph_flops
from passes.ir.text import graph_text
from passes.transforms.fold_conv_avg_pool import FoldConvAvgPool, combined_weight
from passes.transforms.fuse_conv_activation import FuseConvActivation
from passes.transforms.fuse_conv_add import FuseConvAdd
from tests.cases import Fn
from tests.passes.helpers import assert_graph_text, assert_idempotent, check_numerics, run_pass


def seeded(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor]:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)),)


def test_structure_pooled_first_densenet_transition():
    model = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False), nn.AvgPool2d(2, 2))
    graph = check_numerics([], model, seeded((1, 8, 10, 10)))
    flops_before = graph_flops(graph)
    assert run_pass(FoldConvAvgPool(), graph).stats == {"pooled_first": 1, "combined": 0}
    assert_graph_text(graph, """
graph Sequential(%input_1: f32[1,8,10,10]) {
  %n0 = batch_norm(%input_1) {eps=1e-05} [bias: f32[8], running_mean: f32[8], running_var: f32[8], weight: f32[8]] -> f32[1,8,10,10]
  %n1 = relu(%n0) -> f32[1,8,10,10]
  %n3_1 = avg_pool2d(%n1) {ceil_mode=False, count_include_pad=True, kernel_size=(2, 2), padding=(0, 0), stride=(2, 2)} -> f32[1,8,5,5]
  %n3 = conv2d(%n3_1) {activation='none', activation_params=(), dilation=(1, 1), groups=1, padding=(0, 0), stride=(1, 1)} [weight: f32[4,8,1,1]] -> f32[1,4,5,5]
  return %n3
}""")
    # the conv runs on a quarter of the pixels; the pool now averages 8 channels instead of 4
    assert flops_before - graph_flops(graph) == 2 * 8 * 4 * (100 - 25) - 25 * 4 * (8 - 4)
    check_numerics(FoldConvAvgPool(), model, seeded((1, 8, 10, 10)))


def test_structure_combined_kernel():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(2))
    graph = check_numerics(FoldConvAvgPool(), model, seeded((1, 3, 8, 8)))
    assert_graph_text(graph, """
graph Sequential(%input_1: f32[1,3,8,8]) {
  %n1 = conv2d(%input_1) {activation='none', activation_params=(), dilation=(1, 1), groups=1, padding=(1, 1), stride=(2, 2)} [bias: f32[4], weight: f32[4,3,4,4]] -> f32[1,4,4,4]
  return %n1
}""")
    assert graph.nodes["n1"]["origin"] == ("0", "1")


def test_combined_weight_is_the_average_of_shifted_kernels():
    weight = np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)  # [[0, 1], [2, 3]]
    np.testing.assert_array_equal(combined_weight(weight, (1, 1), (2, 2))[0, 0],
                                  np.array([[0, 1, 1], [2, 6, 4], [2, 5, 3]], np.float32) / 4)


@pytest.mark.parametrize("conv, pool, shape, work", [
    (nn.Conv2d(8, 4, 1), nn.AvgPool2d(2), (1, 8, 10, 10), "pooled_first"),
    (nn.Conv2d(8, 4, 1, groups=2), nn.AvgPool2d(3, 2, ceil_mode=True), (1, 8, 10, 10), "pooled_first"),
    (nn.Conv2d(8, 4, 1), nn.AvgPool2d(3, 2, padding=1, count_include_pad=False), (1, 8, 9, 9), "pooled_first"),
    (nn.Conv2d(8, 4, 1, bias=False), nn.AvgPool2d(3, 2, padding=1), (1, 8, 9, 9), "pooled_first"),
    (nn.Conv2d(4, 6, 3, padding=1), nn.AvgPool2d(2), (1, 4, 10, 10), "combined"),
    (nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.AvgPool2d(3, 2), (1, 4, 21, 19), "combined"),
    (nn.Conv2d(4, 4, 3, groups=4), nn.AvgPool2d((2, 3)), (1, 4, 11, 14), "combined"),
    (nn.Conv2d(4, 6, 2, bias=False), nn.AvgPool2d(2), (1, 4, 12, 13), "combined"),
], ids=repr)
def test_numerics(conv, pool, shape, work):
    graph = check_numerics(FoldConvAvgPool(), nn.Sequential(conv, pool), seeded(shape))
    ops = [d["op"] for _, d in graph.nodes(data=True)]
    assert ops == (["input", "avg_pool2d", "conv2d"] if work == "pooled_first" else ["input", "conv2d"])


def assert_refused(graph, reason: str) -> None:
    before = graph_text(graph)
    assert run_pass(FoldConvAvgPool(), graph, PassContext()).stats == {
        "pooled_first": 0, "combined": 0, f"skipped.{reason}": 1}
    assert graph_text(graph) == before


@pytest.mark.parametrize("conv, pool, reason", [
    (nn.Conv2d(3, 4, 1), nn.AvgPool2d(3, 2, padding=1), "count_include_pad"),
    (nn.Conv2d(3, 4, 3, dilation=2), nn.AvgPool2d(2), "dilation"),
    (nn.Conv2d(3, 4, 3), nn.AvgPool2d(3, 2, padding=1, count_include_pad=False), "pool_padding"),
    (nn.Conv2d(3, 4, 3), nn.AvgPool2d(2, ceil_mode=True), "ceil_mode"),  # conv output 7x7: a partial window
    (nn.Conv2d(3, 4, 3), nn.AvgPool2d(4, 1), "more_macs"),  # 6x6 kernel per output instead of 3x3 + 16 adds
], ids=lambda v: str(v))
def test_refusals_by_attributes(conv, pool, reason):
    assert_refused(check_numerics([], nn.Sequential(conv, pool), seeded((1, 3, 9, 9))), reason)


def test_refuses_activation_node_between():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.AvgPool2d(2))
    assert_refused(check_numerics([], model, seeded((1, 3, 8, 8))), "activation_between")


def test_refuses_activation_fused_into_the_conv():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.AvgPool2d(2))
    assert_refused(check_numerics(FuseConvActivation(), model, seeded((1, 3, 8, 8))), "activation_between")


def test_refuses_residual():
    model = Fn(lambda s, x: s.pool(s.conv(x) + x), conv=nn.Conv2d(3, 3, 1), pool=nn.AvgPool2d(2))
    assert_refused(check_numerics(FuseConvAdd(), model, seeded((1, 3, 8, 8))), "residual")


def test_refuses_shared_output_and_no_producer():
    shared = Fn(lambda s, x: (lambda y: (s.pool(y), y))(s.conv(x)), conv=nn.Conv2d(3, 4, 1), pool=nn.AvgPool2d(2))
    assert_refused(check_numerics([], shared, seeded((1, 3, 8, 8))), "shared_output")
    no_conv = Fn(lambda s, x: s.pool(x * 2.0), pool=nn.AvgPool2d(2))
    assert_refused(check_numerics([], no_conv, seeded((1, 3, 8, 8))), "no_producer")


def test_idempotent():
    graph = check_numerics(FoldConvAvgPool(), nn.Sequential(nn.Conv2d(8, 4, 1), nn.AvgPool2d(2)),
                           seeded((1, 8, 8, 8)))
    assert_idempotent(FoldConvAvgPool(), graph)


def test_explain_shows_rewrites_and_refusals(tmp_path, capsys):
    from passes.cli import main

    model = Fn(lambda s, x: (s.pool(s.transition(x)), s.pool(torch.relu(s.conv(x)))),
               transition=nn.Conv2d(3, 4, 1), conv=nn.Conv2d(3, 4, 3), pool=nn.AvgPool2d(2))
    path = tmp_path / "model.onnx"
    torch.onnx.export(model.eval(), seeded((1, 3, 8, 8)), str(path), dynamo=False)
    assert main(["explain", "fold-conv-avg-pool", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fold-conv-avg-pool: 2 candidate(s)" in out
    assert "REWRITTEN" in out and "pooled_first" in out
    assert "skipped" in out and "activation_between" in out
