"""quantize, accuracy-aware: keep_float, a metric and a tolerance put the most sensitive layers back in float."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from frontend.torch_fx import from_torch
from passes.core.pass_base import PassContext, PassError
from passes.core.pipeline import parse_spec
from passes.ir.graph import Graph
from passes.ir.interpret import run_reference
from passes.report import PassRecord, Report
from passes.transforms.fuse_conv_activation import FuseConvActivation
from passes.transforms.quantize import Quantize
from tests.passes.helpers import assert_idempotent, run_pass
from tests.passes.test_quantize import calibration, layout, small_cnn


def hard_cnn() -> nn.Module:
    """conv -> relu -> conv -> relu -> pool -> linear, whose second conv cannot be int8: the first conv's channel 7
    is always 0 after its ReLU (bias -100), and the second conv reads it with weight 1000 in every output channel.
    The float output ignores that weight, but it sets every channel's int8 weight scale to 1000/127, so all the
    real weights (~0.1) round to 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()
    with torch.no_grad():
        model[0].bias[7] = -100.0
        model[2].weight[:, 7, 1, 1] = 1000.0
    return model


def negative_mae(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Higher is better: minus the mean absolute error against the float model's outputs (given as labels)."""
    return -float((outputs - reference).abs().mean())


def agreement(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((outputs.argmax(1) == labels).float().mean())


def fused(model: nn.Module) -> Graph:
    graph = from_torch(model, calibration(1)[0])
    run_pass(FuseConvActivation(), graph)
    return graph


def with_labels(model: nn.Module, label=lambda y: y) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with torch.no_grad():
        return [(x, label(model(x))) for (x,) in calibration()]


def test_the_unquantizable_layer_goes_back_to_float_and_the_metric_holds():
    model, tolerance = hard_cnn(), 0.02
    graph = fused(model)
    result = run_pass(Quantize(metric=negative_mae, tolerance=tolerance), graph,
                      PassContext(data=with_labels(model)))
    counts = {k: v for k, v in result.stats.items() if not k.startswith(("metric_", "sqnr_db", "layer_sqnr_db"))}
    assert counts == {"quantized": 2, "kept_for_accuracy": 1}
    assert set(result.stats) - set(counts) == {"metric_float_milli", "metric_int8_milli", "metric_final_milli",
                                               "sqnr_db.min", "layer_sqnr_db.n0", "layer_sqnr_db.n6"}
    assert result.changed and result.stats["metric_float_milli"] == 0
    assert result.stats["metric_int8_milli"] < -50  # every layer int8: the second conv outputs its bias only
    assert -1000 * tolerance <= result.stats["metric_final_milli"] <= 0
    assert [op for _, op, _ in layout(graph)] == [
        "input", "quantize", "qconv2d", "dequantize", "conv2d", "max_pool2d", "flatten", "quantize", "qlinear",
        "dequantize"]
    kept = graph.nodes["n2"]["meta"]
    assert kept["quantize.kept_float"] == "accuracy" and kept["quantize.sqnr_db_alone"] < 5.0
    assert min(graph.nodes[n]["meta"]["quantize.sqnr_db_alone"] for n in ("n0", "n6")) > 35.0
    with torch.no_grad():
        error = max(float((run_reference(graph, (x,)) - model(x)).abs().mean()) for (x,) in calibration())
    assert error <= tolerance  # checked independently of the pass's own evaluation
    assert_idempotent(Quantize(metric=negative_mae, tolerance=tolerance), graph)
    assert_idempotent(Quantize(), graph)  # a plain run later honours the decision (skipped.kept_float)


def test_accuracy_within_tolerance_keeps_nothing():
    model = small_cnn()
    data = with_labels(model, lambda y: y.argmax(1))  # the float model's own predictions: float accuracy 1.0
    graph, plain = fused(model), fused(model)
    result = run_pass(Quantize(metric=agreement, tolerance=0.0), graph, PassContext(data=data))
    assert result.stats["quantized"] == 3 and result.stats["kept_for_accuracy"] == 0
    assert result.stats["metric_float_milli"] == result.stats["metric_int8_milli"] == 1000
    assert result.stats["metric_final_milli"] == 1000
    run_pass(Quantize(), plain, PassContext(data=data))  # labels in the data items are not calibration inputs
    assert layout(graph) == layout(plain)
    for node in graph.topo_order():
        for key, value in graph.nodes[node]["params"].items():
            assert np.array_equal(value, plain.nodes[node]["params"][key]), (node, key)


def test_a_tolerance_that_cannot_hold_keeps_every_layer_float():
    model = small_cnn()
    graph = fused(model)
    before = layout(graph)
    result = run_pass(Quantize(metric=negative_mae, tolerance=0.0), graph, PassContext(data=with_labels(model)))
    assert not result.changed and layout(graph) == before  # only meta records the decision
    assert result.stats["quantized"] == 0 and result.stats["kept_for_accuracy"] == 3
    assert result.stats["metric_final_milli"] == result.stats["metric_float_milli"] == 0
    assert all(graph.nodes[n]["meta"]["quantize.kept_float"] == "accuracy" for n in ("n0", "n2", "n6"))


@pytest.mark.parametrize("keep_float", [("n2",), ("2",), ("n[2]", "nothing*")])  # a name, an origin, patterns
def test_keep_float_by_name_or_origin(keep_float):
    graph = fused(small_cnn())
    result = run_pass(Quantize(keep_float=keep_float), graph, PassContext(data=calibration()))
    assert result.stats["quantized"] == 2 and result.stats["skipped.kept_float"] == 1
    assert graph.nodes["n2"]["op"] == "conv2d" and graph.nodes["n0"]["op"] == "qconv2d"
    assert "quantize.kept_float" not in graph.nodes["n2"]["meta"]  # an option, not a decision to remember


def test_keep_float_from_a_text_spec_and_the_metric_named_in_the_spec():
    assert parse_spec("quantize{keep_float=n0;layer1.*}") == Quantize(keep_float=("n0", "layer1.*"))
    assert Quantize(metric=agreement, tolerance=0.5).spec() == "quantize{metric=agreement,tolerance=0.5}"


@pytest.mark.parametrize("options, message", [
    ({"keep_float": "n0"}, "keep_float must be a tuple"),
    ({"keep_float": ("n0", 3)}, "keep_float must be a tuple"),
    ({"metric": "accuracy"}, "metric must be a function"),
    ({"metric": agreement, "tolerance": -0.1}, "tolerance must be a finite number >= 0"),
    ({"metric": agreement, "tolerance": math.nan}, "tolerance must be a finite number >= 0"),
    ({"tolerance": 0.5}, "tolerance needs a metric"),
])
def test_bad_options_name_the_pass(options, message):
    with pytest.raises(PassError, match=f"quantize: {message}"):
        Quantize(**options)


def test_a_tolerance_in_a_text_spec_is_refused_and_a_metric_needs_data():
    with pytest.raises(PassError, match="quantize.*tolerance needs a metric"):
        parse_spec("quantize{tolerance=0.5}")
    with pytest.raises(PassError, match="quantize: the accuracy metric needs data"):
        run_pass(Quantize(metric=agreement), fused(small_cnn()))
    with pytest.raises(PassError, match="quantize: a data item has 3 tensors"):
        x, y = with_labels(small_cnn())[0]
        run_pass(Quantize(), fused(small_cnn()), PassContext(data=[(x, y, y)]))


def test_dynamic_mode_searches_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 5)).eval()
    with torch.no_grad():
        model[2].weight[:, 0] = 1e4  # tanh output 0 is always ~0 below: float ignores it, int8 loses the rest
        model[0].weight[0] = 0.0
        model[0].bias[0] = 0.0
    inputs = [torch.randn(4, 20) for _ in range(4)]
    with torch.no_grad():
        data = [(x, model(x)) for x in inputs]
    graph = from_torch(model, (inputs[0],))
    result = run_pass(Quantize(mode="dynamic", metric=negative_mae, tolerance=0.01), graph, PassContext(data=data))
    assert result.stats["quantized"] == 1 and result.stats["kept_for_accuracy"] == 1
    assert [graph.nodes[n]["op"] for n in graph.topo_order()] == ["input", "qlinear_dynamic", "tanh", "linear"]


def test_the_report_lists_sqnr_per_layer():
    graph = fused(small_cnn())
    result = run_pass(Quantize(), graph, PassContext(data=calibration()))
    report = Report(passes=[PassRecord("quantize", "quantize", result.changed, result.stats, 0.1)])
    expected = {n: math.floor(graph.nodes[n]["meta"]["quantize.sqnr_db"]) for n in ("n0", "n2", "n6")}
    assert report.to_dict()["sqnr_db"] == expected
    assert Report.from_dict(report.to_dict()).to_dict()["sqnr_db"] == expected
    lines = report.summary().splitlines()
    assert f"  SQNR dB per quantized layer: n0={expected['n0']}, n2={expected['n2']}, n6={expected['n6']}" in lines
    assert "layer_sqnr_db" not in report.summary()
