"""Integer kernels (qconv2d / qlinear): the compiled uint8 outputs equal the torch integer reference exactly, with
and without VNNI, and the VNNI build really issues vpdpbusd; dynamic linear layers match their reference."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm

from backends.tvm import build, qkernels
from backends.tvm import lower as lower_module
from backends.tvm.lower import lower
from backends.tvm.qkernels import QConvSpec
from backends.tvm.target import cpu_has
from frontend.torch_fx import from_torch
from passes.ir.graph import Graph, TensorType, Value
from passes.ir.interpret import run_reference
from passes.transforms.fuse_conv_activation import FuseConvActivation
from passes.transforms.quantization import fixed_point
from passes.transforms.quantize import Quantize
from tests.helpers import assert_outputs_close
from tests.passes.helpers import run_pass

pytestmark = pytest.mark.tvm

RNG = np.random.default_rng(0)
NO_VNNI = {"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2}  # AVX-512 without VNNI
AVX2 = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}  # vpmaddwd: runs on any AVX2 host (Zen 3 included)
GENERIC = {"kind": "llvm", "mcpu": "x86-64", "num-cores": 2}  # no AVX2: the generic widening multiply-add
VNNI_CPU = {"kind": "llvm", "mcpu": "icelake-server", "num-cores": 2}  # compile-only where the host has no VNNI
needs_avx2 = pytest.mark.skipif(not cpu_has("avx2"), reason="host CPU has no AVX2")
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


@needs_avx2
@pytest.mark.parametrize("case", CONVS, ids=lambda c: f"{c['in_shape']}->{c['out_channels']}k{c['kernel']}")
def test_qconv2d_is_exact_with_vpmaddwd(case):
    """The AVX2 kernel (int16 operands, vpmaddwd) on every shape, whatever the host's best instruction."""
    assert_exact(qconv_graph(**case), AVX2)


@pytest.mark.parametrize("case", CONVS[:3] + PACKED[:1], ids=lambda c: f"{c['in_shape']}->{c['out_channels']}")
def test_qconv2d_is_exact_on_a_generic_cpu(case):
    assert_exact(qconv_graph(**case), GENERIC)


def extreme_graph(in_dtype: str, channels: int = 64) -> tuple[Graph, np.ndarray]:
    """A 3x3 conv whose every product is extreme: inputs 0/255 (uint8) or -128/127 (int8), weights -128/127, and
    the first 16 output channels all 127 over an all-255 (127) corner, where each pair of products sums to
    2 x 255 x 127 = 64770: past int16, so a saturating u8 x s8 -> s16 step (vpmaddubsw) would be wrong there."""
    low, high = (0, 255) if in_dtype == "uint8" else (-128, 127)
    data = RNG.choice(np.array([low, high]), (1, channels, 10, 10)).astype(in_dtype)
    data[:, :, :5, :5] = high
    weight = RNG.choice(np.array([-128, 127]), (32, channels, 3, 3)).astype(np.int8)
    weight[:16] = 127
    reach = 255 * 128 * channels * 9  # |acc| bound; the multiplier maps +-reach onto the output range
    multiplier, shift = fixed_point(np.full(32, 120.0 / reach))
    g = Graph(name="extreme")
    x = g.add_input("x", TensorType(data.shape, in_dtype))
    attrs = {"input_zero_point": 0 if in_dtype == "int8" else 128, "output_zero_point": 128, "out_min": 0,
             "out_max": 255, "padding": (1, 1)}
    params = {"weight": weight, "bias": np.zeros(32, np.int32), "multiplier": multiplier, "shift": shift}
    g.set_outputs(g.add_op("qconv2d", [x], attrs=attrs, params=params))
    return g, data


@needs_avx2
@pytest.mark.parametrize("in_dtype", ["uint8", "int8"])
def test_extreme_values_do_not_saturate(in_dtype):
    graph, data = extreme_graph(in_dtype)
    expected = run_reference(graph, (torch.from_numpy(data),)).numpy()
    np.testing.assert_array_equal(build(graph, AVX2)(data), expected)
    assert len(np.unique(expected)) > 20 and expected[0, 0, 1, 1] > 128 + 50  # spread out; the corner is large


