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

from frontend.errors import FrontendError, UnsupportedModelError
from frontend.onnx import from_onnx
from passes.ir.cost import op_histogram
from passes.ir.graph import flatten_structure
from passes.ir.interpret import run_reference
from passes.ir.ops import OPS
from tests.helpers import assert_outputs_close

ort.set_default_logger_severity(3)  # ONNX Runtime's own shape warnings are not test output

# the layer_norm / group_norm / interpolate ops come from the PyTorch-side branch of the same issue
needs_new_ops = pytest.mark.skipif(not {"layer_norm", "group_norm", "interpolate"} <= set(OPS),
                                   reason="the layer_norm/group_norm/interpolate ops are not in the op table yet")


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


# ------------------------------------------------------------------------------------------------ Resize / Upsample
def resize_model(x: np.ndarray, scales=None, sizes=None, opset: int = 13, **attrs) -> onnx.ModelProto:
    inits = {"roi": np.zeros(0, np.float32), "scales": np.asarray(scales if scales is not None else [], np.float32)}
    if sizes is not None:
        inits["sizes"] = np.asarray(sizes, np.int64)
    return model_of("Resize", {"x": x}, inits, opset=opset, **attrs)


RESIZES = [  # (input shape, scales, sizes, attrs): what exporters write (torch, TF converters, hand-made)
    ((1, 2, 5, 6), [1, 1, 2, 2], None, {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                         "nearest_mode": "floor"}),                      # torch nearest
    ((1, 2, 5, 6), [1, 1, 2, 3], None, {"mode": "nearest"}),                            # ONNX defaults
    ((1, 2, 8, 6), None, [1, 2, 4, 3], {"mode": "nearest", "coordinate_transformation_mode": "half_pixel",
                                        "nearest_mode": "round_prefer_ceil"}),           # nearest-exact, down
    ((1, 2, 5, 6), None, [1, 2, 10, 12], {"mode": "nearest", "coordinate_transformation_mode": "pytorch_half_pixel",
                                          "nearest_mode": "round_prefer_floor"}),
    ((1, 2, 5), [1, 1, 4], None, {"mode": "nearest", "coordinate_transformation_mode": "tf_half_pixel_for_nn",
                                  "nearest_mode": "floor"}),                             # 1-d
    ((1, 2, 5, 6), [1, 1, 2, 2], None, {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}),
    ((1, 2, 5, 6), [1, 1, 1.5, 2.5], None, {"mode": "linear"}),                         # half_pixel, odd scales
    ((1, 2, 5, 6), None, [1, 2, 9, 4], {"mode": "linear", "coordinate_transformation_mode": "align_corners"}),
    ((1, 2, 8, 8), None, [1, 2, 3, 5], {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}),
]


@needs_new_ops
@pytest.mark.parametrize("shape, scales, sizes, attrs", RESIZES, ids=[f"{r[3]['mode']}-{i}"
                                                                      for i, r in enumerate(RESIZES)])
def test_resize_matches_onnx_runtime(shape, scales, sizes, attrs):
    x = f32(np.random.default_rng(8), *shape)
    graph = assert_matches_onnx_runtime(resize_model(x, scales, sizes, **attrs), {"x": x})
    assert op_histogram(graph) == {"interpolate": 1}


@needs_new_ops
@pytest.mark.parametrize("opset, mode, scales", [(9, "nearest", [1, 1, 2, 3]), (10, "nearest", [1, 1, 2, 2]),
                                                 (10, "nearest", [1, 1, 0.5, 0.5])])
def test_upsample_and_resize_10_match_onnx_runtime(opset, mode, scales):
    x = f32(np.random.default_rng(9), 1, 2, 6, 4)
    op = "Upsample" if opset < 10 else "Resize"
    assert_matches_onnx_runtime(model_of(op, {"x": x}, {"scales": np.asarray(scales, np.float32)}, opset=opset,
                                         mode=mode), {"x": x})


@needs_new_ops
def test_resize_structure_keeps_the_scale_factor_of_a_scales_input():
    x = f32(np.random.default_rng(10), 1, 2, 5, 6)
    graph = from_onnx(resize_model(x, [1, 1, 1.5, 2.5], mode="linear"))
    (attrs,) = (d["attrs"] for _, d in graph.nodes(data=True) if d["op"] == "interpolate")
    assert attrs == {"size": (7, 15), "mode": "bilinear", "align_corners": False, "scale_factor": (1.5, 2.5)}


@needs_new_ops
def test_resize_with_sizes_maps_nearest_exact():
    x = f32(np.random.default_rng(10), 1, 2, 8, 6)
    graph = from_onnx(resize_model(x, None, [1, 2, 4, 3], mode="nearest", coordinate_transformation_mode="half_pixel",
                                   nearest_mode="round_prefer_ceil"))
    (attrs,) = (d["attrs"] for _, d in graph.nodes(data=True) if d["op"] == "interpolate")
    assert attrs == {"size": (4, 3), "mode": "nearest-exact", "align_corners": False, "scale_factor": None}


RESIZE_REFUSALS = [
    ({"mode": "cubic"}, [1, 1, 2, 2], "Resize: mode='cubic' (nearest and linear map onto interpolate) (node 'n')"),
    ({"mode": "linear", "coordinate_transformation_mode": "asymmetric"}, [1, 1, 2, 2],
     "coordinate_transformation_mode='asymmetric' with mode='linear'"),
    ({"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize"}, [1, 1, 2, 2],
     "coordinate_transformation_mode='tf_crop_and_resize' (node 'n')"),
    ({"mode": "nearest", "coordinate_transformation_mode": "align_corners", "nearest_mode": "floor"}, [1, 1, 2, 2],
     "coordinate_transformation_mode='align_corners' with nearest_mode='floor': on these sizes its index map "
     "matches neither torch's 'nearest' nor 'nearest-exact'"),
    ({"mode": "nearest"}, [1, 2, 2, 2], "resizing the batch or channel axis"),
    ({"mode": "linear", "antialias": 1}, [1, 1, 0.5, 0.5], "antialias=1 when downscaling"),
]


