"""fold-channel-scale: squeeze-excite's x * s folded into the weights of the conv that reads the product."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backends.tvm import build
from frontend.torch_fx import from_torch
from passes.core.pass_base import PassContext
from passes.core.pipeline import Pipeline, resolve
from passes.ir.interpret import run_reference
from passes.transforms.fold_channel_scale import FoldChannelScale
from tests.cases import Fn
from tests.helpers import assert_outputs_close
from tests.passes.helpers import assert_idempotent, run_pass
from tests.passes.test_alter_layout import SqueezeExcite

BEFORE = "default,alter-layout"


def gated(channels: int = 16, out: int = 8, kernel: int = 1, residual: bool = False, groups: int = 1):
    """tail(project(y * sigmoid(fc(pool(y)))) [+ x]), y = inner(x): the gate as torchvision's SqueezeExcitation
    computes it; the 1x1 ``tail`` conv makes the project conv store NCHW8c (so alter-layout blocks it)."""
    def forward(s, x):
        y = s.inner(x)
        g = torch.sigmoid(s.fc(nn.functional.adaptive_avg_pool2d(y, 1)))
        z = s.project(g * y)  # the gate first, as torchvision writes it
        return s.tail(z + x if residual else z)
    return Fn(forward, inner=nn.Conv2d(8, channels, 1), fc=nn.Conv2d(channels, channels, 1),
              project=nn.Conv2d(channels, out, kernel, padding=kernel // 2, groups=groups), tail=nn.Conv2d(out, 8, 1))


def prepared(model: nn.Module, x: torch.Tensor, passes: str = BEFORE):
    graph = from_torch(model.eval(), (x,))
    Pipeline(resolve(passes)).run(graph, PassContext())
    return graph


def folds(model: nn.Module, x: torch.Tensor, passes: str = BEFORE):
    """(graph after the pass, the pass's stats), the reference interpreter equal to PyTorch before and after."""
    graph = prepared(model, x, passes)
    before = run_reference(graph, (x,))
    result = run_pass(FoldChannelScale(), graph)
    with torch.no_grad():
        assert_outputs_close(model(x), run_reference(graph, (x,)), rtol=1e-5, atol=1e-6)
    assert_outputs_close(before, run_reference(graph, (x,)), rtol=1e-5, atol=1e-6)
    return graph, result.stats


def test_the_gate_moves_into_the_project_conv():
    graph, stats = folds(SqueezeExcite(), torch.randn(1, 8, 9, 11))
    assert stats["folded"] == 1 and not graph.op_nodes("mul")
    project = graph.nodes["project"]
    assert project["attrs"]["input_scale"] and project["attrs"]["in_layout"] == "NCHW8c"
    x, gate = graph.operands("project")
    assert graph.value_type(gate).shape == (1, 3, 1, 1, 8) and graph.nodes[gate.node]["op"] == "conv2d_nchwc"
    assert graph.value_type(x).shape == (1, 3, 5, 6, 8)  # the depthwise conv's output, read directly
    assert_idempotent(FoldChannelScale(), graph)


def test_a_plain_gate_a_residual_and_a_padded_3x3_conv():
    """12 channels keep NCHW (no whole block): the gate is (1, 12, 1, 1); the residual stays the second operand."""
    graph, stats = folds(gated(channels=12, kernel=3, residual=True), torch.randn(1, 8, 10, 10))
    assert stats["folded"] == 1
    x, residual, gate = graph.operands("project")
    assert graph.value_type(gate).shape == (1, 12, 1, 1) and graph.value_type(residual).shape[:2] == (1, 1)


@pytest.mark.parametrize("model, shape, reason", [
    (Fn(lambda s, x: (lambda p: s.a(p) + s.b(p))(x * torch.sigmoid(s.g(x.mean((2, 3), keepdim=True)))),
        g=nn.Conv2d(16, 16, 1), a=nn.Conv2d(16, 8, 1), b=nn.Conv2d(16, 8, 1)), (1, 16, 8, 8), "shared"),
    (gated(groups=16, out=16, kernel=3), (1, 8, 8, 8), "grouped"),
    (gated(), (2, 8, 8, 8), "batch"),
    (gated(out=64), (1, 8, 7, 7), "cost"),
], ids=["shared", "grouped", "batch", "cost"])
def test_refusals(model, shape, reason):
    graph, stats = folds(model, torch.randn(*shape))
    assert stats.get("folded", 0) == 0 and stats[f"skipped.{reason}"] >= 1
    assert graph.op_nodes("mul")


def test_a_product_of_two_full_tensors_is_no_gate():
    graph, stats = folds(Fn(lambda s, x: s.a(s.b(x) * s.c(x)), a=nn.Conv2d(16, 8, 1), b=nn.Conv2d(8, 16, 1),
                            c=nn.Conv2d(8, 16, 1)), torch.randn(1, 8, 6, 6))
    assert stats.get("folded", 0) == 0 and stats["skipped.no_gate"] == 1


@pytest.mark.tvm
@pytest.mark.parametrize("model, shape", [
    (SqueezeExcite(), (1, 8, 9, 11)),                                 # blocked gate, flat-pixel 1x1 project
    (gated(channels=12, kernel=3, residual=True), (1, 8, 10, 10)),   # NCHW gate, padded 3x3 conv, residual
    (gated(channels=24, out=16, kernel=3), (1, 8, 14, 13)),          # blocked gate, 3x3 conv packing its input
], ids=["squeeze_excite", "plain_gate_residual", "blocked_3x3"])
def test_compiled_matches_pytorch(model, shape):
    torch.manual_seed(0)
    model, x = model.eval(), torch.randn(*shape)
    graph = prepared(model, x, BEFORE + ",fold-channel-scale")
    assert any(graph.nodes[n]["attrs"]["input_scale"] for n in graph.op_nodes("conv2d_nchwc"))
    with torch.no_grad():
        assert_outputs_close(model(x), build(graph, "llvm")(x), rtol=1e-4, atol=1e-5)


@pytest.mark.tvm
def test_the_onnx_export_multiplies_before_the_conv(tmp_path):
    import onnxruntime as ort

    from backends.onnx import export_onnx

    torch.manual_seed(0)
    model, x = SqueezeExcite().eval(), torch.randn(1, 8, 9, 11)
    graph = prepared(model, x, BEFORE + ",fold-channel-scale")
    session = ort.InferenceSession(str(export_onnx(graph, tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert_outputs_close(model(x), tuple(session.run(None, {session.get_inputs()[0].name: x.numpy()})))
