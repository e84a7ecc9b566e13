"""alter-layout through TVM: the blocked conv kernel reading and writing NCHW8c, layout transforms as Relax, and
real torchvision blocks compiled against PyTorch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from torch import nn

from backends.tvm import build
from backends.tvm.kernels import ConvSpec, compacted_buffers, conv_kernel
from backends.tvm.lower import lower
from frontend.torch_fx import from_torch
from passes.core.pass_base import PassContext
from passes.core.pipeline import Pipeline, resolve
from tests.cases import Fn
from tests.helpers import assert_outputs_close
from tests.passes.test_alter_layout import InvertedResidual, SqueezeExcite

pytestmark = pytest.mark.tvm


def compiled_matches_pytorch(model: nn.Module, x: torch.Tensor, passes: str = "default,alter-layout",
                             rtol: float = 1e-4, atol: float = 1e-5, lanes: int = 8):
    """Compile with the pipeline, compare with PyTorch (atol relative to the output scale); returns the graph.
    ``lanes``: alter-layout's (8: NCHW8c as on AVX2; 16: NCHW16c where 16 divides the channels, as on AVX-512)."""
    model = model.eval()
    graph = from_torch(model, (x,))
    Pipeline(resolve(passes)).run(graph, PassContext(lanes=lanes))
    with torch.no_grad():
        assert_outputs_close(model(x), build(graph, "llvm")(x), rtol=rtol, atol=atol)
    return graph


@pytest.mark.parametrize("model, shape", [
    (InvertedResidual(), (1, 3, 13, 11)),                 # stem packs NCHW, blocked chain, residual, NCHW store
    (SqueezeExcite(), (1, 8, 9, 11)),                     # 5x5 depthwise stride 2, SE with a 4-channel squeeze
    (Fn(lambda s, x: (lambda y: (s.b(y), nn.functional.max_pool2d(y, 2), y))(s.a(x)), a=nn.Conv2d(8, 16, 1),
        b=nn.Conv2d(16, 8, 1)), (1, 8, 6, 6)),          # layout_transform to NCHW for a pool and a graph output
    (Fn(lambda s, x: (lambda y: s.c(s.b(y)) + y)(s.a(x)), a=nn.Conv2d(8, 16, 1),
        b=nn.Conv2d(16, 16, 3, stride=1, padding=1, groups=16), c=nn.Conv2d(16, 16, 1)), (1, 8, 5, 7)),  # residual
    (Fn(lambda s, x: s.c(s.b(s.a(x))), a=nn.Conv2d(8, 16, 1), b=nn.Conv2d(16, 32, 3, padding=1, groups=16),
        c=nn.Conv2d(32, 8, 1)), (1, 8, 7, 7)),          # depthwise with a channel multiplier: stays NCHW
    (Fn(lambda s, x: s.b(s.a(x)), a=nn.Conv2d(8, 24, 3, stride=2, padding=1),
        b=nn.Conv2d(24, 16, 3, stride=2, padding=1)), (2, 8, 15, 9)),  # dense 3x3 stride 2 on blocked input, batch 2
], ids=["inverted_residual", "squeeze_excite", "transforms", "residual", "channel_multiplier", "strided_batch2"])
def test_compiled_blocked_models_match_pytorch(model, shape):
    torch.manual_seed(0)
    compiled_matches_pytorch(model, torch.randn(*shape))


@pytest.mark.parametrize("shape", [(2, 8, 7, 7), (1, 8, 14, 14), (1, 8, 1, 1), (1, 8, 5, 3)], ids=repr)
def test_flat_pixel_1x1_convs_on_blocked_tensors_match_pytorch(shape):
    """1x1 convs as GEMMs over the flattened pixels (``ConvSpec.flat_pixels``) reading and writing NCHW8c: 3, 2
    and 1 channel vectors, maps whose pixel count the tile does not divide (49 and 1: the spare pixels are
    computed and not stored), relu6, a residual, batch 2."""
    torch.manual_seed(0)
    model = Fn(lambda s, x: (lambda y: s.c(nn.functional.relu6(s.b(y) + y)))(nn.functional.relu6(s.a(x))),
               a=nn.Conv2d(8, 24, 1), b=nn.Conv2d(24, 24, 1), c=nn.Conv2d(24, 16, 1))
    graph = compiled_matches_pytorch(model, torch.randn(*shape), passes="default,alter-layout,fuse-conv-add")
    assert len(graph.op_nodes("conv2d_nchwc")) == 3


