"""quantize: integer form of the graph, exact integer semantics, observers, SQNR budget, refusals, idempotence."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from frontend.torch_fx import from_torch
from passes.core.pass_base import PassContext, PassError
from passes.core.pipeline import parse_spec
from passes.ir.graph import Graph, TensorType
from passes.ir.interpret import run_reference
from passes.ir.ops import get_op, requantize
from passes.transforms.calibrate import TensorObservation, clipping_range, entropy_threshold, sqnr_db
from passes.transforms.fuse_conv_activation import FuseConvActivation
from passes.transforms.integer_max_pool import IntegerMaxPool
from passes.transforms.quantization import fixed_point, output_clamp
from passes.transforms.quantize import Quantize
from tests.passes.helpers import assert_idempotent, run_pass

RNG = np.random.default_rng(0)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU6(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 2 * 2, 10)).eval()


def calibration(n: int = 8, shape=(4, 3, 8, 8)) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(*shape, generator=generator),) for _ in range(n)]


def quantized_cnn(observer: str = "minmax") -> tuple[nn.Module, Graph, object]:
    model = small_cnn()
    graph = from_torch(model, calibration(1)[0])
    run_pass(FuseConvActivation(), graph)
    result = run_pass(Quantize(observer=observer), graph, PassContext(data=calibration()))
    assert run_pass(IntegerMaxPool(), graph).stats == {"moved": 1}  # the next pass of the default pipeline
    return model, graph, result


def error_sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return sqnr_db(float(ref.square().sum()), float((ref - out).square().sum()))


def output_sqnr(model: nn.Module, graph: Graph, x: torch.Tensor) -> float:
    """SQNR of the quantized graph's outputs (reference interpreter, batches of 4) against the float model."""
    with torch.no_grad():
        ref = model(x)
    return error_sqnr(ref, torch.cat([run_reference(graph, (b,)) for b in x.split(4)]))


def layout(graph: Graph) -> list[tuple[str, str, str]]:
    """(node, op, output type) in topological order."""
    return [(n, graph.nodes[n]["op"], str(graph.nodes[n]["out_types"][0])) for n in graph.topo_order()]


def test_structure_integer_layers_hand_over_integer_tensors():
    _, graph, result = quantized_cnn()
    assert result.changed and result.stats["quantized"] == 3
    assert set(result.stats) == {"quantized", "sqnr_db.min", "layer_sqnr_db.n0", "layer_sqnr_db.n2", "layer_sqnr_db.n6"}
    assert layout(graph) == [
        ("input_1", "input", "f32[4,3,8,8]"),
        ("n0_quantize", "quantize", "u8[4,3,8,8]"),
        ("n0", "qconv2d", "u8[4,8,8,8]"),
        ("n2", "qconv2d", "u8[4,16,4,4]"),     # reads n0's uint8 output: no dequantize/quantize between them
        ("n4", "max_pool2d", "u8[4,16,2,2]"),  # pools the uint8 tensor: max commutes with dequantize
        ("n4_dequantize", "dequantize", "f32[4,16,2,2]"),
        ("n5", "flatten", "f32[4,64]"),
        ("n6_quantize", "quantize", "u8[4,64]"),
        ("n6", "qlinear", "u8[4,10]"),
        ("n6_dequantize", "dequantize", "f32[4,10]"),
    ]
    first, second = graph.nodes["n0"], graph.nodes["n2"]
    assert first["params"]["weight"].dtype == np.int8 and first["params"]["bias"].dtype == np.int32
    assert first["attrs"]["output_zero_point"] == second["attrs"]["input_zero_point"]
    assert first["meta"]["quantize.output"] == second["meta"]["quantize.input"]
    assert first["attrs"]["out_min"] == first["attrs"]["output_zero_point"]  # relu folded into the clamp


def test_per_layer_sqnr_is_recorded_and_meets_the_int8_budget():
    model, graph, result = quantized_cnn()
    sqnrs = {n: graph.nodes[n]["meta"]["quantize.sqnr_db"] for n in ("n0", "n2", "n6")}
    assert result.stats["sqnr_db.min"] == int(np.floor(min(sqnrs.values())))
    assert min(sqnrs.values()) > 30.0, sqnrs  # 8 bits ~ 6 dB/bit; minmax on Gaussian data loses a few
    x = torch.cat([b[0] for b in calibration()])
    assert output_sqnr(model, graph, x) > 30.0


