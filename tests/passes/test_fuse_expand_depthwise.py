"""fuse-expand-depthwise: an inverted residual block's 1x1 expand conv and depthwise conv as one kernel."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from backends.tvm import build
from backends.tvm.expand_depthwise import ExpandDepthwiseSpec, default_tile, expand_depthwise_kernel
from backends.tvm.kernels import compacted_buffers
from backends.tvm.select import select_kernels
from frontend.torch_fx import from_torch
from passes.core.pass_base import PassContext
from passes.core.pipeline import Pipeline, resolve
from passes.ir.interpret import run_reference
from passes.ir.text import graph_text
from passes.transforms.fuse_expand_depthwise import FuseExpandDepthwise
from tests.cases import Fn
from tests.helpers import assert_outputs_close
from tests.passes.helpers import assert_idempotent, run_pass

BEFORE = "default,alter-layout,fold-channel-scale"
ANY_SIZE = FuseExpandDepthwise(min_size=1)  # the tests' maps are small


class InvertedResidual(nn.Module):
    """MobileNetV2's block behind a 1x1 ``stem`` (so the expand conv reads NCHW8c): expand 1x1 + BN + act,
    depthwise KxK + BN + act, project 1x1 + BN [+ the block's input]."""

    def __init__(self, channels: int = 16, expand: int = 6, stride: int = 1, kernel: int = 3, act=nn.ReLU6,
                 residual: bool = False, dilation: int = 1):
        super().__init__()
        e = channels * expand
        self.residual = residual
        self.stem = nn.Conv2d(8, channels, 1)
        self.expand = nn.Sequential(nn.Conv2d(channels, e, 1, bias=False), nn.BatchNorm2d(e), act())
        self.dw = nn.Sequential(nn.Conv2d(e, e, kernel, stride, dilation * (kernel // 2), dilation, groups=e,
                                          bias=False), nn.BatchNorm2d(e), act())
        self.project = nn.Sequential(nn.Conv2d(e, channels, 1, bias=False), nn.BatchNorm2d(channels))
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                    m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                    m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)

    def forward(self, x):
        x = self.stem(x)
        y = self.project(self.dw(self.expand(x)))
        return y + x if self.residual else y


def prepared(model: nn.Module, x: torch.Tensor, passes: str = BEFORE, lanes: int = 8):
    """``lanes``: alter-layout's (8: NCHW8c as on AVX2; 16: NCHW16c where 16 divides the channels, as on AVX-512)."""
    graph = from_torch(model.eval(), (x,))
    Pipeline(resolve(passes)).run(graph, PassContext(lanes=lanes))
    return graph


def fused(model: nn.Module, x: torch.Tensor, p: FuseExpandDepthwise = ANY_SIZE, passes: str = BEFORE,
          target: str = "llvm", lanes: int = 8):
    """(graph after the pass, its stats); the reference interpreter equal to PyTorch after it."""
    graph = prepared(model, x, passes, lanes)
    result = run_pass(p, graph, PassContext(target=target))
    with torch.no_grad():
        assert_outputs_close(model(x), run_reference(graph, (x,)), rtol=1e-5, atol=1e-5)
    return graph, result.stats


def test_the_block_becomes_one_op():
    graph, stats = fused(InvertedResidual(), torch.randn(1, 8, 12, 10))
    assert stats == {"fused": 1}
    (node,) = graph.op_nodes("conv2d_expand_dw")
    data = graph.nodes[node]
    assert set(data["params"]) == {"weight", "bias", "dw_weight", "dw_bias"}  # both batch norms folded
    assert data["params"]["weight"].shape == (96, 16, 1, 1) and data["params"]["dw_weight"].shape == (96, 1, 3, 3)
    assert (data["attrs"]["activation"], data["attrs"]["dw_activation"]) == ("relu6", "relu6")
    assert data["attrs"]["in_layout"] == data["attrs"]["out_layout"] == "NCHW8c"
    assert graph.value_type(graph.operands(node)[0]).shape == (1, 2, 12, 10, 8)  # the stem's blocked output
    assert [graph.nodes[n]["attrs"]["groups"] for n in graph.op_nodes("conv2d_nchwc")] == [1, 1]  # stem, project
    assert "conv2d_expand_dw" in graph_text(graph)
    assert_idempotent(ANY_SIZE, graph)


@pytest.mark.tvm
@pytest.mark.parametrize("model, shape, lanes", [
    (InvertedResidual(), (1, 8, 13, 11), 8),                                       # stride 1, odd map
    (InvertedResidual(stride=2), (1, 8, 15, 17), 8),                               # stride 2, odd map
    (InvertedResidual(residual=True), (1, 8, 9, 12), 8),                           # the block's residual add
    (InvertedResidual(kernel=5, stride=2, act=nn.SiLU), (1, 8, 14, 14), 8),        # EfficientNet's 5x5 + SiLU
    (InvertedResidual(channels=8, expand=3, act=nn.Identity), (2, 8, 10, 9), 8),  # 3 vectors (odd), no act, batch 2
    (InvertedResidual(channels=24, expand=4, act=nn.Hardswish), (1, 8, 7, 7), 8),
    (InvertedResidual(channels=24, expand=6, stride=2), (1, 8, 11, 10), 16),       # AVX-512 blocks: 24 in 8c, 144 16c
    (InvertedResidual(channels=32, expand=6), (1, 8, 9, 9), 16),                   # 16c in and out
], ids=["stride1", "stride2", "residual", "5x5-silu-stride2", "odd-vectors-batch2", "hardswish", "blocks-8c-16c",
        "blocks-16c"])
def test_compiled_matches_pytorch(model, shape, lanes):
    """``lanes`` 16: alter-layout's AVX-512 blocks, on any host."""
    torch.manual_seed(0)
    model, x = model.eval(), torch.randn(*shape) * 2
    graph, stats = fused(model, x, lanes=lanes)
    assert stats["fused"] == 1
    (node,) = graph.op_nodes("conv2d_expand_dw")
    if lanes == 16:
        attrs = graph.nodes[node]["attrs"]
        assert (attrs["in_layout"], attrs["out_layout"]) == (f"NCHW{16 if model.stem.out_channels % 16 == 0 else 8}c",
                                                             "NCHW16c")
    assert select_kernels(graph, "llvm", 8)[node].kernel == "expand_dw"
    with torch.no_grad():
        assert_outputs_close(model(x), build(graph, "llvm")(x), rtol=1e-4, atol=1e-5)


@pytest.mark.tvm
@pytest.mark.parametrize("stride", [1, 2])
def test_the_kernel_never_stores_the_expanded_tensor(stride):
    """The only intermediate buffers are the task's band of expanded rows (a few rows of one channel tile) and the
    register tiles: none of them holds a whole expanded plane."""
    spec = ExpandDepthwiseSpec((1, 16, 56, 56), 96, (3, 3), (stride, stride), (1, 1), 8, activation="relu6",
                               dw_activation="relu6")
    tile = default_tile(spec)
    buffers = dict((name, shape) for name, shape, _ in compacted_buffers(expand_depthwise_kernel(spec, tile)))
    assert set(buffers) == {"expand_local", "band", "dw_local"}
    assert buffers["band"] == (1, tile.oc_block // 8, spec.band_rows(tile.rows), spec.band_width, 8)
    assert tile.rows < spec.out_shape[2] or tile.oc_block < 96
    assert all(math.prod(shape) < 96 * 56 * 56 // 2 for shape in buffers.values())


@pytest.mark.tvm
def test_nan_propagates_as_in_pytorch():
    """A NaN pixel spreads through the expand conv to every expanded channel at that pixel and through the
    depthwise window to its neighbours, exactly where PyTorch's does (ReLU6 keeps NaN: ``nan.py``)."""
    model, x = InvertedResidual().eval(), torch.randn(1, 8, 12, 12)
    x[0, 3, 5, 7] = math.nan
    graph, _ = fused(model, torch.randn(1, 8, 12, 12))
    with torch.no_grad():
        want = model(x).numpy()
    got = np.asarray(build(graph, "llvm")(x))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(want).sum() == 16 * 9  # the 3x3 neighbourhood, every channel
    assert_outputs_close(torch.from_numpy(np.nan_to_num(want)), torch.from_numpy(np.nan_to_num(got)))


@pytest.mark.tvm
def test_the_onnx_export_has_both_convs(tmp_path):
    import onnx
    import onnxruntime as ort

    from backends.onnx import export_onnx

    torch.manual_seed(0)
    model, x = InvertedResidual(stride=2, act=nn.SiLU).eval(), torch.randn(1, 8, 11, 12)
    graph, _ = fused(model, x)
    path = export_onnx(graph, tmp_path / "m.onnx")
    assert [n.op_type for n in onnx.load(path).graph.node].count("Conv") == 4  # stem, expand, depthwise, project
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert_outputs_close(model(x), tuple(session.run(None, {session.get_inputs()[0].name: x.numpy()})))


@pytest.mark.tvm
def test_bfloat16_lowers_as_the_two_convs():
    """mixed-precision after the fusion: the kernel is float32 only, so the op lowers as Relax convs (bf16)."""
    torch.manual_seed(0)
    model, x = InvertedResidual().eval(), torch.randn(1, 8, 10, 10)
    graph, _ = fused(model, x)
    run_pass(resolve("mixed-precision")[0], graph)
    (node,) = graph.op_nodes("conv2d_expand_dw")
    assert select_kernels(graph, "llvm", 8)[node].kernel == "relax"
    with torch.no_grad():
        want = model(x)
    assert_outputs_close(want, torch.as_tensor(np.asarray(build(graph, "llvm")(x))), rtol=3e-2, atol=3e-2)


def _shared_expand():
    def forward(s, x):
        e = s.expand(s.stem(x))
        return s.dw(e), e
    return Fn(forward, stem=nn.Conv2d(8, 16, 1), expand=nn.Conv2d(16, 32, 1), dw=nn.Conv2d(32, 32, 3, padding=1,
                                                                                              groups=32))


@pytest.mark.parametrize("model, reason, kwargs", [
    (Fn(lambda s, x: s.dw(s.conv(s.stem(x))), stem=nn.Conv2d(8, 16, 1), conv=nn.Conv2d(16, 32, 3, padding=1),
        dw=nn.Conv2d(32, 32, 3, padding=1, groups=32)), "no_expand", {}),
    (_shared_expand(), "shared", {}),
    (Fn(lambda s, x: s.dw(s.expand(s.stem(x)) + s.stem(x)), stem=nn.Conv2d(8, 16, 1), expand=nn.Conv2d(16, 16, 1),
        dw=nn.Conv2d(16, 16, 3, padding=1, groups=16)), "residual", {}),
    (Fn(lambda s, x: s.project(s.dw(s.expand(x))), expand=nn.Conv2d(8, 32, 1),
        dw=nn.Conv2d(32, 32, 3, padding=1, groups=32), project=nn.Conv2d(32, 8, 1)), "layout", {}),
    (InvertedResidual(dilation=2), "dilation", {}),
    (InvertedResidual(), "small_map", {"p": FuseExpandDepthwise()}),
    (InvertedResidual(), "target", {"target": "cuda"}),
], ids=["no_expand", "shared", "residual", "layout", "dilation", "small_map", "target"])
def test_refusals(model, reason, kwargs):
    graph, stats = fused(model, torch.randn(1, 8, 12, 12), **kwargs)
    assert stats.get("fused", 0) == 0 and stats[f"skipped.{reason}"] == 1
    assert not graph.op_nodes("conv2d_expand_dw")


def test_bfloat16_convs_are_refused():
    """mixed-precision after alter-layout: the blocked convs are bf16 (the interpreter, not PyTorch's fp32, is
    their reference), and the fused kernel is float32 only."""
    graph = prepared(InvertedResidual(), torch.randn(1, 8, 12, 12), BEFORE + ",mixed-precision")
    stats = run_pass(ANY_SIZE, graph).stats
    assert stats.get("fused", 0) == 0 and stats["skipped.dtype"] == 1


def test_explain_lists_each_block_and_why(tmp_path, capsys):
    """``explain fuse-expand-depthwise MODEL`` runs optimize()'s pipeline up to the pass (alter-layout included)."""
    from passes.cli import main

    path = tmp_path / "block.onnx"
    torch.onnx.export(InvertedResidual().eval(), torch.randn(1, 8, 28, 28), str(path), dynamo=False)
    assert main(["explain", "fuse-expand-depthwise", str(path)]) == 0
    out = capsys.readouterr().out
    assert "fuse-expand-depthwise: 1 candidate(s) after" in out and "alter-layout" in out
    assert "REWRITTEN" in out and "fused: with" in out