@needs_avx2
def test_requantize_is_exact_with_shifts_below_32():
    """Real multipliers >= 0.5 give shifts <= 31: the int64 requantization, not the int32 shortcut after >> 32."""
    g = qconv_graph((1, 4, 6, 7), 16, (1, 1))
    params = g.nodes[g.outputs.node]["params"]
    params["weight"] = RNG.integers(-3, 4, params["weight"].shape).astype(np.int8)
    params["bias"] = RNG.integers(-200, 200, 16).astype(np.int32)
    params["multiplier"], params["shift"] = fixed_point(RNG.uniform(0.05, 1.5, 16))
    assert params["shift"].min() < 32 <= params["shift"].max()
    assert_exact(g, AVX2)


def test_avx2_tiles_pad_rows_to_whole_tiles():
    def spec(width, **extra):
        return QConvSpec((1, 64, width, width), (64, 64, 3, 3), (1, 1), (1, 1), (1, 1), 0, 0, 0, 255,
                         instruction="vpmaddwd", **extra)

    assert [(spec(w).cols, spec(w).acc_width) for w in (56, 28, 14, 7, 1)] == [(6, 60), (6, 30), (5, 15), (4, 8),
                                                                              (1, 1)]
    assert spec(7, residual_zero_point=3, residual_layout="NHWC").cols == 4  # NHWC residual: padded tiles are fine
    assert spec(7, residual_zero_point=3, residual_layout="NCHW").cols == 1  # NCHW: whole tiles, as VNNI
    vnni = QConvSpec((1, 64, 7, 7), (64, 64, 3, 3), (1, 1), (1, 1), (1, 1), 0, 0, 0, 255, instruction="vpdpbusd")
    assert (vnni.cols, vnni.acc_width, vnni.depth, spec(7).depth) == (7, 7, 4, 2)


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


@pytest.mark.parametrize("target", ["llvm", pytest.param(NO_VNNI, marks=needs_avx512, id="no_vnni")],
                         ids=["vnni", "no_vnni"])
@pytest.mark.parametrize("in_shape, out_channels, groups",
                         [((1, 16, 9, 10), 32, 1), ((1, 16, 7, 7), 16, 4), ((2, 8, 6, 6), 6, 2)],
                         ids=["kernel", "grouped_kernel", "grouped_relax_path"])