@pytest.mark.parametrize("observer", ["percentile", "entropy"])
def test_histogram_observers_quantize_every_layer_within_budget(observer):
    _, graph, result = quantized_cnn(observer)
    assert result.stats["quantized"] == 3
    assert all(graph.nodes[n]["meta"]["quantize.observer"] == observer for n in ("n0", "n2", "n6"))
    assert result.stats["sqnr_db.min"] >= 25  # both clip tails on purpose, trading range for resolution


def test_fixed_point_multiplier_is_normalized_and_accurate():
    real = np.concatenate([RNG.uniform(1e-6, 1.0, 200), [0.5, 2.0 ** -20, 1.0 - 2 ** -40]])
    multiplier, shift = fixed_point(real)
    assert multiplier.dtype == np.int32 and np.all(multiplier >= 2 ** 30)
    approx = multiplier.astype(np.float64) * 2.0 ** -shift.astype(np.float64)
    np.testing.assert_array_less(np.abs(approx - real) / real, 2.0 ** -30)


def test_requantize_rounds_half_up_and_clamps_in_exact_integer_arithmetic():
    acc = np.array([-(2 ** 31) + 1, -1000, -6, -3, -2, -1, 0, 1, 2, 3, 6, 1000, 2 ** 31 - 1], np.int64)
    params = {"multiplier": torch.tensor([1 << 30], dtype=torch.int32), "shift": torch.tensor([32], dtype=torch.int32)}
    attrs = {"output_zero_point": 100, "out_min": 0, "out_max": 255, "out_dtype": "uint8"}  # real scale 1/4
    got = requantize(torch.from_numpy(acc).reshape(-1, 1), params, attrs, channel_dim=1).reshape(-1).tolist()
    expected = [min(255, max(0, 100 + math.floor(Fraction(int(a), 4) + Fraction(1, 2)))) for a in acc]
    assert got == expected


