"""The ONNX leg of the torchvision coverage test: one classification CNN per torchvision family, exported with
``torch.onnx.export`` at opset 17 and imported by our ONNX frontend, agrees with PyTorch eager and with the same
model imported through the PyTorch frontend (reference interpreter both ways; random seeded weights, small inputs,
no downloads)."""

from __future__ import annotations

import io
import warnings

import onnx
import pytest
import torch

from frontend.onnx import from_onnx
from frontend.torch_fx import from_torch
from passes.ir.interpret import run_reference
from tests.helpers import assert_outputs_close

torchvision = pytest.importorskip("torchvision")

# one per family, at the smallest input its architecture accepts cheaply (AlexNet's adaptive pool exports only
# when 6x6 divides its input: 224); VGG is left to the torch-side test (its 224x224 export costs ~7 GFLOP and
# 130 M weights per run)
FAMILIES = {"resnet18": 64, "resnext50_32x4d": 64, "densenet121": 64, "squeezenet1_1": 64, "mobilenet_v2": 64,
            "mobilenet_v3_small": 64, "mnasnet0_5": 64, "shufflenet_v2_x0_5": 64, "efficientnet_b0": 64,
            "efficientnet_v2_s": 64, "regnet_x_400mf": 64, "regnet_y_400mf": 64, "convnext_tiny": 64,
            "googlenet": 64, "inception_v3": 96, "alexnet": 224}



def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, **extra).eval()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_onnx_path_agrees_with_pytorch_and_the_torch_path(name):
    model = build(name)
    x = torch.randn(1, 3, FAMILIES[name], FAMILIES[name], generator=torch.Generator().manual_seed(1))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17, input_names=["x"])
    via_onnx = run_reference(from_onnx(onnx.load_from_string(buffer.getvalue()), name=name), [x])
    with torch.no_grad():
        assert_outputs_close(model(x), via_onnx)
    assert_outputs_close(run_reference(from_torch(model, (x,)), [x]), via_onnx)
