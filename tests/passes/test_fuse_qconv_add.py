"""fuse-qconv-add: integer residual adds folded into the qconv2d feeding them (one rounding, no float sum)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from backends.tvm import build
from frontend.torch_fx import from_torch
from passes.core.pass_base import PassContext
from passes.ir.graph import Graph
from passes.ir.interpret import run_reference
from passes.transforms.eliminate_dead_nodes import EliminateDeadNodes
from passes.transforms.fuse_conv_activation import FuseConvActivation
from passes.transforms.fuse_qconv_add import FuseQConvAdd
from passes.transforms.quantize import Quantize
from tests.cases import Fn
from tests.passes.helpers import assert_idempotent, run_pass

SHAPE = (2, 8, 6, 6)


class Blocks(nn.Module):
    """A stem, two residual blocks and a head: the second block's shortcut is the first block's sum, which is an
    integer tensor only once the first block is fused."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(channels, channels, 1)
        self.a1, self.a2 = nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 3, padding=1)
        self.head = nn.Conv2d(channels, 4, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.relu(self.a2(torch.relu(self.a1(x))) + x)
        z = torch.relu(self.b2(torch.relu(self.b1(y))) + y)
        return self.head(z)


def calibration(n: int = 6, shape=SHAPE) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(*shape, generator=generator),) for _ in range(n)]


def quantized(model: nn.Module, shape=SHAPE) -> Graph:
    torch.manual_seed(0)
    graph = from_torch(model.eval(), calibration(1, shape)[0])
    run_pass(FuseConvActivation(), graph)
    run_pass(Quantize(), graph, PassContext(data=calibration(shape=shape)))
    return graph


def ops(graph: Graph) -> list[str]:
    return [graph.nodes[n]["op"] for n in graph.topo_order()]


def test_structure_both_blocks_fuse_and_float_readers_get_a_dequantize():
    torch.manual_seed(0)
    model = Blocks().eval()
    graph = quantized(model)
    assert ops(graph).count("add") == 2
    result = run_pass(FuseQConvAdd(), graph)
    assert result.stats == {"fused": 2}
    assert ops(graph) == ["input", "quantize"] + ["qconv2d"] * 6 + ["dequantize"]
    a2, b2 = graph.nodes["a2"], graph.nodes["b2"]
    assert [v.node for v in graph.operands("a2")] == ["a1", "stem"]
    assert [v.node for v in graph.operands("b2")] == ["b1", "a2"]  # block 2 reads block 1's fused sum
    assert a2["origin"] == ("a2", "add", "relu_2") and a2["params"]["residual_multiplier"].dtype == np.int64
    assert a2["attrs"]["out_min"] == a2["attrs"]["output_zero_point"]  # the relu after the add is the clamp
    assert b2["attrs"]["output_zero_point"] == graph.nodes["head"]["attrs"]["input_zero_point"]


def test_numerics_one_rounding_instead_of_two():
    """The fused graph rounds once where the unfused one rounds twice: within one output step of the unfused
    integer graph, no further from the float model, and compiled exactly as the reference computes it."""
    torch.manual_seed(0)
    model = Blocks().eval()
    unfused = quantized(model)
    fused = quantized(model)
    run_pass(FuseQConvAdd(), fused)
    x = calibration(1)[0]
    with torch.no_grad():
        expected = model(*x).numpy()
    got_unfused = run_reference(unfused, x).numpy()
    got_fused = run_reference(fused, x).numpy()
    head_step = float(fused.nodes[[n for n in fused.topo_order() if fused.nodes[n]["op"] == "dequantize"][-1]]
                      ["params"]["scale"])
    assert np.abs(got_fused - got_unfused).max() <= 3 * head_step  # an input step moves the head by ~1 step
    assert np.abs(got_fused - expected).max() <= np.abs(got_unfused - expected).max() * 1.05
    assert np.abs(got_fused - expected).max() / np.abs(expected).max() < 0.03
    np.testing.assert_array_equal(build(fused, "llvm")(x[0].numpy()), got_fused)


def test_idempotent():
    graph = quantized(Blocks())
    run_pass(FuseQConvAdd(), graph)
    assert_idempotent(FuseQConvAdd(), graph)


