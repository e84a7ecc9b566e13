"""ONNX frontend and exporter: imported graphs match ONNX Runtime; exported graphs run in ONNX Runtime."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from backends.onnx import ExportError, to_onnx
from examples import zoo
from frontend.onnx import from_onnx
from frontend.torch_fx import from_torch
from passes.core.pass_base import PassContext
from passes.core.pipeline import Pipeline, resolve
from passes.ir.graph import flatten_structure
from passes.ir.interpret import run_reference
from tests.cases import CASES
from tests.helpers import assert_outputs_close

RNG = np.random.default_rng(0)


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def export_torch(model, xs, opset: int, path) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, xs, str(path), dynamo=False, opset_version=opset,
                          input_names=[f"in{i}" for i in range(len(xs))])
    return onnx.load(str(path))


@pytest.mark.parametrize("opset", [9, 11, 17])
@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_through_onnx_matches_onnx_runtime(name, opset, tmp_path):
    model, xs = zoo.make(name)
    if opset == 9 and name in ("squeezenet", "audio1d"):
        pytest.skip("torch's opset-9 exporter refuses ceil_mode pooling / padding='same'")
    proto = export_torch(model, xs, opset, tmp_path / "m.onnx")
    graph = from_onnx(tmp_path / "m.onnx")
    feeds = {f"in{i}": x.numpy() for i, x in enumerate(xs)}
    assert_outputs_close(ort_run(proto, feeds), flatten_structure(run_reference(graph, xs)))


@pytest.mark.parametrize("name", ["resnet", "bilstm", "gru_seq2seq", "efficientnet"])
def test_import_optimize_export_round_trip(name, tmp_path):
    model, xs = zoo.make(name)
    proto = export_torch(model, xs, 17, tmp_path / "m.onnx")
    graph = from_onnx(tmp_path / "m.onnx")
    Pipeline(resolve("default")).run(graph, PassContext())
    exported = to_onnx(graph)
    feeds = {f"in{i}": x.numpy() for i, x in enumerate(xs)}
    assert_outputs_close(ort_run(proto, feeds), ort_run(exported, feeds))


EXPORT_REFUSALS = {"conv2d_circular": "circular", "adaptive_avg_pool2d_uneven": "uneven windows"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_construct_exports_and_runs_in_onnx_runtime(case):
    model = case.make().eval()
    xs = case.example_inputs()
    graph = from_torch(model, xs)
    if case.name in EXPORT_REFUSALS:
        with pytest.raises(ExportError, match=EXPORT_REFUSALS[case.name]):
            to_onnx(graph)
        return
    out = ort_run(to_onnx(graph), {n: x.numpy() for n, x in zip(graph.inputs, xs)})
    with torch.no_grad():
        assert_outputs_close(model(*xs), out)


def one_node(op: str, inputs: dict[str, np.ndarray], initializers: dict[str, np.ndarray], outputs: int = 1,
             opset: int = 17, **attrs) -> onnx.ModelProto:
    order = list(initializers) + list(inputs) if op == "Gather" else list(inputs) + list(initializers)
    node = helper.make_node(op, order, [f"y{i}" for i in range(outputs)], name="n", **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                      for k, v in inputs.items()],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(outputs)],
        [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


HANDWRITTEN = [
    ("Gemm", {"a": f32(3, 4)}, {"b": f32(5, 4), "c": f32(5)}, 1, 17, {"transB": 1, "alpha": 0.5, "beta": 2.0}),
    ("Gemm", {"a": f32(4, 3)}, {"b": f32(4, 5), "c": f32(1, 5)}, 1, 11, {"transA": 1}),
    ("HardSigmoid", {"x": f32(2, 6)}, {}, 1, 17, {}),
    ("Softmax", {"x": f32(2, 3, 4)}, {}, 1, 11, {"axis": 1}),
    ("LogSoftmax", {"x": f32(2, 3, 4)}, {}, 1, 13, {"axis": 1}),
    ("Clip", {"x": f32(3, 4)}, {}, 1, 9, {"min": -0.5, "max": 0.3}),
    ("Clip", {"x": f32(3, 4)}, {"lo": np.float32(-0.2), "hi": np.float32(0.4)}, 1, 13, {}),
    ("Sum", {"a": f32(2, 3), "b": f32(2, 3), "c": f32(1, 3)}, {}, 1, 13, {}),
    ("Mean", {"a": f32(2, 3), "b": f32(2, 3)}, {}, 1, 13, {}),
    ("Max", {"a": f32(2, 3), "b": f32(2, 3), "c": f32(2, 3)}, {}, 1, 13, {}),
    ("Min", {"a": f32(2, 3), "b": f32(3)}, {}, 1, 13, {}),
    ("ReduceMean", {"x": f32(2, 3, 4)}, {}, 1, 13, {"axes": [1, 2], "keepdims": 0}),
    ("ReduceSum", {"x": f32(2, 3, 4)}, {"axes": np.array([-1], np.int64)}, 1, 13, {}),
    ("LRN", {"x": f32(1, 6, 4, 4)}, {}, 1, 13, {"size": 3, "alpha": 0.01, "beta": 0.75, "bias": 2.0}),
    ("Split", {"x": f32(2, 6)}, {"s": np.array([2, 4], np.int64)}, 2, 13, {"axis": 1}),
    ("Split", {"x": f32(2, 6)}, {}, 3, 11, {"axis": 1}),
    ("Slice", {"x": f32(4, 10)}, {"st": np.array([1, -8], np.int64), "en": np.array([3, 100], np.int64),
                                  "ax": np.array([0, 1], np.int64), "sp": np.array([1, 3], np.int64)}, 1, 13, {}),
    ("Squeeze", {"x": f32(2, 1, 3, 1)}, {"axes": np.array([1], np.int64)}, 1, 13, {}),
    ("Unsqueeze", {"x": f32(2, 3)}, {}, 1, 11, {"axes": [0, 3]}),
    ("Pad", {"x": f32(1, 2, 4, 4)}, {"p": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)}, 1, 13, {"mode": "reflect"}),
    ("Pad", {"x": f32(1, 2, 4, 4)}, {"p": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "v": np.float32(0.5)},
     1, 13, {}),
    ("MaxPool", {"x": f32(1, 2, 7, 7)}, {}, 1, 13, {"kernel_shape": [3, 3], "strides": [2, 2],
                                                    "auto_pad": "SAME_UPPER"}),
    ("AveragePool", {"x": f32(1, 2, 7, 7)}, {}, 1, 13, {"kernel_shape": [2, 2], "pads": [0, 0, 1, 1],
                                                        "count_include_pad": 1}),
    ("Conv", {"x": f32(1, 3, 8, 8)}, {"w": f32(4, 3, 3, 3)}, 1, 13, {"pads": [0, 1, 1, 0]}),
    ("Conv", {"x": f32(1, 3, 9, 9)}, {"w": f32(4, 3, 2, 2), "b": f32(4)}, 1, 13, {"auto_pad": "SAME_LOWER",
                                                                                 "strides": [2, 2]}),
    ("ConvTranspose", {"x": f32(1, 3, 4, 4)}, {"w": f32(3, 2, 3, 3)}, 1, 13, {"strides": [2, 2], "pads": [1, 1, 1, 1],
                                                                            "output_padding": [1, 1]}),
    ("GlobalMaxPool", {"x": f32(1, 3, 5, 5)}, {}, 1, 13, {}),
    ("Flatten", {"x": f32(2, 3, 4)}, {}, 1, 13, {"axis": 2}),
    ("Gather", {"i": np.array([[1, 0, 3]], np.int64)}, {"table": f32(5, 4)}, 1, 13, {}),
    ("Transpose", {"x": f32(2, 3, 4)}, {}, 1, 13, {"perm": [2, 0, 1]}),
    ("Dropout", {"x": f32(2, 3)}, {}, 1, 13, {}),
    ("Identity", {"x": f32(2, 3)}, {}, 1, 13, {}),
]


@pytest.mark.parametrize("op, inputs, inits, outputs, opset, attrs", HANDWRITTEN,
                         ids=[f"{h[0]}-{i}" for i, h in enumerate(HANDWRITTEN)])
def test_handwritten_ops_match_onnx_runtime(op, inputs, inits, outputs, opset, attrs):
    model = one_node(op, inputs, inits, outputs, opset, **attrs)
    graph = from_onnx(model)
    xs = [torch.from_numpy(v) for v in inputs.values()]
    assert_outputs_close(ort_run(model, inputs), flatten_structure(run_reference(graph, xs)))


def _rnn_model(kind: str, direction: str, layout: int = 0, states: bool = True, opset: int = 14):
    hidden, gates = 5, {"LSTM": 4, "GRU": 3, "RNN": 1}[kind]
    dirs = 2 if direction == "bidirectional" else 1
    steps, batch, features = 6, 2, 3
    x_shape = (steps, batch, features) if layout == 0 else (batch, steps, features)
    inputs = {"x": f32(*x_shape)}
    inits = {"W": f32(dirs, gates * hidden, features) * 0.5, "R": f32(dirs, gates * hidden, hidden) * 0.5,
             "B": f32(dirs, 2 * gates * hidden) * 0.5}
    names = ["x", "W", "R", "B", ""]
    state_shape = (dirs, batch, hidden) if layout == 0 else (batch, dirs, hidden)
    if states:
        inputs["h0"] = f32(*state_shape)
        names.append("h0")
        if kind == "LSTM":
            inputs["c0"] = f32(*state_shape)
            names.append("c0")
    attrs = {"hidden_size": hidden, "direction": direction}
    if opset >= 14:
        attrs["layout"] = layout
    if kind == "GRU":
        attrs["linear_before_reset"] = 1
    outs = ["y", "yh"] + (["yc"] if kind == "LSTM" else [])
    node = helper.make_node(kind, names, outs, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape)
                                             for k, v in inputs.items()],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), inputs


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction, states", [("forward", False), ("bidirectional", True)])
def test_onnx_rnns_match_onnx_runtime(kind, direction, states):
    model, inputs = _rnn_model(kind, direction, 0, states)
    graph = from_onnx(model)
    xs = [torch.from_numpy(v) for v in inputs.values()]
    assert_outputs_close(ort_run(model, inputs), flatten_structure(run_reference(graph, xs)))


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_batch_major_layout_equals_time_major(kind):
    """layout=1 (ONNX Runtime refuses it): same weights as layout=0 with transposed inputs and outputs."""
    global RNG
    RNG = np.random.default_rng(5)
    time_major, inputs0 = _rnn_model(kind, "bidirectional", 0, True)
    RNG = np.random.default_rng(5)
    batch_major, inputs1 = _rnn_model(kind, "bidirectional", 1, True)
    inputs1 = {k: np.ascontiguousarray(np.swapaxes(v, 0, 1)) for k, v in inputs0.items()}
    expected = ort_run(time_major, inputs0)
    expected = [np.transpose(expected[0], (2, 0, 1, 3))] + [np.swapaxes(e, 0, 1) for e in expected[1:]]
    graph = from_onnx(batch_major)
    assert_outputs_close(expected, flatten_structure(run_reference(graph, [torch.from_numpy(v)
                                                                           for v in inputs1.values()])))


def _u8(*shape):
    return RNG.integers(0, 255, shape).astype(np.uint8)


QUANTIZED = [
    ("QuantizeLinear", {"x": f32(2, 8) * 3}, {"s": np.float32(0.05), "z": np.uint8(128)}, {}),
    ("QuantizeLinear", {"x": f32(1, 4, 3) * 3}, {"s": np.array([0.1, 0.02, 0.05, 0.2], np.float32),
                                                "z": np.array([0, -3, 5, 1], np.int8)}, {"axis": 1}),
    ("DequantizeLinear", {"q": _u8(2, 8)}, {"s": np.float32(0.05), "z": np.uint8(120)}, {}),
    ("QLinearConv", {"x": _u8(1, 3, 8, 8)}, {"xs": np.float32(0.02), "xz": np.uint8(128),
                                            "w": RNG.integers(-20, 20, (4, 3, 3, 3)).astype(np.int8),
                                            "ws": np.array([0.01, 0.02, 0.015, 0.03], np.float32),
                                            "wz": np.zeros(4, np.int8), "ys": np.float32(0.05), "yz": np.uint8(100),
                                            "b": RNG.integers(-500, 500, 4).astype(np.int32)}, {"pads": [1, 1, 1, 1]}),
    ("QLinearMatMul", {"a": _u8(16, 64)}, {"as": np.float32(0.02), "az": np.uint8(128),
                                          "b": RNG.integers(0, 255, (64, 32)).astype(np.uint8), "bs": np.float32(0.01),
                                         "bz": np.uint8(127), "ys": np.float32(0.1), "yz": np.uint8(128)}, {}),
]


@pytest.mark.parametrize("op, inputs, inits, attrs", QUANTIZED, ids=[f"{q[0]}-{i}" for i, q in enumerate(QUANTIZED)])
def test_quantized_forms_match_onnx_runtime(op, inputs, inits, attrs):
    """Integer outputs agree exactly, or by one quantization step where float rounding meets a .5 boundary."""
    model = one_node(op, inputs, inits, 1, 13, **attrs)
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT if op == "DequantizeLinear" else (
        TensorProto.INT8 if inits.get("z", inits.get("yz", np.uint8(0))).dtype == np.int8 else TensorProto.UINT8)
    graph = from_onnx(model)
    xs = [torch.from_numpy(v) for v in inputs.values()]
    (expected,) = ort_run(model, inputs)
    (actual,) = flatten_structure(run_reference(graph, xs))
    actual = actual.numpy()
    assert actual.dtype == expected.dtype
    if expected.dtype == np.float32:
        np.testing.assert_allclose(actual, expected, rtol=1e-6)
    else:
        steps = np.abs(actual.astype(np.int32) - expected.astype(np.int32))
        assert steps.max() <= 1 and (steps > 0).mean() < 0.02, (steps.max(), (steps > 0).mean())


@pytest.mark.tvm
@pytest.mark.parametrize("op, inputs, inits, attrs", [
    ("ConvInteger", {"x": _u8(1, 3, 9, 9)}, {"w": RNG.integers(0, 255, (4, 3, 3, 3)).astype(np.uint8),
                                           "xz": np.uint8(128), "wz": np.uint8(127)}, {"pads": [1, 1, 1, 1]}),
    ("MatMulInteger", {"a": _u8(8, 300)}, {"b": RNG.integers(0, 255, (300, 16)).astype(np.uint8),
                                          "az": np.uint8(120), "bz": np.uint8(130)}, {}),
], ids=["ConvInteger", "MatMulInteger"])
def test_integer_ops_are_exact_in_interpreter_and_tvm(op, inputs, inits, attrs):
    from backends.tvm import build

    model = one_node(op, inputs, inits, 1, 13, **attrs)
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.INT32
    (expected,) = ort_run(model, inputs)
    graph = from_onnx(model)
    xs = [torch.from_numpy(v) for v in inputs.values()]
    (interpreted,) = flatten_structure(run_reference(graph, xs))
    np.testing.assert_array_equal(interpreted.numpy(), expected)
    np.testing.assert_array_equal(build(graph, "llvm")(*inputs.values()), expected)