def test_qconv2d_reference_equals_an_independent_integer_convolution():
    x = RNG.integers(0, 256, (2, 5, 6, 6)).astype(np.uint8)
    w = RNG.integers(-127, 128, (7, 5, 3, 3)).astype(np.int8)
    b = RNG.integers(-3000, 3000, 7).astype(np.int32)
    m, s = fixed_point(RNG.uniform(1e-4, 1e-2, 7))
    attrs = {"stride": (2, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1, "input_zero_point": 9,
             "output_zero_point": 4, "out_dtype": "uint8", "out_min": 4, "out_max": 250}
    got = get_op("qconv2d").reference([torch.from_numpy(x)], attrs, {k: torch.from_numpy(v) for k, v in
                                      {"weight": w, "bias": b, "multiplier": m, "shift": s}.items()}).numpy()
    padded = np.pad(x.astype(np.int64) - 9, ((0, 0), (0, 0), (1, 1), (1, 1)))
    oh, ow = got.shape[2:]
    for n, o, i, j in np.ndindex(2, 7, oh, ow):
        acc = int((padded[n, :, 2 * i:2 * i + 3, j:j + 3] * w[o]).sum()) + int(b[o])
        q = (acc * int(m[o]) + (1 << (int(s[o]) - 1))) >> int(s[o])
        assert got[n, o, i, j] == min(250, max(4, q + 4))


def test_fused_activation_becomes_the_output_clamp():
    relu6 = {"activation": "relu6", "activation_params": ()}
    assert output_clamp(relu6, scale=0.05, zero_point=10) == (10, 130)
    assert output_clamp(relu6, scale=0.01, zero_point=0) == (0, 255)
    clamp = {"activation": "clamp", "activation_params": (-1.0, float("inf"))}
    assert output_clamp(clamp, scale=0.1, zero_point=50) == (40, 255)


def test_observers_clip_outliers_that_minmax_keeps():
    values = np.concatenate([RNG.standard_normal(100_000), [60.0, -55.0]])
    observed = {}
    for observer in ("minmax", "percentile", "entropy"):
        obs = TensorObservation()
        obs.update_range(values)
        if observer == "entropy":
            obs.update_histogram(np.abs(values), 0.0, 60.0)
        elif observer == "percentile":
            obs.update_histogram(values, obs.low, obs.high)
        observed[observer] = clipping_range(obs, observer, 99.99)
    assert observed["minmax"] == (-55.0, 60.0)
    assert 3.0 < observed["percentile"][1] < 6.0 and -6.0 < observed["percentile"][0] < -3.0
    assert 2.0 < observed["entropy"][1] < 20.0 and observed["entropy"][0] == -observed["entropy"][1]


def test_entropy_keeps_the_full_range_of_discrete_data():
    pixels = RNG.integers(0, 17, 10_000) / 16.0 - 0.5  # 17 grey levels, as in the digits images
    obs = TensorObservation()
    obs.update_range(pixels)
    obs.update_histogram(np.abs(pixels), 0.0, 0.5)
    assert clipping_range(obs, "entropy", 99.99) == (-0.5, 0.5)


def test_entropy_keeps_the_whole_range_of_uniform_data():
    histogram = np.full(2048, 100)
    edges = np.linspace(0.0, 1.0, 2049)
    assert entropy_threshold(histogram, edges, levels=255) == pytest.approx(1.0, abs=0.01)


def graph_with(op_builder) -> Graph:
    g = Graph(name="refusal")
    x = g.add_input("x", TensorType((1, 2, 4, 4)))
    g.set_outputs(op_builder(g, x))
    return g


def conv(g: Graph, x, **attrs):
    return g.add_op("conv2d", [x], attrs=attrs, params={"weight": RNG.standard_normal((3, 2, 1, 1)).astype(np.float32)},
                    origin=("conv",))


def assert_refused(graph: Graph, reason: str) -> None:
    before = layout(graph)
    result = run_pass(Quantize(), graph, PassContext(data=[(torch.randn(*graph.input_types()[0].shape),)]))
    assert not result.changed and result.stats == {"quantized": 0, f"skipped.{reason}": 1}
    assert layout(graph) == before


def test_refuses_fused_pool_residual_and_non_clamp_activation():
    assert_refused(graph_with(lambda g, x: g.add_op(
        "conv2d_pool", [x], params={"weight": np.ones((3, 2, 1, 1), np.float32)},
        attrs={"pool": "max", "pool_kernel": (2, 2), "pool_stride": (2, 2)})), "fused_pool")
    assert_refused(graph_with(lambda g, x: g.add_op(
        "conv2d", [x, x], params={"weight": np.ones((2, 2, 1, 1), np.float32)})), "residual")
    assert_refused(graph_with(lambda g, x: conv(g, x, activation="sigmoid")), "activation")


def test_refuses_non_float_input_and_accumulator_overflow():
    g = Graph(name="f64")
    x = g.add_input("x", TensorType((1, 2, 4, 4), "float64"))
    g.set_outputs(g.add_op("conv2d", [x], params={"weight": np.ones((3, 2, 1, 1), np.float64)}))
    assert_refused(g, "not_float")
    g = Graph(name="wide")
    x = g.add_input("x", TensorType((1, 70_000)))
    g.set_outputs(g.add_op("linear", [x], params={"weight": np.ones((1, 70_000), np.float32)}))
    assert_refused(g, "accumulator_overflow")


def test_refuses_a_requantize_scale_no_shift_can_encode():
    # output clamped to [0, 1e-12]: s_y ~ 4e-15 against s_x s_w ~ 1e-4 needs a multiplier of ~1e10 > 2^30
    assert_refused(graph_with(lambda g, x: conv(g, x, activation="clamp", activation_params=(0.0, 1e-12))),
                   "requantize_range")


def test_needs_calibration_data_and_a_known_observer():
    graph = graph_with(conv)
    with pytest.raises(PassError, match="needs calibration inputs"):
        run_pass(Quantize(), graph)
    with pytest.raises(PassError, match="observer='kl'"):
        run_pass(Quantize(observer="kl"), graph)


def test_idempotent_and_parsed_from_a_spec():
    _, graph, _ = quantized_cnn()
    assert_idempotent(Quantize(), graph)
    assert parse_spec("quantize{observer=entropy,percentile=99.9}") == Quantize(observer="entropy", percentile=99.9)


def test_unseen_inputs_from_the_calibration_distribution_stay_within_budget():
    model, graph, _ = quantized_cnn()
    x = torch.randn(32, 3, 8, 8)  # a few values fall outside the calibrated ranges and clip: a lower budget
    assert output_sqnr(model, graph, x) > 25.0


def test_dynamic_mode_quantizes_linear_layers_without_calibration():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 32), nn.ReLU(),
                          nn.Linear(32, 10)).eval()
    graph = from_torch(model, calibration(1)[0])
    run_pass(FuseConvActivation(), graph)
    result = run_pass(Quantize(mode="dynamic"), graph)
    assert result.stats == {"quantized": 2, "skipped.dynamic_conv": 1}
    assert [graph.nodes[n]["op"] for n in graph.topo_order()] == [
        "input", "conv2d", "flatten", "qlinear_dynamic", "qlinear_dynamic"]
    assert graph.nodes["n2"]["attrs"]["activation"] == "relu" and graph.nodes["n2"]["params"]["weight"].dtype == np.int8
    assert_idempotent(Quantize(mode="dynamic"), graph)
    x = torch.cat([b[0] for b in calibration()])
    assert output_sqnr(model, graph, x) > 35.0


