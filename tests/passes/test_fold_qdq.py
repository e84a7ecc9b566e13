"""fold-qdq: ONNX Runtime QDQ / QLinear models land on qconv2d/qlinear; outputs within one step of ONNX Runtime."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from torch import nn

from frontend.onnx import from_onnx
from passes.ir.graph import Graph, TensorType, flatten_structure
from passes.ir.interpret import run_reference
from passes.transforms.fold_qdq import FoldQdq, symmetric_int8
from tests.passes.helpers import assert_idempotent, run_pass

SHAPE = (2, 3, 8, 8)


class Calibration(CalibrationDataReader):
    def __init__(self, name: str, shape: tuple[int, ...]):
        generator = np.random.default_rng(1)
        self.batches = iter([{name: generator.standard_normal(shape).astype(np.float32)} for _ in range(8)])

    def get_next(self):
        return next(self.batches, None)


class MatMulHead(nn.Module):
    """``x @ W`` with a constant W: a bias-free MatMul, which ONNX Runtime's QOperator format makes QLinearMatMul
    (a Gemm would become com.microsoft's QGemm)."""

    def __init__(self, features: int, out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features, out) * 0.1)

    def forward(self, x):
        return x @ self.weight


def conv_relu() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.ReLU()).eval()


def conv_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10)).eval()


def conv_matmul() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), MatMulHead(8 * 8 * 8, 10)).eval()