def test_no_layout_copy_between_blocked_convs():
    """The printed Relax of the inverted residual: conv kernels only (no transposes or pads between them), their
    arguments and results NCHW8c; one transpose, of the pooled 1x1 map."""
    graph = compiled_matches_pytorch(InvertedResidual(), torch.randn(1, 3, 12, 10))
    main = lower(graph)["main"].script()
    assert main.count("permute_dims") == 1 and "R.nn.pad" not in main
    assert main.count("R.Tensor((1, 2, 6, 5, 8)") >= 2 and main.count("R.Tensor((1, 4, 6, 5, 8)") >= 2


def test_depthwise_pads_per_task_not_the_whole_tensor():
    """NCHW8c input: the zero border is added per task (a channel block x the 10 rows its 8 output rows read),
    into a buffer TVM compacts to that region, instead of a padded copy of the whole input; a stride-2 task's 7
    rows of 28 read 15."""
    spec = ConvSpec(in_shape=(1, 144, 56, 56), weight_shape=(144, 1, 3, 3), stride=(1, 1), padding=(1, 1),
                    dilation=(1, 1), groups=144, has_bias=True, activation="relu6", lanes=8, in_block=8,
                    out_block=8)
    buffers = {name: shape for name, shape, _ in compacted_buffers(conv_kernel(spec, "llvm"))}
    assert buffers["pad"] == (1, 1, 10, 58, 8)
    strided = dataclasses.replace(spec, stride=(2, 2))
    assert {name: shape for name, shape, _ in compacted_buffers(conv_kernel(strided, "llvm"))}["pad"][2] == 15


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("name, blocks, size", [("mobilenet_v2", 5, 32), ("efficientnet_b0", 3, 32)])
def test_torchvision_blocks_compiled_match_pytorch(name, blocks, size, lanes):
    """The first blocks of the real models (stem, depthwise + 1x1 inverted residuals, SE), seeded weights, at
    rtol 1e-4 of the output scale; in AVX-512's blocks too (24-channel tensors NCHW8c between NCHW16c ones)."""
    torch.manual_seed(0)
    features = getattr(torchvision.models, name)().features[:blocks]
    graph = compiled_matches_pytorch(features, torch.randn(1, 3, size, size), atol=1e-4, lanes=lanes)
    layouts = {d["attrs"]["out_layout"] for _, d in graph.nodes(data=True) if d["op"] == "conv2d_nchwc"}
    assert layouts - {"NCHW"} == ({"NCHW8c"} if lanes == 8 else {"NCHW8c", "NCHW16c"})  # NCHW: the last conv


def test_the_optimized_onnx_export_is_logical_nchw(tmp_path):
    """The ONNX exporter writes conv2d_nchwc as Conv and drops the layout transforms: ONNX Runtime runs the
    exported file equal to PyTorch."""
    import onnxruntime as ort

    from backends.onnx import export_onnx

    torch.manual_seed(0)
    model = Fn(lambda s, x: (lambda y: (s.b(y), nn.functional.max_pool2d(y, 2)))(s.a(x)), a=nn.Conv2d(8, 16, 1),
               b=nn.Conv2d(16, 16, 3, padding=1, groups=16)).eval()
    x = torch.randn(1, 8, 6, 6)
    graph = compiled_matches_pytorch(model, x)
    assert graph.op_nodes("layout_transform") and graph.op_nodes("conv2d_nchwc")
    session = ort.InferenceSession(str(export_onnx(graph, tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert_outputs_close(model(x), tuple(session.run(None, {session.get_inputs()[0].name: x.numpy()})))