def test_the_integer_rewrite_is_dead_node_free():
    graph = quantized(Blocks())
    run_pass(FuseQConvAdd(), graph)
    assert not run_pass(EliminateDeadNodes(), graph).changed


def conv(channels=8):
    return nn.Conv2d(channels, channels, 3, padding=1)


def block(tail, **convs):
    """``tail(s, h, x)`` after an integer stem ``h = relu(stem(x))``."""
    return Fn(lambda s, x: tail(s, torch.relu(s.stem(x)), x), stem=nn.Conv2d(8, 8, 1), **convs)


@pytest.mark.parametrize("model, reason", [
    (block(lambda s, h, x: s.head(torch.sigmoid(s.c(h) + h)), c=conv(), head=conv()), "activation"),
    (block(lambda s, h, x: torch.relu(s.c(h) + h), c=conv()), "float_output"),
    (block(lambda s, h, x: s.head(torch.relu(s.c(h) + x)), c=conv(), head=conv()), "shortcut"),
    (block(lambda s, h, x: s.head(torch.relu(s.c(h)) + h), c=conv(), head=conv()), "already_fused"),
    (block(lambda s, h, x: (lambda y: (s.head(torch.relu(y + h)), s.other(y)))(s.c(h)), c=conv(), head=conv(),
           other=conv()), "shared_output"),
], ids=["activation", "float_output", "shortcut", "already_fused", "shared_output"])
def test_refusals(model, reason):
    graph = quantized(model)
    result = run_pass(FuseQConvAdd(), graph)
    assert result.stats == {"fused": 0, f"skipped.{reason}": 1}, result.stats
    assert "add" in ops(graph)


def test_refuses_a_residual_scale_the_fixed_point_cannot_hold():
    graph = quantized(block(lambda s, h, x: s.head(torch.relu(s.c(h) + h)), c=conv(), head=conv()))
    add = next(n for n in graph.topo_order() if graph.nodes[n]["op"] == "add")
    shortcut = next(v.node for v in graph.operands(add) if graph.operands(v.node)[0].node != "c")
    graph.nodes[shortcut]["params"]["scale"] = np.asarray(1e9, np.float32)  # s_r / s_y * 2^shift >= 2^54
    assert run_pass(FuseQConvAdd(), graph).stats == {"fused": 0, "skipped.requantize_range": 1}


@pytest.mark.tvm
def test_onnx_runtime_int8_residual_blocks_fuse_and_stay_close_to_onnx_runtime(tmp_path):
    """An ONNX Runtime QDQ model with its default int8 activations: fold-qdq then fuse-qconv-add (both in
    ``default``) leave no float add; the compiled result equals our reference exactly and stays within one output
    step of ONNX Runtime, which rounds twice per block (QLinearAdd) where we round once."""
    import warnings

    import onnxruntime as ort
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    import passes
    from tests.passes.test_fold_qdq import Calibration

    torch.manual_seed(0)
    model = Blocks().eval()
    float_path, quant_path = str(tmp_path / "float.onnx"), str(tmp_path / "quant.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, calibration(1)[0], float_path, input_names=["x"], dynamo=False, opset_version=17)
    quantize_static(float_path, quant_path, Calibration("x", SHAPE), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    opt = passes.optimize(quant_path, measure=False)
    stats = {p.name: p.stats for p in opt.report.passes}
    assert stats["fold-qdq"]["folded"] == 6 and stats["fuse-qconv-add"]["fused"] == 2
    assert "add" not in ops(opt.graph) and "conv2d" not in ops(opt.graph)
    session = ort.InferenceSession(quant_path, providers=["CPUExecutionProvider"])
    step = float(opt.graph.nodes[opt.graph.output_values()[0].node]["params"]["scale"])
    for seed in range(2):
        x = np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)
        ours = opt(x)
        np.testing.assert_array_equal(ours, run_reference(opt.graph, (torch.from_numpy(x),)).numpy())
        (expected,) = session.run(None, {"x": x})
        assert np.abs(ours - expected).max() <= step * (1 + 1e-3)  # measured: 1 step on ~13% of the outputs
