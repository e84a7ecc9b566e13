"""Integer kernels (qconv2d / qlinear): the compiled uint8 outputs equal the torch integer reference exactly, with
and without VNNI, and the VNNI build really issues vpdpbusd; dynamic linear layers match their reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.tvm import build, qkernels
from backends.tvm.lower import lower
from backends.tvm.qkernels import QConvSpec
from backends.tvm.target import cpu_has
from frontend.torch_fx import from_torch
from passes.ir.graph import Graph, TensorType
from passes.ir.interpret import run_reference
from passes.transforms.fuse_conv_activation import FuseConvActivation
from passes.transforms.quantize import Quantize, fixed_point
from tests.helpers import assert_outputs_close
from tests.passes.helpers import run_pass

pytestmark = pytest.mark.tvm

RNG = np.random.default_rng(0)
NO_VNNI = {"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2}  # AVX-512 without VNNI
needs_vnni = pytest.mark.skipif(not cpu_has("avx512vnni"), reason="host CPU has no VNNI")
needs_avx512 = pytest.mark.skipif(not cpu_has("avx512f"), reason="host CPU has no AVX-512")


def integer_params(out_channels: int, weight_shape: tuple[int, ...]) -> dict:
    multiplier, shift = fixed_point(RNG.uniform(2e-5, 2e-3, out_channels))
    return {"weight": RNG.integers(-127, 128, weight_shape).astype(np.int8),
            "bias": RNG.integers(-20_000, 20_000, out_channels).astype(np.int32),
            "multiplier": multiplier, "shift": shift}


def qconv_graph(in_shape, out_channels, kernel, groups=1, in_dtype="uint8", **attrs) -> Graph:
    g = Graph(name="qconv")
    x = g.add_input("x", TensorType(in_shape, in_dtype))
    weight_shape = (out_channels, in_shape[1] // groups, *kernel)
    attrs = {"input_zero_point": 37, "output_zero_point": 11, "out_min": 11, "out_max": 240, "groups": groups} | attrs
    g.set_outputs(g.add_op("qconv2d", [x], attrs=attrs, params=integer_params(out_channels, weight_shape)))
    return g


def qlinear_graph(in_shape, out_features) -> Graph:
    g = Graph(name="qlinear")
    x = g.add_input("x", TensorType(in_shape, "uint8"))
    g.set_outputs(g.add_op("qlinear", [x], attrs={"input_zero_point": 128, "output_zero_point": 128},
                           params=integer_params(out_features, (out_features, in_shape[-1]))))
    return g


def assert_exact(graph: Graph, target="llvm") -> None:
    dtype = np.dtype(graph.input_types()[0].dtype)
    info = np.iinfo(dtype)
    x = RNG.integers(info.min, info.max + 1, graph.input_types()[0].shape).astype(dtype)
    expected = run_reference(graph, (torch.from_numpy(x),)).numpy()
    actual = build(graph, target)(x)
    assert actual.dtype == np.uint8
    np.testing.assert_array_equal(actual, expected)
    assert 0 < np.mean((expected > 11) & (expected < 240))  # not all clamped: the arithmetic is exercised


CONVS = [
    dict(in_shape=(1, 3, 9, 9), out_channels=8, kernel=(3, 3), padding=(1, 1)),                 # C, OC padded
    dict(in_shape=(2, 16, 8, 8), out_channels=32, kernel=(3, 3), padding=(1, 1)),
    dict(in_shape=(1, 8, 11, 11), out_channels=20, kernel=(3, 3), stride=(2, 2), padding=(1, 1)),
    dict(in_shape=(1, 12, 10, 10), out_channels=16, kernel=(3, 3), dilation=(2, 2)),
    dict(in_shape=(1, 32, 7, 7), out_channels=16, kernel=(1, 1)),
    dict(in_shape=(1, 4, 12, 12), out_channels=8, kernel=(7, 5), stride=(2, 1), padding=(3, 2)),
    # width-packed reductions (C not a multiple of 4): an RGB stem, a 1-channel image, C = 5 with dilated rows
    dict(in_shape=(1, 3, 23, 21), out_channels=24, kernel=(7, 7), stride=(2, 2), padding=(3, 3)),
    dict(in_shape=(2, 1, 9, 10), out_channels=16, kernel=(3, 3), padding=(1, 1)),
    dict(in_shape=(1, 5, 10, 9), out_channels=16, kernel=(3, 3), stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
]
PACKED = CONVS[-3:]


@pytest.mark.parametrize("case", CONVS, ids=lambda c: f"{c['in_shape']}->{c['out_channels']}k{c['kernel']}")
def test_qconv2d_is_exact_with_vnni(case):
    assert_exact(qconv_graph(**case))


@needs_avx512
@pytest.mark.parametrize("case", CONVS[:3] + PACKED[:1], ids=lambda c: f"{c['in_shape']}->{c['out_channels']}")
def test_qconv2d_is_exact_without_vnni(case):
    assert_exact(qconv_graph(**case), NO_VNNI)


def test_width_packing_only_where_it_saves_steps():
    def spec(channels, kernel, dilation=(1, 1)):
        return QConvSpec((1, channels, 16, 16), (16, channels, *kernel), (1, 1), (1, 1), dilation, 0, 0, 0, 255)

    stem = spec(3, (7, 7))
    assert stem.packs_width and stem.reduction == (3, 1, 6)  # 7 x 6 steps per pixel instead of 7 x 7
    assert spec(1, (3, 3)).reduction == (1, 1, 1) and spec(5, (3, 3)).reduction == (5, 1, 4)
    assert not spec(3, (3, 3)).packs_width  # 3 x 3 steps either way
    assert not spec(8, (3, 3)).packs_width and spec(8, (3, 3)).reduction == (8, 3, 2)
    assert not spec(3, (7, 7), dilation=(1, 2)).packs_width  # dilated columns are not adjacent bytes
    for case in PACKED:
        graph_spec = QConvSpec(case["in_shape"], (case["out_channels"], case["in_shape"][1], *case["kernel"]),
                               case.get("stride", (1, 1)), case.get("padding", (0, 0)), case.get("dilation", (1, 1)),
                               0, 0, 0, 255)
        assert graph_spec.packs_width


@needs_avx512
@pytest.mark.parametrize("order", ["rows", "channels"])
@pytest.mark.parametrize("case", [CONVS[1], CONVS[2], CONVS[4], PACKED[0]],
                         ids=lambda c: f"{c['in_shape']}->{c['out_channels']}")
def test_both_loop_orders_are_exact(case, order, monkeypatch):
    monkeypatch.setattr(qkernels, "loop_order", lambda spec, cores: order)
    assert_exact(qconv_graph(**case))
    assert_exact(qconv_graph(**case), NO_VNNI)


def test_loop_order_is_weight_stationary_only_where_rows_are_few():
    def order(in_shape, out_channels, stride=1, cores=2):
        spec = QConvSpec(in_shape, (out_channels, in_shape[1], 3, 3), (stride, stride), (1, 1), (1, 1), 0, 0, 0, 255)
        return qkernels.loop_order(spec, cores)

    assert order((1, 64, 56, 56), 64) == order((1, 256, 14, 14), 256) == "rows"
    assert order((1, 512, 7, 7), 512) == order((1, 256, 14, 14), 512, stride=2) == "channels"  # 7 rows on 2 cores
    assert order((2, 512, 7, 7), 512) == "rows" and order((1, 512, 7, 7), 512, cores=1) == "rows"


POOLS = [dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)),              # ResNet's stem pool
         dict(kernel_size=(2, 2), stride=(2, 2)),
         dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
         dict(kernel_size=(3, 3), stride=(2, 2), ceil_mode=True)]                  # overhanging last window


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("attrs", POOLS, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
def test_integer_max_pool_is_our_kernel_and_exact(dtype, attrs):
    g = Graph(name="pool")
    x = g.add_input("x", TensorType((2, 5, 11, 12), dtype))
    g.set_outputs(g.add_op("max_pool2d", [x], attrs=attrs))
    info = np.iinfo(dtype)
    data = RNG.integers(info.min, info.max + 1, (2, 5, 11, 12)).astype(dtype)
    data[0, 0] = info.min  # a plane of the dtype's minimum: padding must not leak a wrong value into it
    expected = torch.nn.functional.max_pool2d(torch.from_numpy(data).float(), **attrs).numpy().astype(dtype)
    module = build(g, "llvm")
    actual = module(data)
    assert actual.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(actual, expected)
    np.testing.assert_array_equal(run_reference(g, (torch.from_numpy(data),)).numpy(), expected)
    main = lower(g, "llvm", cores=2)["main"].script()
    assert "R.call_tir(max_pool2d_" in main and "float32" not in main  # our kernel, no detour through float


def test_int8_activations_are_exact_too():  # signed inputs (an imported model's choice) skip vpdpbusd
    assert_exact(qconv_graph((1, 8, 6, 6), 16, (3, 3), in_dtype="int8", padding=(1, 1), input_zero_point=-3))


def test_grouped_qconv2d_takes_the_relax_integer_path_exactly():
    assert_exact(qconv_graph((1, 8, 6, 6), 8, (3, 3), groups=8, padding=(1, 1)))
    assert_exact(qconv_graph((1, 8, 6, 6), 12, (3, 3), groups=2, padding=(1, 1)))


@needs_avx512
@pytest.mark.parametrize("in_shape, out_features", [((4, 64), 10), ((3, 5, 30), 17), ((1, 256), 48)])
def test_qlinear_is_exact(in_shape, out_features):
    assert_exact(qlinear_graph(in_shape, out_features))
    assert_exact(qlinear_graph(in_shape, out_features), NO_VNNI)


@needs_vnni
def test_vnni_build_issues_vpdpbusd_and_the_fallback_does_not():
    def assembly(target) -> str:
        executable = build(qconv_graph((1, 16, 8, 8), 16, (3, 3), padding=(1, 1)), target).executable
        return "".join(m.inspect_source("asm") for m in executable.mod.imports)

    assert "vpdpbusd" in assembly("llvm")
    assert "vpdpbusd" not in assembly(NO_VNNI)


def test_dynamic_linear_matches_the_reference_with_run_time_scales():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).eval()
    x = torch.randn(6, 48)
    graph = from_torch(model, (x,))
    run_pass(FuseConvActivation(), graph)
    run_pass(Quantize(mode="dynamic"), graph)
    compiled = build(graph, "llvm")
    for scale in (1.0, 30.0):  # the scale is taken at run time: a 30x larger input is no harder
        batch = torch.randn(6, 48) * scale
        assert_outputs_close(run_reference(graph, (batch,)), compiled(batch))