def test_fused_residual_joins_the_requantization_exactly(in_shape, out_channels, groups, target):
    """``qconv2d(x, r)`` (``fuse-qconv-add``): (acc M + 2^(shift-1) + (r - z_r) R) >> shift, bit for bit in both
    lowerings (our kernel with its column-vectorized epilogue, grouped or not; Relax integer ops for grouped
    convs whose groups have 6 outputs)."""
    g = Graph(name="qconv_residual")
    x = g.add_input("x", TensorType(in_shape, "uint8"))
    out_shape = (in_shape[0], out_channels, *in_shape[2:])
    r = g.add_input("r", TensorType(out_shape, "uint8"))
    params = integer_params(out_channels, (out_channels, in_shape[1] // groups, 3, 3))
    params["residual_multiplier"] = np.round(0.7 * np.exp2(params["shift"])).astype(np.int64)  # s_r / s_y = 0.7
    attrs = {"input_zero_point": 37, "output_zero_point": 100, "out_min": 100, "out_max": 255, "groups": groups,
             "padding": (1, 1), "residual_zero_point": 120}
    g.set_outputs(g.add_op("qconv2d", [x, r], attrs=attrs, params=params))
    xs = [RNG.integers(0, 256, t.shape).astype(np.uint8) for t in g.input_types()]
    expected = run_reference(g, tuple(torch.from_numpy(a) for a in xs)).numpy()
    np.testing.assert_array_equal(build(g, target)(*xs), expected)
    assert 0.2 < np.mean((expected > 100) & (expected < 255))  # the clamp (a fused relu) does not hide the sum
    centered = run_reference(g, (torch.from_numpy(xs[0]), torch.full(out_shape, 120, dtype=torch.uint8))).numpy()
    assert np.mean(centered != expected) > 0.3  # the residual term really moves the outputs (the rest: clamped)


DEPTHWISE = [dict(in_shape=(1, 32, 9, 10), padding=(1, 1)),
             dict(in_shape=(2, 48, 11, 11), stride=(2, 2), padding=(1, 1)),
             dict(in_shape=(1, 20, 9, 9), kernel=(5, 5), padding=(4, 4), dilation=(2, 2)),  # 20: 4-lane vectors
             dict(in_shape=(1, 16, 8, 8), in_dtype="int8", input_zero_point=-5),
             # odd C: one-lane tiles, the channel loop vanishes (was "not enough values to unpack")
             dict(in_shape=(1, 3, 8, 8), padding=(1, 1)), dict(in_shape=(1, 15, 7, 9), padding=(1, 1)),
             dict(in_shape=(1, 5, 3, 1), padding=(1, 1))]  # and a one-column output


@pytest.mark.parametrize("case", DEPTHWISE, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_depthwise_kernel_is_exact(case):
    """Depthwise (groups = C = OC, MobileNet's 3x3 layers): our channel-vectorized kernel, not the Relax path."""
    case = dict(case)
    in_shape, kernel = case.pop("in_shape"), case.pop("kernel", (3, 3))
    graph = qconv_graph(in_shape, in_shape[1], kernel, groups=in_shape[1], **case)
    assert "qconv2d_depthwise_" in lower(graph, "llvm", cores=2)["main"].script()
    assert_exact(graph)


def test_depthwise_kernel_in_an_nhwc_chain():
    """1x1 -> depthwise -> 1x1 (a MobileNet block) keeps every intermediate NHWC, exactly."""
    g = Graph(name="block")
    x = g.add_input("x", TensorType((1, 8, 7, 7), "uint8"))
    attrs = {"input_zero_point": 5, "output_zero_point": 3, "out_min": 3, "out_max": 250}
    expand = g.add_op("qconv2d", [x], attrs=attrs, params=integer_params(32, (32, 8, 1, 1)), name="expand")
    depthwise = g.add_op("qconv2d", [expand], attrs=attrs | {"groups": 32, "padding": (1, 1)},
                         params=integer_params(32, (32, 1, 3, 3)), name="depthwise")
    g.set_outputs(g.add_op("qconv2d", [depthwise], attrs=attrs, params=integer_params(16, (16, 32, 1, 1)),
                           name="project"))
    assert lower_module.nhwc_values(g, "llvm") == {Value("expand", 0), Value("depthwise", 0)}
    data = RNG.integers(0, 256, (1, 8, 7, 7)).astype(np.uint8)
    np.testing.assert_array_equal(build(g, "llvm")(data), run_reference(g, (torch.from_numpy(data),)).numpy())


def test_integer_convs_hand_each_other_nhwc_tensors_exactly():
    """Between two of our integer kernels the tensor is NHWC (no transposes); where anything else reads it (a
    grouped conv's Relax path, a dequantize, the graph output) it stays NCHW. Results equal the reference."""
    g = Graph(name="chain")
    x = g.add_input("x", TensorType((1, 8, 7, 9), "uint8"))
    attrs = {"input_zero_point": 5, "output_zero_point": 3, "out_min": 3, "out_max": 250, "padding": (1, 1)}
    a = g.add_op("qconv2d", [x], attrs=attrs, params=integer_params(16, (16, 8, 3, 3)), name="a")
    b = g.add_op("qconv2d", [a], attrs=attrs, params=integer_params(16, (16, 16, 3, 3)), name="b")
    residual_params = integer_params(16, (16, 16, 3, 3)) | {"residual_multiplier": np.full(16, 2 ** 40, np.int64)}
    c = g.add_op("qconv2d", [b, a], attrs=attrs | {"residual_zero_point": 3}, params=residual_params, name="c")
    grouped = g.add_op("qconv2d", [c], attrs=attrs | {"groups": 2}, params=integer_params(12, (12, 8, 3, 3)),
                       name="grouped")  # 6 outputs per group: not ``groups_fit``, the Relax path
    g.set_outputs((grouped, b))
    assert lower_module.nhwc_values(g, "llvm") == {Value("a", 0)}  # b is a graph output, c feeds a grouped conv
    assert lower_module.nhwc_values(g, "cuda") == frozenset()
    main = lower(g, "llvm", cores=2)["main"].script()
    assert 'R.Tensor((1, 7, 9, 16), dtype="uint8")' in main and "permute_dims" not in main
    data = RNG.integers(0, 256, (1, 8, 7, 9)).astype(np.uint8)
    expected = run_reference(g, (torch.from_numpy(data),))
    for actual, want in zip(build(g, "llvm")(data), expected):
        np.testing.assert_array_equal(actual, want.numpy())


@pytest.mark.parametrize("target", ["llvm", pytest.param(NO_VNNI, marks=needs_avx512)], ids=["vnni", "no_vnni"])
@pytest.mark.parametrize("out_dtype", ["uint8", "int8"])
def test_int8_activations_are_exact_too(out_dtype, target):
    """Signed activations (ONNX Runtime's default QInt8): the kernel stores x + 128 while padding, so vpdpbusd's
    unsigned operand sees the same x - z_x; int8 outputs clamp to [-128, 127]."""
    clamp = {"output_zero_point": -11, "out_min": -11, "out_max": 110} if out_dtype == "int8" else {}
    graph = qconv_graph((1, 8, 6, 6), 16, (3, 3), in_dtype="int8", padding=(1, 1), input_zero_point=-3,
                        out_dtype=out_dtype, **clamp)
    data = RNG.integers(-128, 128, (1, 8, 6, 6)).astype(np.int8)
    expected = run_reference(graph, (torch.from_numpy(data),)).numpy()
    actual = build(graph, target)(data)
    assert actual.dtype == np.dtype(out_dtype)
    np.testing.assert_array_equal(actual, expected)
    low, high = (-11, 110) if out_dtype == "int8" else (11, 240)
    assert 0.3 < np.mean((expected > low) & (expected < high))  # not all clamped


GROUPED = [
    dict(in_shape=(1, 8, 9, 9), out_channels=32, groups=2, padding=(1, 1)),       # 16 outputs per group: one block
    dict(in_shape=(1, 32, 10, 10), out_channels=32, groups=8, stride=(2, 2), padding=(1, 1)),  # ResNeXt's 4 x 4
    dict(in_shape=(1, 6, 7, 7), out_channels=6, groups=3, padding=(1, 1)),  # 2 per group: a window past C
    dict(in_shape=(1, 6, 8, 8), out_channels=64, groups=2, kernel=(1, 1)),  # 32 per group, 3 inputs (odd base)
    dict(in_shape=(2, 20, 6, 7), out_channels=32, groups=4, padding=(1, 1)),  # 8 outputs of 5 inputs per group
    dict(in_shape=(1, 8, 6, 6), out_channels=16, groups=8, padding=(1, 1), in_dtype="int8", input_zero_point=-5),
]


@pytest.mark.parametrize("target", [pytest.param(AVX2, marks=needs_avx2, id="vpmaddwd"),
                                    pytest.param(GENERIC, id="generic"),
                                    pytest.param(VNNI_CPU, id="vnni")])
@pytest.mark.parametrize("case", GROUPED, ids=lambda c: f"{c['in_shape']}->{c['out_channels']}g{c['groups']}")
def test_grouped_qconv2d_is_our_kernel_and_exact(case, target):
    """Grouped convs whose groups have a multiple or a divisor of 16 outputs: each 16-channel output block reduces
    over its own groups' inputs only (block-diagonal packing), bit for bit the integer reference."""
    case = dict(case)
    graph = qconv_graph(case.pop("in_shape"), case.pop("out_channels"), case.pop("kernel", (3, 3)), **case)
    main = lower(graph, target, cores=2)["main"].script()
    assert "R.call_tir(qconv2d_" in main and "R.nn.conv2d" not in main
    if target is VNNI_CPU and not cpu_has("avx512vnni"):  # compile only: the windows tensorize to vpdpbusd
        assert "vpdpbusd" in assembly(graph, target)
        return
    assert_exact(graph, target)


def test_grouped_pack_places_each_group_in_its_blocks_window():
    """16 outputs in groups of 4 over 4 inputs each: block 0 reads inputs 0-15, and output o's weights sit at
    its group's offset in that window (zeros elsewhere); 32 outputs per group: a block reads only its group."""
    spec = QConvSpec((1, 32, 5, 5), (32, 4, 1, 1), (1, 1), (0, 0), (1, 1), 0, 0, 0, 255, groups=8)
    assert spec.block_channels == 16 and spec.channel_base(1) == 16
    weight = RNG.integers(-127, 128, (32, 4, 1, 1)).astype(np.int8)
    packed = spec.pack_weight(weight)  # (OC/16, KH, KW, steps, 16, depth=4)
    window = packed[0, 0, 0].transpose(1, 0, 2).reshape(16, 16)  # (output, input channel of the window)
    for o in range(16):
        expected = np.zeros(16, np.int8)
        expected[o // 4 * 4:o // 4 * 4 + 4] = weight[o, :, 0, 0]
        np.testing.assert_array_equal(window[o], expected)
    wide = QConvSpec((1, 6, 5, 5), (64, 3, 1, 1), (1, 1), (0, 0), (1, 1), 0, 0, 0, 255, groups=2)
    assert wide.block_channels == 3 and [wide.channel_base(b) for b in range(4)] == [0, 0, 3, 3]


def test_grouped_qconv2d_outside_groups_fit_takes_the_relax_integer_path_exactly():
    """6 outputs per group (neither a multiple nor a divisor of 16): Relax integer ops, still exact."""
    assert not qkernels.groups_fit(8, 12, 2) and qkernels.groups_fit(8, 16, 4) and qkernels.groups_fit(8, 64, 2)
    graph = qconv_graph((1, 8, 6, 6), 12, (3, 3), groups=2, padding=(1, 1))
    assert "R.nn.conv2d" in lower(graph, "llvm", cores=2)["main"].script()
    assert_exact(graph)


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


def assembly(graph: Graph, target) -> str:
    """The assembly of ``graph`` built for ``target`` (which need not be able to run here)."""
    executable = tvm.compile(lower(graph, target), target=tvm.target.Target(target))
    return "".join(m.inspect_source("asm") for m in executable.mod.imports)


def test_each_cpu_gets_its_integer_instruction():
    """vpdpbusd with VNNI (compiled only: this host may lack it), vpmaddwd on AVX2 with no per-byte widening to
    int32 nor 32-bit multiply anywhere in the kernel (the input is widened once, to int16, while padding), and
    neither on a CPU without AVX2."""
    graph = qconv_graph((1, 16, 8, 8), 16, (3, 3), padding=(1, 1))
    vnni, avx2, generic = (assembly(graph, target) for target in (VNNI_CPU, AVX2, GENERIC))
    assert "vpdpbusd" in vnni and "vpmaddwd" not in vnni
    assert "vpmaddwd" in avx2 and "vpdpbusd" not in avx2
    assert not re.search(r"\b(vpmulld|vpmovzxbd|vpmovsxbd)\b", avx2)
    assert "vpmaddwd" not in generic and "vpdpbusd" not in generic


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


# ------------------------------------------------------------------------------ dynamic int8 LSTM / GRU / RNN
class InitialState(torch.nn.Module):
    """A 2-layer bidirectional RNN run from given initial states (h0 beyond [-1, 1]: the per-step scale of h must
    follow it), hidden 18: gate rows (72, 54, 18) and hidden units pad to the kernel's 16 x 4 layout."""

    def __init__(self, cell, **kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = cell(10, 18, 2, batch_first=True, bidirectional=True, **kwargs)

    def forward(self, x, *state):
        return self.rnn(x, state if len(state) > 1 else state[0])


def dynamic_recurrent_graph(cell, **kwargs) -> tuple[Graph, tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 9, 10, generator=generator)
    states = [torch.randn(4, 3, 18, generator=generator) * 2 for _ in range(2 if cell is torch.nn.LSTM else 1)]
    graph = from_torch(InitialState(cell, **kwargs).eval(), (x, *states))
    run_pass(Quantize(mode="dynamic"), graph)
    return graph, (x, *states)


def flat(outputs) -> list:
    return [t for o in outputs for t in (flat(o) if isinstance(o, (tuple, list)) else [o])]


@needs_avx512
@pytest.mark.parametrize("target", ["llvm", NO_VNNI], ids=["vnni", "no_vnni"])
@pytest.mark.parametrize("cell, kwargs", [(torch.nn.LSTM, {}), (torch.nn.GRU, {}), (torch.nn.RNN, {}),
                                          (torch.nn.RNN, {"nonlinearity": "relu"})],
                         ids=["lstm", "gru", "rnn", "rnn_relu"])
def test_dynamic_recurrent_kernel_matches_the_integer_reference(cell, kwargs, target):
    """Compiled vs ``qlstm_dynamic``... reference: the integer sums are exact and the float scaling follows the
    reference's operation order, so what differs is only the gates' rational tanh/sigmoid (a few ulp; measured
    <= 2e-7). A few-ulp difference in h could flip one rounding of h's per-step quantization (probability about
    ulp / s_h per element, ~1e-5), which would move that step's gates by s_h * |W_hh| ~ 1e-3: none happens on
    this seeded input, so the bound stays at float rounding and a wrong sum, scale or zero point shows."""
    graph, inputs = dynamic_recurrent_graph(cell, **kwargs)
    expected, actual = flat(run_reference(graph, inputs)), flat(build(graph, target)(*inputs))
    assert len(expected) == len(actual) == (3 if cell is torch.nn.LSTM else 2)
    for e, a in zip(expected, actual):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=0, atol=2e-6)


@needs_vnni
def test_dynamic_int8_recurrent_and_projection_kernels_issue_vpdpbusd():
    """The recurrent product and the input projection are integer: vpdpbusd (u8 x s8 -> int32) in both
    functions' code; without VNNI none (the widening multiply-add fallback)."""
    graph, _ = dynamic_recurrent_graph(torch.nn.LSTM)

    def functions(target) -> dict[str, str]:
        """The assembly of every function (with its parallel bodies) named after each kernel."""
        asm = "".join(m.inspect_source("asm") for m in build(graph, target).executable.mod.imports)
        labels = [(m.start(), m.group(1)) for m in re.finditer(r"^([A-Za-z_][\w.]*):", asm, re.M)]
        bodies = dict.fromkeys(("lstm_int8_", "dense_int8_"), "")
        for (start, label), (end, _) in zip(labels, labels[1:] + [(len(asm), "")]):
            for prefix in bodies:
                if prefix in label:
                    bodies[prefix] += asm[start:end]
        return bodies

    for name, body in functions("llvm").items():
        assert body and "vpdpbusd" in body, name
    assert all("vpdpbusd" not in body for body in functions(NO_VNNI).values())


def test_dynamic_linear_kernel_is_exact_with_odd_sizes():
    """qlinear_dynamic through the int8 dense kernel: 13 inputs (q padded to 16 bytes), 21 outputs (padded to
    32 and sliced), 5 rows. The integer sums are exact; LLVM contracts acc * scale + bias into one FMA (one
    rounding where torch rounds twice), so the outputs agree to an ulp of the largest output, not bit for bit."""
    g = Graph(name="qlinear_dynamic")
    x = g.add_input("x", TensorType((5, 13)))
    g.set_outputs(g.add_op("qlinear_dynamic", [x], params={
        "weight": RNG.integers(-127, 128, (21, 13)).astype(np.int8),
        "weight_scale": RNG.uniform(1e-3, 1e-2, 21).astype(np.float32),
        "bias": RNG.standard_normal(21).astype(np.float32)}))
    batch = torch.randn(5, 13) * 3 - 1
    expected = run_reference(g, (batch,)).numpy()
    for target in ("llvm", NO_VNNI) if cpu_has("avx512f") else ("llvm",):  # NO_VNNI needs an AVX-512 host
        np.testing.assert_allclose(build(g, target)(batch).numpy(), expected, rtol=0,
                                   atol=np.spacing(np.abs(expected).max()))