def test_dynamic_mode_reports_sqnr_when_given_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 5)).eval()
    graph = from_torch(model, (torch.randn(4, 20),))
    result = run_pass(Quantize(mode="dynamic"), graph, PassContext(data=[(torch.randn(4, 20),) for _ in range(4)]))
    assert result.stats["quantized"] == 2 and result.stats["sqnr_db.min"] >= 35
    assert all(graph.nodes[n]["meta"]["quantize.mode"] == "dynamic" for n in graph.op_nodes("qlinear_dynamic"))


def test_calibration_leaves_autograd_enabled():
    quantized_cnn()
    run_pass(Quantize(mode="dynamic"), from_torch(small_cnn(), calibration(1)[0]), PassContext(data=calibration(2)))
    assert torch.is_grad_enabled()


def test_calibration_batches_may_differ_from_the_compiled_batch_size():
    """Data cut into batches of 8 (the CLI's --batch-size) calibrates a graph compiled for batch 1."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    graph = from_torch(model, (torch.randn(1, 3, 8, 8),))
    data = [(torch.randn(8, 3, 8, 8),) for _ in range(2)]
    assert Quantize().run(graph, PassContext(data=data)).stats["quantized"] == 2


# ------------------------------------------------------------------------------ dynamic int8 LSTM / GRU / RNN
class Recurrent(nn.Module):
    """A 2-layer bidirectional RNN whose sequence feeds a linear head and whose final states are outputs too."""

    def __init__(self, cell=nn.LSTM, **kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.rnn, self.head = cell(6, 16, 2, batch_first=True, bidirectional=True, **kwargs), nn.Linear(32, 5)

    def forward(self, x):
        y, state = self.rnn(x)
        return (self.head(y[:, -1]), *(state if isinstance(state, tuple) else (state,)))


def flat(outputs) -> list[torch.Tensor]:
    return [t for o in outputs for t in (flat(o) if isinstance(o, (tuple, list)) else [o])]


def sequences(n: int = 4) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    return [(torch.randn(3, 7, 6, generator=generator),) for _ in range(n)]


def test_dynamic_mode_quantizes_recurrent_weights_to_int8():
    model = Recurrent()
    graph = from_torch(model.eval(), sequences(1)[0])
    result = run_pass(Quantize(mode="dynamic"), graph)
    assert result.stats == {"quantized": 2}
    assert [graph.nodes[n]["op"] for n in graph.topo_order()] == ["input", "qlstm_dynamic", "select",
                                                                  "qlinear_dynamic"]
    params = graph.nodes["rnn"]["params"]
    assert {k for k, v in params.items() if v.dtype == np.int8} == {
        f"weight_{kind}_l{layer}{suffix}" for kind in ("ih", "hh") for layer in (0, 1) for suffix in ("", "_reverse")}
    assert params["scale_hh_l1_reverse"].shape == (64,) and params["bias_ih_l0"].dtype == np.float32
    # per gate row: every row's largest weight is +-127, and dequantizing recovers the float weight to s_w / 2
    weight, float_weight = params["weight_hh_l1_reverse"], model.rnn.weight_hh_l1_reverse.detach().numpy()
    assert (np.abs(weight).max(axis=1) == 127).all()
    assert np.abs(weight * params["scale_hh_l1_reverse"][:, None] - float_weight).max() <= \
        params["scale_hh_l1_reverse"].max() / 2 + 1e-7
    assert [v.node for v in graph.output_values()] == ["head", "rnn", "rnn"]  # h_n and c_n moved along
    assert_idempotent(Quantize(mode="dynamic"), graph)


@pytest.mark.parametrize("cell, kwargs", [(nn.LSTM, {}), (nn.GRU, {}), (nn.RNN, {}),
                                          (nn.RNN, {"nonlinearity": "relu"})], ids=["lstm", "gru", "rnn", "rnn_relu"])
def test_dynamic_recurrent_layers_stay_within_the_int8_noise_budget(cell, kwargs):
    """Interpreter of the quantized graph vs the float PyTorch model. Measured 38-53 dB on the outputs (layer:
    41-50 dB); a wrong scale, zero point or gate order costs tens of dB."""
    model = Recurrent(cell, **kwargs).eval()
    graph = from_torch(model, sequences(1)[0])
    result = run_pass(Quantize(mode="dynamic"), graph, PassContext(data=sequences()))
    assert result.stats["quantized"] == 2 and result.stats["layer_sqnr_db.rnn"] >= 38
    assert graph.nodes["rnn"]["meta"]["quantize.sqnr_db"] >= 38
    for (x,) in sequences(2):
        with torch.no_grad():
            expected = model(x)
        for ref, out in zip(expected, flat(run_reference(graph, (x,)))):
            assert error_sqnr(ref, out) > 35.0


def test_dynamic_recurrent_reference_sums_integers_exactly():
    """``dynamic_int8_product`` against int64 numpy: per-row uint8 of h, int8 weights, exact sums."""
    from passes.ir.ops import dynamic_int8_product, dynamic_uint8

    h = torch.randn(5, 40) * torch.tensor([[0.01], [1.0], [3.0], [0.0], [-2.0]])
    weight = torch.from_numpy(RNG.integers(-127, 128, (24, 40)).astype(np.int8))
    scale = torch.rand(24) / 100
    q, s, z = dynamic_uint8(h, dim=-1)
    assert s.shape == (5, 1) and float(s[3]) == 1.0 and (q >= 0).all() and (q <= 255).all()
    acc = (q.numpy().astype(np.int64) - z.numpy().astype(np.int64)) @ weight.numpy().astype(np.int64).T
    expected = acc.astype(np.float32) * (s.numpy() * scale.numpy())
    np.testing.assert_array_equal(dynamic_int8_product(h, weight, scale, dim=-1).numpy(), expected)


def test_refuses_recurrent_layers_in_static_mode_non_float_and_overflowing_ones():
    graph = from_torch(Recurrent().eval(), sequences(1)[0])
    before = layout(graph)
    result = run_pass(Quantize(), graph, PassContext(data=sequences(2)))
    assert result.stats["skipped.static_recurrent"] == 1 and graph.nodes["rnn"]["op"] == "lstm"
    for shape, dtype, reason in (((2, 3, 4), "float64", "not_float"), ((1, 2, 70_000), "float32",
                                                                        "accumulator_overflow")):
        g = Graph(name=reason)
        x = g.add_input("x", TensorType(shape, dtype))
        params = {"weight_ih_l0": np.ones((4, shape[-1]), dtype), "weight_hh_l0": np.ones((4, 1), dtype)}
        g.set_outputs(g.add_op("lstm", [x], attrs={"hidden_size": 1, "bias": False}, params=params)[0])
        result = run_pass(Quantize(mode="dynamic"), g)
        assert not result.changed and result.stats == {"quantized": 0, f"skipped.{reason}": 1}
    graph = from_torch(Recurrent().eval(), sequences(1)[0])
    result = run_pass(Quantize(mode="dynamic", keep_float=("rnn",)), graph)
    assert result.stats == {"quantized": 1, "skipped.kept_float": 1} and graph.nodes["rnn"]["op"] == "lstm"
    assert before[0] == layout(graph)[0]


def test_dynamic_recurrent_graph_round_trips_through_serialization(tmp_path):
    from passes.ir.serialize import load_graph, save_graph

    graph = from_torch(Recurrent(nn.GRU).eval(), sequences(1)[0])
    run_pass(Quantize(mode="dynamic"), graph)
    loaded = load_graph(save_graph(graph, tmp_path / "g"))
    assert loaded.nodes["rnn"]["params"]["weight_hh_l1"].dtype == np.int8
    x = sequences(1)[0][0]
    for a, b in zip(flat(run_reference(graph, (x,))), flat(run_reference(loaded, (x,)))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
