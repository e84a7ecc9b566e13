"""ONNX handlers of the real-model issue (Dropout masks, AveragePool/MaxPool pads, Resize, LayerNormalization,
GroupNormalization): numerics against ONNX Runtime on seeded inputs, the imported structure, and one test per
refusal reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from frontend.errors import UnsupportedModelError
from frontend.onnx import from_onnx
from passes.core.stats import op_histogram
from passes.ir.graph import flatten_structure
from passes.ir.interpret import run_reference
from tests.helpers import assert_outputs_close

ort.set_default_logger_severity(3)  # ONNX Runtime's own shape warnings are not test output


def f32(rng: np.random.Generator, *shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def model_of(op: str, inputs: dict[str, np.ndarray], initializers: dict[str, np.ndarray] | None = None,
             outputs: dict[str, int] | None = None, opset: int = 17, slots: list[str] | None = None,
             **attrs) -> onnx.ModelProto:
    """One ``op`` node named 'n' reading ``slots`` (default: inputs then initializers; '' = absent)."""
    initializers = initializers or {}
    outputs = outputs or {"y": TensorProto.FLOAT}
    slots = slots if slots is not None else list(inputs) + list(initializers)
    node = helper.make_node(op, slots, list(outputs), name="n", **attrs)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for k, v in inputs.items()],
        [helper.make_tensor_value_info(k, t, None) for k, t in outputs.items()],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def assert_matches_onnx_runtime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]):
    """Import, run the reference interpreter, compare with ONNX Runtime (rtol 1e-4, atol 1e-5 x output scale)."""
    graph = from_onnx(model)
    actual = flatten_structure(run_reference(graph, [torch.from_numpy(v) for v in feeds.values()]))
    expected = ort_run(model, feeds)
    for e, a in zip(expected, actual):
        assert a.dtype == torch.from_numpy(e).dtype, (a.dtype, e.dtype)
    assert_outputs_close(expected, actual)
    return graph


def refusal(model: onnx.ModelProto) -> str:
    with pytest.raises(UnsupportedModelError) as info:
        from_onnx(model)
    return str(info.value)


# ------------------------------------------------------------------------------------------------ Dropout
@pytest.mark.parametrize("opset", [9, 12, 13])
def test_dropout_with_an_unused_mask_is_the_identity(opset):
    x = f32(np.random.default_rng(1), 2, 5)
    model = model_of("Dropout", {"x": x}, opset=opset, ratio=0.3) if opset < 12 else model_of("Dropout", {"x": x},
                                                                                             opset=opset)
    model.graph.node[0].output.append("mask")  # declared, read by nobody (AlexNet, SqueezeNet, VGG-19)
    graph = assert_matches_onnx_runtime(model, {"x": x})
    assert op_histogram(graph) == {"dropout": 1}


def test_dropout_mask_used_in_inference_is_all_ones():
    x = f32(np.random.default_rng(2), 3, 4)
    model = model_of("Dropout", {"x": x}, outputs={"y": TensorProto.FLOAT, "mask": TensorProto.BOOL}, opset=13)
    graph = assert_matches_onnx_runtime(model, {"x": x})
    (_, mask) = run_reference(graph, [torch.from_numpy(x)])
    assert mask.dtype == torch.bool and bool(mask.all())


def test_dropout_mask_before_opset_10_has_the_input_dtype():
    """Dropout-7..9 declares the mask as T (the input's type). ONNX Runtime returns zeros there (its old kernel
    never writes the mask, and opset 10..11 likewise); the spec and ONNX's reference evaluator say ones."""
    x = f32(np.random.default_rng(2), 3, 4)
    model = model_of("Dropout", {"x": x}, outputs={"y": TensorProto.FLOAT, "mask": TensorProto.FLOAT}, opset=9)
    (_, mask) = run_reference(from_onnx(model), [torch.from_numpy(x)])
    assert mask.dtype == torch.float32 and bool((mask == 1).all())


def test_dropout_with_constant_training_mode_false_imports():
    x = f32(np.random.default_rng(3), 2, 3)
    model = model_of("Dropout", {"x": x}, {"ratio": np.float32(0.2), "training": np.array(False)}, opset=13)
    assert op_histogram(assert_matches_onnx_runtime(model, {"x": x})) == {"dropout": 1}


def test_dropout_in_training_mode_is_refused():
    x = f32(np.random.default_rng(3), 2, 3)
    model = model_of("Dropout", {"x": x}, {"ratio": np.float32(0.2), "training": np.array(True)}, opset=13)
    assert "Dropout: training_mode=true (random dropout); export the model in eval mode (node 'n')" in refusal(model)