def quantized_onnx(model: nn.Module, path, fmt: QuantFormat = QuantFormat.QDQ, per_channel: bool = True,
                   activations: QuantType = QuantType.QUInt8) -> str:
    """Export ``model`` and quantize it with ONNX Runtime (uint8 activations unless told, int8 weights, min-max
    calibration)."""
    float_path, quant_path = str(path / "float.onnx"), str(path / "quant.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(SHAPE),), float_path, input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False)
    quantize_static(float_path, quant_path, Calibration("x", SHAPE), quant_format=fmt, per_channel=per_channel,
                    activation_type=activations, weight_type=QuantType.QInt8)
    return quant_path


def _host_has_vnni() -> bool:
    """From the kernel's CPU flags (pass tests do not import TVM)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


# Without VNNI, ONNX Runtime's fused u8s8 integer kernels sum pairs of products in int16 (vpmaddubsw), which
# saturates: ONNX Runtime is then itself inexact (27 steps off here on Zen 3). There the reference for a QDQ model is
# ONNX Runtime with its graph optimizations off, which runs the QDQ graph literally (dequantize, float op, quantize).
HOST_VNNI = _host_has_vnni()


def onnx_runtime_session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not HOST_VNNI:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def inputs(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def ops(graph: Graph) -> list[str]:
    return [graph.nodes[n]["op"] for n in graph.topo_order()]


def output_scale(graph: Graph) -> float:
    (out,) = graph.output_values()
    assert graph.nodes[out.node]["op"] == "dequantize"
    return float(graph.nodes[out.node]["params"]["scale"])


def assert_within_one_step(actual: np.ndarray, expected: np.ndarray, scale: float) -> float:
    """Dequantized outputs differ by whole steps; at most one, and only where rounding meets a .5 tie (rare)."""
    steps = np.abs(actual.astype(np.float64) - expected.astype(np.float64)) / scale
    assert np.allclose(steps, np.round(steps), atol=1e-3), "outputs are not on the same quantization grid"
    assert steps.max() <= 1 + 1e-3 and (steps > 0.5).mean() < 0.02, (steps.max(), (steps > 0.5).mean())
    return float(steps.max())


def check_against_onnx_runtime(graph: Graph, path: str) -> None:
    session = onnx_runtime_session(path)
    for seed in range(3):
        x = inputs(seed)
        (expected,) = session.run(None, {"x": x})
        (actual,) = flatten_structure(run_reference(graph, (torch.from_numpy(x),)))
        assert_within_one_step(actual.numpy(), expected, output_scale(graph))


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
@pytest.mark.parametrize("make, layers", [(conv_relu, ("qconv2d", "qconv2d")),
                                          (conv_linear, ("qconv2d", "qconv2d", "qlinear"))],
                         ids=["conv_relu", "conv_linear"])
def test_qdq_model_folds_into_integer_ops(make, layers, per_channel, tmp_path):
    path = quantized_onnx(make(), tmp_path, QuantFormat.QDQ, per_channel)
    graph = from_onnx(path)
    result = run_pass(FoldQdq(), graph)
    assert result.changed and result.stats == {"folded": len(layers)}
    assert [op for op in ops(graph) if op in ("conv2d", "linear", "qconv2d", "qlinear")] == list(layers)
    first = graph.nodes[graph.topo_order()[2]]
    assert first["op"] == "qconv2d" and first["params"]["weight"].dtype == np.int8
    assert first["params"]["bias"].dtype == np.int32 and first["attrs"]["out_dtype"] == "uint8"
    assert graph.value_type(graph.operands(graph.topo_order()[2])[0]).dtype == "uint8"  # reads the quantized x
    check_against_onnx_runtime(graph, path)
    assert_idempotent(FoldQdq(), graph)


@pytest.mark.tvm
def test_onnx_runtime_default_int8_activations_fold_and_compile_exactly(tmp_path):
    """``quantize_static``'s defaults write int8 (QInt8) activations: they fold onto the same integer ops (int8 in
    and out), stay within one step of ONNX Runtime, and the compiled kernels equal the reference bit for bit."""
    from backends.tvm import build

    path = quantized_onnx(conv_linear(), tmp_path, QuantFormat.QDQ, per_channel=True, activations=QuantType.QInt8)
    graph = from_onnx(path)
    assert run_pass(FoldQdq(), graph).stats == {"folded": 3}
    layers = [graph.nodes[n] for n in graph.topo_order() if graph.nodes[n]["op"] in ("qconv2d", "qlinear")]
    assert [layer["attrs"]["out_dtype"] for layer in layers] == ["int8"] * 3
    check_against_onnx_runtime(graph, path)
    compiled = build(graph, "llvm")
    for seed in range(2):
        x = inputs(seed)
        (expected,) = flatten_structure(run_reference(graph, (torch.from_numpy(x),)))
        np.testing.assert_array_equal(compiled(x), expected.numpy())


def test_qoperator_model_folds_qlinearconv_and_qlinearmatmul(tmp_path):
    path = quantized_onnx(conv_matmul(), tmp_path, QuantFormat.QOperator, per_channel=False)
    graph = from_onnx(path)
    assert ops(graph).count("conv2d") == 1 and ops(graph).count("linear") == 1
    result = run_pass(FoldQdq(), graph)
    assert result.stats == {"folded": 2}
    assert "conv2d" not in ops(graph) and "linear" not in ops(graph)
    assert ops(graph).count("qconv2d") == 1 and ops(graph).count("qlinear") == 1
    assert_idempotent(FoldQdq(), graph)
    if not HOST_VNNI:  # QLinearConv is an integer kernel in every ONNX Runtime mode: inexact without VNNI
        pytest.skip("ONNX Runtime's u8s8 QLinearConv saturates int16 pair sums without VNNI: not a reference here")
    check_against_onnx_runtime(graph, path)


def test_weight_recovery_is_exact():
    generator = np.random.default_rng(3)
    q = generator.integers(-127, 128, (6, 4, 3, 3)).astype(np.int8)
    q[:, 0, 0, 0] = 127
    scales = np.float32(generator.uniform(1e-3, 1e-1, 6))
    weight = q.astype(np.float32) * scales.reshape(-1, 1, 1, 1)
    recovered, s_w = symmetric_int8(weight)
    np.testing.assert_array_equal(recovered, q)
    np.testing.assert_array_equal(s_w, scales.astype(np.float64))
    assert symmetric_int8(weight + np.float32(1e-3)) is None  # not multiples of a scale


@pytest.mark.tvm
def test_optimize_compiles_qdq_model_to_integer_ops(tmp_path):
    import passes

    path = quantized_onnx(conv_linear(), tmp_path, QuantFormat.QDQ, per_channel=True)
    opt = passes.optimize(path, measure=False)
    assert "qconv2d" in ops(opt.graph) and "qlinear" in ops(opt.graph) and "conv2d" not in ops(opt.graph)
    session = onnx_runtime_session(path)
    for seed in range(2):
        x = inputs(seed)
        (expected,) = session.run(None, {"x": x})
        assert_within_one_step(np.asarray(opt(x)), expected, output_scale(opt.graph))


# ------------------------------------------------------------------------------------------------ refusals
def tiny_qdq(weight_scale=0.02, bias=(0.1, -0.2), out_scale=0.05, out_dtype="uint8", activation="none",
             weight=None, relu=False, share_layer=False, residual=False, per_axis_out=False) -> Graph:
    """x -> quantize -> dequantize -> conv2d [-> relu] -> quantize -> dequantize, weights exact int8 multiples."""
    graph = Graph(name="tiny")
    x = graph.add_input("x", TensorType((1, 3, 4, 4)))
    qx = graph.add_op("quantize", [x], {"dtype": "uint8"}, {"scale": np.float32(0.05), "zero_point": np.uint8(128)})
    dx = graph.add_op("dequantize", [qx], {}, {"scale": np.float32(0.05), "zero_point": np.uint8(128)})
    if weight is None:
        q_w = np.random.default_rng(0).integers(-127, 128, (2, 3, 3, 3)).astype(np.float32)
        q_w[:, 0, 0, 0] = 127
        weight = q_w * np.float32(weight_scale)
    operands = [dx, graph.add_input("residual", TensorType((1, 2, 4, 4)))] if residual else [dx]
    y = graph.add_op("conv2d", operands, {"padding": (1, 1), "activation": activation},
                     {"weight": weight, "bias": np.asarray(bias, np.float32)})
    act = graph.add_op("relu", [y]) if relu else y
    zero = np.uint8(0) if out_dtype == "uint8" else np.int8(0)
    qparams = {"scale": np.float32(out_scale), "zero_point": zero}
    if per_axis_out:  # one scale per output channel
        qparams = {"scale": np.full(2, out_scale, np.float32), "zero_point": np.full(2, zero)}
    axis = {"axis": 1} if per_axis_out else {}
    qy = graph.add_op("quantize", [act], {"dtype": out_dtype} | axis, qparams)
    out = graph.add_op("dequantize", [qy], axis, qparams)
    graph.set_outputs((out, y) if share_layer else out)
    return graph


def test_tiny_graph_folds_with_relu_as_output_clamp():
    graph = tiny_qdq(relu=True)
    result = run_pass(FoldQdq(), graph)
    assert result.stats == {"folded": 1}
    assert ops(graph) == ["input", "quantize", "qconv2d", "dequantize"]
    (layer,) = [graph.nodes[n] for n in graph.topo_order() if graph.nodes[n]["op"] == "qconv2d"]
    assert (layer["attrs"]["out_min"], layer["attrs"]["out_max"]) == (0, 255)
    np.testing.assert_array_equal(layer["params"]["bias"], np.round(np.array([0.1, -0.2]) / (0.05 * 0.02)))


@pytest.mark.parametrize("reason, kwargs", [
    ("shared_output", {"share_layer": True}),
    ("residual", {"residual": True}),
    ("activation", {"activation": "silu"}),
    ("activation_dtype", {"per_axis_out": True}),
    ("weights_not_int8", {"weight": np.random.default_rng(0).standard_normal((2, 3, 3, 3)).astype(np.float32)}),
    ("accumulator_overflow", {"bias": (1e7, 0.0)}),
    ("requantize_range", {"out_scale": 1e8}),  # s_x s_w / s_y = 1e-11 < 2^-32
])
def test_refusal_is_counted_and_graph_unchanged(reason, kwargs):
    graph = tiny_qdq(**kwargs)
    before = ops(graph)
    result = run_pass(FoldQdq(), graph)
    assert not result.changed and result.stats == {"folded": 0, f"skipped.{reason}": 1}
    assert ops(graph) == before


def test_int8_output_folds_with_relu_clamped_at_its_zero_point():
    graph = tiny_qdq(relu=True, out_dtype="int8")
    assert run_pass(FoldQdq(), graph).stats == {"folded": 1}
    (layer,) = [graph.nodes[n] for n in graph.topo_order() if graph.nodes[n]["op"] == "qconv2d"]
    assert layer["attrs"]["out_dtype"] == "int8" and (layer["attrs"]["out_min"], layer["attrs"]["out_max"]) == (0, 127)


def test_float_model_is_untouched():
    graph = Graph(name="float")
    x = graph.add_input("x", TensorType((1, 3, 4, 4)))
    graph.set_outputs(graph.add_op("conv2d", [x], {}, {"weight": np.ones((2, 3, 1, 1), np.float32)}))
    result = run_pass(FoldQdq(), graph)
    assert not result.changed and result.stats == {"folded": 0}
