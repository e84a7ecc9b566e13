"""ONNX files with dynamic (symbolic) input dims: ``input_shapes`` / ``--input-shape`` fix them (onnxsim's
``--overwrite-input-shape``); without them, or with a wrong name, rank or syntax, one clear error (exit 2)."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import passes
from frontend.errors import FrontendError
from frontend.onnx import from_onnx
from passes.cli import main
from passes.ir.interpret import run_reference
from tests.helpers import assert_outputs_close


class SmallCNN(nn.Module):
    """Conv, pool and a ``view(batch, -1)`` whose Shape/Gather/Concat arithmetic folds once the shape is fixed."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.pool(nn.functional.max_pool2d(torch.relu(self.conv(x)), 2))
        return self.fc(y.view(y.size(0), -1))


@pytest.fixture(scope="module")
def dynamic_onnx(tmp_path_factory):
    """SmallCNN exported with dynamic batch, height and width (input 'image', dims [batch, 3, height, width])."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dynamic") / "cnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(SmallCNN().eval(), (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}})
    return path


def ort_run(path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]


@pytest.mark.parametrize("shape", [(1, 3, 16, 16), (3, 3, 20, 12)])
def test_input_shapes_fix_dynamic_dims_and_match_onnx_runtime(dynamic_onnx, shape):
    graph = from_onnx(dynamic_onnx, input_shapes={"image": shape})
    assert [t.shape for t in graph.input_types()] == [shape]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    assert_outputs_close(ort_run(dynamic_onnx, x), run_reference(graph, [torch.from_numpy(x)]))


def test_dynamic_dims_without_input_shapes_name_the_input_and_the_option(dynamic_onnx):
    with pytest.raises(FrontendError) as info:
        from_onnx(dynamic_onnx)
    assert str(info.value) == (
        "input 'image' has dynamic dims [batch, 3, height, width] (dim 0 is 'batch', dim 2 is 'height', dim 3 is "
        "'width'); give it a static shape with optimize(path, input_shapes={'image': (1, 3, height, width)}) or "
        "`python -m passes.cli compile ... --input-shape image:1x3xheightxwidth`")


def test_input_shapes_naming_an_unknown_input_is_an_error(dynamic_onnx):
    with pytest.raises(FrontendError, match=r"input_shapes names 'img', but the model's inputs are \['image'\]"):
        from_onnx(dynamic_onnx, input_shapes={"img": (1, 3, 16, 16)})


def test_input_shapes_of_the_wrong_rank_is_an_error(dynamic_onnx):
    with pytest.raises(FrontendError, match=r"input 'image' has rank 4 \(dims \[batch, 3, height, width\]\), but "
                                            r"input_shapes gives 3 dims \[3, 16, 16\]"):
        from_onnx(dynamic_onnx, input_shapes={"image": (3, 16, 16)})


def test_input_shapes_with_a_non_positive_dim_is_an_error(dynamic_onnx):
    with pytest.raises(FrontendError, match=r"input_shapes\['image'\] = \(0, 3, 16, 16\): dims must be positive"):
        from_onnx(dynamic_onnx, input_shapes={"image": (0, 3, 16, 16)})


def test_input_shapes_for_a_pytorch_model_is_an_error():
    with pytest.raises(ValueError, match="input_shapes is for ONNX files"):
        passes.optimize(SmallCNN().eval(), passes=[], example_inputs=(torch.randn(1, 3, 8, 8),),
                        input_shapes={"x": (1, 3, 8, 8)})


@pytest.mark.tvm
def test_optimize_with_input_shapes_compiles_and_matches_onnx_runtime(dynamic_onnx):
    opt = passes.optimize(str(dynamic_onnx), input_shapes={"image": (2, 3, 16, 16)}, measure=False)
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert_outputs_close(ort_run(dynamic_onnx, x), opt(x))


@pytest.mark.tvm
def test_cli_compile_with_input_shape(dynamic_onnx, tmp_path, capsys):
    artifact = tmp_path / "art"
    assert main(["compile", str(dynamic_onnx), "--input-shape", "image:1x3x16x16", "--json", "-o", str(artifact)]) == 0
    report = __import__("json").loads(capsys.readouterr().out)
    assert report["accuracy"]["reference"] == "onnxruntime" and report["accuracy"]["max_rel_error"] < 1e-4
    x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert_outputs_close(ort_run(dynamic_onnx, x), passes.load(artifact)(x))


def test_cli_inspect_with_input_shape(dynamic_onnx, capsys):
    assert main(["inspect", str(dynamic_onnx), "--input-shape", "image:2x3x8x8", "--json"]) == 0
    info = __import__("json").loads(capsys.readouterr().out)
    assert info["inputs"] == {"image": "f32[2,3,8,8]"} and info["outputs"] == ["f32[2,5]"]


@pytest.mark.parametrize("extra, message", [
    ([], "input 'image' has dynamic dims [batch, 3, height, width]"),
    (["--input-shape", "img:1x3x16x16"], "input_shapes names 'img', but the model's inputs are ['image']"),
    (["--input-shape", "image:3x16x16"], "input 'image' has rank 4"),
    (["--input-shape", "image:1x3x16"], "input_shapes gives 3 dims [1, 3, 16]"),
    (["--input-shape", "image:1x3xHx16"], "--input-shape 'image:1x3xHx16': expected NAME:DIMS"),
    (["--input-shape", "1x3x16x16"], "--input-shape '1x3x16x16': expected NAME:DIMS"),
    (["--input-shape", "image:1x3x16x16", "--input-shape", "image:1x3x8x8"], "names input 'image' twice"),
], ids=["missing", "unknown-name", "wrong-rank", "short", "symbolic", "no-name", "twice"])
def test_cli_bad_input_shape_exits_2_with_one_line(dynamic_onnx, tmp_path, capsys, extra, message):
    assert main(["compile", str(dynamic_onnx), *extra, "-o", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "art").exists()


def test_cli_input_shape_for_a_zoo_model_exits_2(tmp_path, capsys):
    assert main(["compile", "zoo:vgg", "--input-shape", "x:1x3x8x8", "-o", str(tmp_path / "art")]) == 2
    assert "--input-shape is for ONNX files" in capsys.readouterr().err
