"""The onnx package's nine "light" model-zoo graphs (AlexNet, DenseNet-121, Inception v1/v2, ResNet-50, ShuffleNet,
SqueezeNet, VGG-19, ZFNet-512) import and match ONNX Runtime; a cheap one compiles through the CLI.

The files ship without weights: every large tensor is ``ConstantOfShape(value=0.02)`` of its shape, which makes
every logit equal (the bundled expected output is a uniform 0.001). So each weight, whether such a node or a small
initializer, gets seeded random values suited to its role: He-scaled (uniform) conv/Gemm weights, batch-norm scales
and variances in [0.5, 1.5], small biases and means. The logits (the Softmax's input) are exposed as a second output
and compared too: on the residual nets they are large enough that the softmax itself is nearly one-hot.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from frontend.onnx import from_onnx
from passes.ir.interpret import run_reference
from tests.helpers import assert_outputs_close

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
NAMES = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet",
         "vgg19", "zfnet512"]


def _role(graph: onnx.GraphProto, name: str) -> str:
    """What the tensor ``name`` is to its first reader (through Reshape/Unsqueeze): conv/gemm weight, scale, bias."""
    for node in graph.node:
        if name not in node.input:
            continue
        slot = list(node.input).index(name)
        if node.op_type in ("Reshape", "Unsqueeze") and slot == 0:
            return _role(graph, node.output[0])
        if node.op_type == "Conv":
            return "conv" if slot == 1 else "bias"
        if node.op_type == "Gemm" and slot == 1:
            trans_b = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
            return "gemm_t" if trans_b else "gemm"
        if node.op_type == "BatchNormalization":
            return "scale" if slot in (1, 4) else "bias"  # scale and variance / bias and mean
        return "scale" if node.op_type == "Mul" else "bias"
    return "bias"


def _values(rng: np.random.Generator, shape: tuple[int, ...], role: str) -> np.ndarray:
    if role in ("conv", "gemm", "gemm_t"):
        fan_in = {"conv": int(np.prod(shape[1:])), "gemm": shape[0], "gemm_t": shape[-1]}[role]
        bound = np.float32(np.sqrt(6.0 / fan_in))  # He-uniform: variance 2 / fan_in
    elif role == "scale":
        return rng.random(shape, np.float32) + np.float32(0.5)
    else:
        bound = np.float32(0.2)
    values = rng.random(shape, np.float32)  # uniform draws: several times faster than normal ones at 100 M values
    values *= 2 * bound
    values -= bound
    return values


def with_seeded_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """The model with every float weight (``ConstantOfShape`` of a constant shape, or a float initializer that a
    node reads) replaced by a seeded random initializer, and the Softmax's input added as an output ``logits``."""
    rng = np.random.default_rng(seed)
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    nodes, initializers, dropped = [], [], set()
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in constants:
            shape = tuple(int(d) for d in numpy_helper.to_array(constants[node.input[0]]))
            initializers.append(numpy_helper.from_array(_values(rng, shape, _role(graph, node.output[0])),
                                                        node.output[0]))
            dropped.add(node.input[0])
        else:
            nodes.append(node)
    read = {name for node in graph.node for name in node.input}
    for t in graph.initializer:
        if t.name in dropped:
            continue
        if t.data_type == TensorProto.FLOAT and t.name in read:
            t = numpy_helper.from_array(_values(rng, tuple(t.dims), _role(graph, t.name)), t.name)
        initializers.append(t)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inputs = [i for i in graph.input if i.name not in dropped]
    for field, values in ((out.graph.node, nodes), (out.graph.initializer, initializers), (out.graph.input, inputs)):
        del field[:]
        field.extend(values)
    softmax = [n for n in nodes if n.op_type == "Softmax"]
    if softmax:
        out.graph.output.append(helper.make_tensor_value_info(softmax[0].input[0], TensorProto.FLOAT, None))
    return out


def light_model(name: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    model = with_seeded_weights(onnx.load(str(LIGHT / f"light_{name}.onnx")))
    weights = {t.name for t in model.graph.initializer}
    (data,) = [i for i in model.graph.input if i.name not in weights]
    shape = tuple(d.dim_value for d in data.type.tensor_type.shape.dim)
    return model, {data.name: np.random.default_rng(1).standard_normal(shape).astype(np.float32)}


def test_all_nine_light_models_are_tested():
    assert sorted(p.name.removeprefix("light_").removesuffix(".onnx") for p in LIGHT.glob("light_*.onnx")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_light_model_matches_onnx_runtime_in_the_interpreter(name):
    start = time.perf_counter()
    model, feeds = light_model(name)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    graph = from_onnx(model, name=name)
    actual = run_reference(graph, [torch.from_numpy(x) for x in feeds.values()])
    assert_outputs_close(expected, actual)
    print(f"{name}: {time.perf_counter() - start:.1f} s")


@pytest.mark.tvm
def test_light_squeezenet_compiles_through_the_cli_and_matches_onnx_runtime(tmp_path, capsys):
    """SqueezeNet (1.2 M weights, 0.35 GFLOP): the cheapest of the nine to compile; ``benchmarks`` has all nine."""
    import json

    import passes
    from passes.cli import main

    model, feeds = light_model("squeezenet")
    onnx.save(model, str(tmp_path / "squeezenet.onnx"))
    assert main(["compile", str(tmp_path / "squeezenet.onnx"), "--json", "-o", str(tmp_path / "art")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"]["reference"] == "onnxruntime" and report["accuracy"]["max_rel_error"] < 1e-4
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert_outputs_close(expected, passes.load(tmp_path / "art")(*feeds.values()))