@needs_new_ops
@pytest.mark.parametrize("attrs, scales, message", RESIZE_REFUSALS,
                         ids=["cubic", "linear-asymmetric", "crop-and-resize", "nearest-align-corners", "channels",
                              "antialias"])
def test_resize_refusals_name_the_node_and_attribute(attrs, scales, message):
    x = f32(np.random.default_rng(11), 1, 2, 6, 6)
    assert message in refusal(resize_model(x, scales, opset=18, **attrs))


@needs_new_ops
def test_resize_with_run_time_sizes_is_refused():
    x = f32(np.random.default_rng(11), 1, 2, 6, 6)
    model = model_of("Resize", {"x": x, "sizes": np.array([1, 2, 12, 12], np.int64)},
                     {"roi": np.zeros(0, np.float32), "scales": np.zeros(0, np.float32)},
                     slots=["x", "roi", "scales", "sizes"])
    assert "Resize sizes must be a constant" in refusal(model)


@needs_new_ops
def test_pytorch_half_pixel_to_length_one_is_refused():
    x = f32(np.random.default_rng(11), 1, 2, 6, 6)
    model = resize_model(x, None, [1, 2, 1, 3], mode="linear", coordinate_transformation_mode="pytorch_half_pixel")
    assert "an output length of 1" in refusal(model)


# ------------------------------------------------------------------------------------------------ normalizations
@needs_new_ops
@pytest.mark.parametrize("shape, axis, bias", [((2, 5, 8), -1, True), ((2, 3, 4, 5), 1, False), ((3, 6), 0, True)])
def test_layer_normalization_matches_onnx_runtime(shape, axis, bias):
    rng = np.random.default_rng(12)
    x = f32(rng, *shape)
    normalized = shape[axis % len(shape):]
    inits = {"scale": f32(rng, *normalized)} | ({"b": f32(rng, *normalized)} if bias else {})
    graph = assert_matches_onnx_runtime(model_of("LayerNormalization", {"x": x}, inits, axis=axis, epsilon=1e-3),
                                        {"x": x})
    (node,) = (d for _, d in graph.nodes(data=True) if d["op"] == "layer_norm")
    assert node["attrs"] == {"normalized_shape": normalized, "eps": float(np.float32(1e-3))}  # a float32 attribute
    assert set(node["params"]) == ({"weight", "bias"} if bias else {"weight"})


@needs_new_ops
def test_layer_normalization_broadcasts_a_smaller_scale():
    rng = np.random.default_rng(13)
    x = f32(rng, 2, 3, 4)
    assert_matches_onnx_runtime(model_of("LayerNormalization", {"x": x}, {"scale": f32(rng, 4)}, axis=1), {"x": x})


@needs_new_ops
def test_layer_normalization_statistics_outputs_are_refused():
    rng = np.random.default_rng(13)
    x = f32(rng, 2, 4)
    model = model_of("LayerNormalization", {"x": x}, {"scale": f32(rng, 4)},
                     outputs={"y": TensorProto.FLOAT, "mean": TensorProto.FLOAT})
    assert "LayerNormalization: the Mean/InvStdDev outputs (training statistics) (node 'n')" in refusal(model)


@needs_new_ops
def test_layer_normalization_with_a_run_time_scale_is_refused():
    rng = np.random.default_rng(13)
    x = f32(rng, 2, 4)
    model = model_of("LayerNormalization", {"x": x, "scale": f32(rng, 4)})
    assert "LayerNormalization Scale must be a constant" in refusal(model)


@needs_new_ops
@pytest.mark.parametrize("opset", [18, 21])
def test_group_normalization_matches_onnx_runtime(opset):
    """Opset 18: scale/bias per group (repeated over the group's channels); opset 21: per channel."""
    rng = np.random.default_rng(14)
    x = f32(rng, 2, 6, 4, 5)
    count = 3 if opset == 18 else 6
    model = model_of("GroupNormalization", {"x": x}, {"scale": f32(rng, count), "bias": f32(rng, count)},
                     opset=opset, num_groups=3, epsilon=1e-4)
    graph = assert_matches_onnx_runtime(model, {"x": x})
    (node,) = (d for _, d in graph.nodes(data=True) if d["op"] == "group_norm")
    assert node["attrs"] == {"num_groups": 3, "eps": float(np.float32(1e-4))} and node["params"]["weight"].shape == (6,)


@needs_new_ops
def test_group_normalization_18_with_per_channel_scale_is_an_error():
    rng = np.random.default_rng(15)
    x = f32(rng, 1, 6, 4)
    model = model_of("GroupNormalization", {"x": x}, {"scale": f32(rng, 6), "bias": f32(rng, 6)}, opset=18,
                     num_groups=3)
    with pytest.raises(FrontendError, match=r"scale has 6 values; GroupNormalization-18 expects one per group \(3\)"):
        from_onnx(model)


@needs_new_ops
def test_group_normalization_with_groups_not_dividing_channels_is_an_error():
    rng = np.random.default_rng(15)
    x = f32(rng, 1, 6, 4)
    model = model_of("GroupNormalization", {"x": x}, {"scale": f32(rng, 4), "bias": f32(rng, 4)}, opset=18,
                     num_groups=4)
    with pytest.raises(FrontendError, match="num_groups=4 does not divide the 6 channels"):
        from_onnx(model)