def test_dropout_with_training_mode_computed_at_run_time_is_refused():
    x = f32(np.random.default_rng(3), 2, 3)
    model = model_of("Dropout", {"x": x, "training": np.array(False)}, {"ratio": np.float32(0.2)}, opset=13,
                     slots=["x", "ratio", "training"])
    assert "Dropout training_mode must be a constant" in refusal(model)


# ------------------------------------------------------------------------------------------------ pools
POOLS = [  # (op, spatial, kernel, stride, pads (begin..., end...), ceil_mode, count_include_pad)
    ("AveragePool", (7, 7), (3, 3), (1, 1), (0, 0, 1, 1), 0, 0),   # Inception v1's asymmetric pads
    ("AveragePool", (7, 7), (3, 3), (1, 1), (0, 0, 1, 1), 0, 1),
    ("AveragePool", (8, 9), (3, 2), (2, 2), (1, 0, 0, 1), 1, 0),   # ceil mode with a window starting in the pad
    ("AveragePool", (8, 9), (3, 2), (2, 2), (1, 0, 0, 1), 1, 1),
    ("AveragePool", (8, 8), (3, 3), (2, 2), (2, 2, 2, 2), 1, 0),   # symmetric, over half a kernel
    ("AveragePool", (7, 8), (3, 3), (3, 3), (1, 1, 1, 1), 1, 0),   # torch-native: symmetric, at most half a kernel
    ("AveragePool", (9,), (4,), (2,), (0, 3), 0, 0),                # 1-d
    ("MaxPool", (8, 9), (3, 3), (2, 2), (0, 2, 2, 0), 1, 0),
    ("MaxPool", (7, 7), (2, 2), (2, 2), (1, 1, 1, 1), 1, 0),
]


@pytest.mark.parametrize("op, spatial, kernel, stride, pads, ceil_mode, include_pad", POOLS,
                         ids=[f"{p[0]}-{i}" for i, p in enumerate(POOLS)])
def test_pool_pads_match_onnx_runtime(op, spatial, kernel, stride, pads, ceil_mode, include_pad):
    x = f32(np.random.default_rng(4), 1, 3, *spatial)
    attrs = {"kernel_shape": list(kernel), "strides": list(stride), "pads": list(pads), "ceil_mode": ceil_mode}
    if op == "AveragePool":
        attrs["count_include_pad"] = include_pad
    assert_matches_onnx_runtime(model_of(op, {"x": x}, opset=19, **attrs), {"x": x})


def test_symmetric_pool_pads_stay_in_the_pool():
    x = f32(np.random.default_rng(5), 1, 2, 6, 6)
    model = model_of("AveragePool", {"x": x}, kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0)
    graph = from_onnx(model)
    assert op_histogram(graph) == {"avg_pool2d": 1}
    (node,) = (d for _, d in graph.nodes(data=True) if d["op"] == "avg_pool2d")
    assert node["attrs"]["padding"] == (1, 1) and node["attrs"]["count_include_pad"] is False


def test_asymmetric_average_pool_without_pad_counting_divides_by_real_elements():
    """pad -> pool that counts the zeros -> times D/count: the corner window of a 3x3 pool padded by one at the
    end sees 4 real elements, so its factor is 9/4."""
    x = f32(np.random.default_rng(6), 1, 2, 6, 6)
    graph = from_onnx(model_of("AveragePool", {"x": x}, kernel_shape=[3, 3], pads=[0, 0, 1, 1],
                               count_include_pad=0))
    assert op_histogram(graph) == {"pad": 1, "avg_pool2d": 1, "constant": 1, "mul": 1}
    (factor,) = (d["params"]["value"] for _, d in graph.nodes(data=True) if d["op"] == "constant")
    assert factor.shape == (1, 1, 5, 5)
    np.testing.assert_allclose(factor[0, 0, -1, -1], 9 / 4, rtol=1e-6)
    np.testing.assert_allclose(factor[0, 0, 0, 0], 1.0, rtol=1e-6)


def test_dilated_average_pool_is_refused():
    x = f32(np.random.default_rng(7), 1, 2, 9, 9)
    model = model_of("AveragePool", {"x": x}, opset=19, kernel_shape=[3, 3], dilations=[2, 2])
    assert "AveragePool: dilated average pooling (node 'n')" in refusal(model)


def test_average_pool_window_of_only_padding_is_refused():
    x = f32(np.random.default_rng(7), 1, 2, 5, 5)
    model = model_of("AveragePool", {"x": x}, kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 3, 3])
    assert "a window holds only padding (node 'n')" in refusal(model)


def test_max_pool_indices_output_is_refused():
    x = f32(np.random.default_rng(7), 1, 2, 5, 5)
    model = model_of("MaxPool", {"x": x}, outputs={"y": TensorProto.FLOAT, "i": TensorProto.INT64},
                     kernel_shape=[2, 2])
    assert "MaxPool: the Indices output (node 'n')" in refusal(model)
