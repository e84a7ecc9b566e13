"""Our conv2d[+pool] TIR kernels: numerics against PyTorch, the fused kernel's TIR, and its CUDA build."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import tvm
from torch import nn

from backends.tvm import build, cuda_source
from backends.tvm.kernels import (
    RESIDENT_BYTES,
    ConvSpec,
    Tile,
    ceil_to,
    compacted_buffers,
    conv_kernel,
    default_dense_tile,
    default_tile,
    dense_spec,
    resident_weights,
    rows_first,
)
from backends.tvm.lower import lower
from frontend.torch_fx import from_torch
from passes.core.pass_base import PassContext
from passes.core.pipeline import Pipeline, resolve
from tests.helpers import assert_nvcc_accepts, assert_outputs_close

pytestmark = pytest.mark.tvm

FUSE = "fuse-conv-activation,fuse-conv-pool"


def compile_and_compare(model: nn.Module, x: torch.Tensor, passes: str = FUSE, expect_op: str | None = None):
    graph = from_torch(model.eval(), (x,))
    Pipeline(resolve(passes)).run(graph, PassContext())
    if expect_op:
        assert expect_op in [d["op"] for _, d in graph.nodes(data=True)]
    with torch.no_grad():
        assert_outputs_close(model(x), build(graph, "llvm")(x))
    return graph


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, stride=2, bias=False), nn.Conv2d(8, 8, 3, groups=8, padding=1),
    nn.Conv2d(8, 12, 3, groups=4, dilation=2, padding=2), nn.Conv2d(5, 7, (1, 3), padding=(0, 1)),
    nn.Conv2d(6, 10, 1), nn.Conv2d(3, 5, 5, stride=3, padding=2),
    # channel-vectorized schedule (groups=1, OC % 8 == 0, short rows or 1x1): 8/16/32-channel blocks
    nn.Conv2d(12, 32, 1), nn.Conv2d(12, 64, 3, padding=1), nn.Conv2d(16, 48, 1, stride=2), nn.Conv2d(5, 24, 3),
], ids=repr)
def test_conv_kernel_matches_pytorch(conv):
    compile_and_compare(conv, torch.randn(1, conv.in_channels, 13, 11), passes="")


@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.1), nn.ELU(), nn.GELU(), nn.GELU("tanh"),
                                 nn.SiLU(), nn.Mish(), nn.Sigmoid(), nn.Tanh(), nn.Hardswish(), nn.Hardsigmoid(),
                                 nn.Hardtanh(-1.0, 2.0)], ids=repr)
def test_fused_activation_epilogues(act):
    compile_and_compare(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), act), torch.randn(1, 3, 9, 9) * 3)


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.AvgPool2d(2), nn.MaxPool2d(3), nn.AvgPool2d((2, 3))],
                         ids=repr)
def test_conv_pool_kernel_matches_pytorch(pool):
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), pool)
    compile_and_compare(model, torch.randn(1, 4, 18, 18), expect_op="conv2d_pool")


@pytest.mark.parametrize("conv, pool", [
    (nn.Conv2d(8, 32, 3, padding=1), nn.MaxPool2d(2)),    # channel-vectorized (rows of 10 < 16) + pool
    (nn.Conv2d(8, 64, 1), nn.AvgPool2d(2)),
    (nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.MaxPool2d(2)),
], ids=repr)
def test_conv_pool_both_schedules(conv, pool):
    compile_and_compare(nn.Sequential(conv, nn.ReLU(), pool), torch.randn(1, conv.in_channels, 10, 10),
                        expect_op="conv2d_pool")


@pytest.mark.parametrize("layers, shape", [
    ((nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(3, 2, 1)), (1, 3, 46, 38)),
    ((nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.MaxPool2d(3, 2, 1, ceil_mode=True)), (1, 4, 17, 20)),
    ((nn.Conv2d(8, 32, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(3, 2, ceil_mode=True)), (1, 8, 12, 12)),
    ((nn.Conv2d(4, 8, 3, padding=1), nn.Tanh(), nn.AvgPool2d(3, 2)), (1, 4, 21, 19)),
    ((nn.Conv2d(4, 8, 3, padding=1), nn.ReLU6(), nn.MaxPool2d(3, 1, 1)), (1, 4, 13, 9)),
], ids=repr)
def test_overlapping_padded_ceil_mode_windows(layers, shape):
    """Windows that share conv outputs, -inf padding, partial ceil-mode windows; both activation placements."""
    model = nn.Sequential(*layers).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.uniform_(-1.0, 1.0)
    compile_and_compare(model, torch.randn(*shape), passes="fuse-conv-pool", expect_op="conv2d_pool")


@pytest.mark.parametrize("layers, expect_op", [
    ((nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 1, bias=False), nn.AvgPool2d(2)), "avg_pool2d"),  # transition
    ((nn.Conv2d(8, 16, 3, padding=1), nn.AvgPool2d(2)), "conv2d"),  # one 4x4/2 conv
], ids=repr)
def test_folded_conv_avg_pool_through_tvm(layers, expect_op):
    """fold-conv-avg-pool in the default pipeline: the rewritten graph compiles and matches PyTorch."""
    graph = compile_and_compare(nn.Sequential(*layers).eval(), torch.randn(1, 8, 14, 14), passes="default",
                                expect_op=expect_op)
    assert "conv2d_pool" not in [d["op"] for _, d in graph.nodes(data=True)]


@pytest.mark.parametrize("m, k, n, act", [(1, 64, 10, nn.Identity()), (5, 33, 48, nn.ReLU()), (2, 7, 3, nn.Tanh()),
                                          (40, 128, 96, nn.SiLU()), (1, 1, 1, nn.Identity()),  # every loop unit
                                          (3, 1, 1, nn.ReLU())], ids=str)
def test_dense_kernel_matches_pytorch(m, k, n, act):
    compile_and_compare(nn.Sequential(nn.Linear(k, n), act), torch.randn(m, k))


@pytest.mark.parametrize("m, k, n, lanes, tile", [
    (1, 512, 1000, 16, Tile(1, 1, 8)),      # torchvision's classifiers: whole 8-lane vectors, not 25 = 16 + 9
    (1, 25088, 4096, 16, Tile(1, 1, 32)),   # VGG: two zmm vectors
    (4, 64, 96, 8, Tile(1, 4, 16)),         # AVX2: two ymm vectors
    (1, 64, 10, 16, Tile(1, 1, 10)),        # no multiple of 8 divides 10: the widest divisor
], ids=str)
def test_default_dense_tile_is_made_of_whole_vectors(m, k, n, lanes, tile):
    assert default_dense_tile(dense_spec((m, k), (n, k), True, lanes=lanes)) == tile


def test_conv_pool_is_one_primfunc_without_a_full_conv_buffer():
    # 12 output channels fill no vector: no blocked conv (``test_blocked_conv_then_pool``), the fused kernel
    model = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)).eval()
    graph = compile_and_compare(model, torch.randn(1, 8, 32, 32), expect_op="conv2d_pool")
    prim_funcs = [gv.name_hint for gv, f in lower(graph).functions.items() if gv.name_hint != "main"]
    assert len(prim_funcs) == 1 and prim_funcs[0].startswith("conv2d_pool_")

    specs = []
    for out_channels, width in ((16, 32), (32, 12)):  # column-vectorized and channel-vectorized schedules
        specs.append(ConvSpec(in_shape=(1, 8, 32, width), weight_shape=(out_channels, 8, 3, 3), stride=(1, 1),
                              padding=(1, 1), dilation=(1, 1), groups=1, has_bias=True, activation="relu",
                              pool="max", pool_kernel=(2, 2), pool_stride=(2, 2)))
    for spec in specs:
        for target in ("llvm", "cuda"):
            buffers = compacted_buffers(conv_kernel(spec, target))
            conv_buffers = [(shape, scope) for name, shape, scope in buffers if name.startswith("conv")]
            full = math.prod(spec.conv_shape)
            # the conv output exists only as a small local tile, never at full size
            assert conv_buffers and all(scope == "local" and math.prod(shape) <= 512 < full
                                        for shape, scope in conv_buffers), buffers
            assert all(math.prod(shape) < full for name, shape, _ in buffers if name != "pad"), buffers


def test_overlapping_windows_compute_each_band_of_conv_rows_once():
    """The ResNet stem's 3x3/2 padded windows: per task 16 channels x 8 pooled rows, whose windows read 17 conv rows
    (16 + one halo row shared with the next band, and a -inf row above the first), all 32 columns, channels-last;
    the conv is accumulated in a register tile of 4 pixels x one channel vector and never exists at full size."""
    stem = ConvSpec(in_shape=(1, 3, 64, 64), weight_shape=(16, 3, 7, 7), stride=(2, 2), padding=(3, 3),
                    dilation=(1, 1), groups=1, has_bias=True, activation="relu", pool="max", pool_kernel=(3, 3),
                    pool_stride=(2, 2), pool_padding=(1, 1))
    assert stem.banded and stem.channels_vectorized
    assert stem.conv_shape == (1, 16, 32, 32) and stem.out_shape == (1, 16, 16, 16)
    buffers = {name: (shape, scope) for name, shape, scope in compacted_buffers(conv_kernel(stem, "llvm"))}
    assert buffers["conv"] == ((1, 17, 32, 16), "global")  # the band: 17 conv rows per 8 pooled rows
    assert buffers["conv_global_local"] == ((1, 1, 4, 16), "local")  # the register tile
    assert buffers["pool_local"] == ((1, 16, 8, 16), "local")


@pytest.mark.cuda
def test_conv_pool_builds_for_cuda_and_nvcc_accepts_it(tmp_path):
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2)).eval()
    graph = from_torch(model, (torch.randn(1, 8, 16, 16),))
    Pipeline(resolve(FUSE)).run(graph, PassContext())
    source = cuda_source(build(graph, "cuda"))
    assert "conv2d_pool_" in source
    assert_nvcc_accepts(source, tmp_path)


def test_fast_tanh_and_sigmoid_are_accurate_to_a_few_ulp():
    import numpy as np
    import tvm
    from tvm import te

    from backends.tvm.kernels import fast_sigmoid, fast_tanh

    n = 40001
    a = te.placeholder((n,), name="a")
    t = te.compute((n,), lambda i: fast_tanh(a[i]), name="t")
    s = te.compute((n,), lambda i: fast_sigmoid(a[i]), name="s")
    lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([a, t, s]).with_attr("global_symbol", "main")}),
                      target="llvm")
    x = np.linspace(-40, 40, n).astype(np.float32)
    out = [tvm.runtime.empty((n,), "float32") for _ in range(2)]
    lib["main"](tvm.runtime.tensor(x), *out)
    exact = x.astype(np.float64)
    assert np.abs(out[0].numpy() - np.tanh(exact)).max() < 4e-7
    assert np.abs(out[1].numpy() - 1 / (1 + np.exp(-exact))).max() < 2e-7


# ------------------------------------------------------------------ blocked (NCHWc) direct conv, dense and depthwise
def _spec_of(conv: nn.Conv2d, hw: tuple[int, int], lanes: int = 8, **kw) -> ConvSpec:
    return ConvSpec(in_shape=(1, conv.in_channels, *hw), weight_shape=tuple(conv.weight.shape), stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                    has_bias=conv.bias is not None, lanes=lanes, **kw)


@pytest.mark.parametrize("conv, hw", [
    (nn.Conv2d(3, 8, 3, padding=1), (13, 11)),                           # 3 input channels: blocks of 3
    (nn.Conv2d(7, 16, 5, stride=2, padding=2), (13, 11)),                # blocks of 7, 5x5 stride 2
    (nn.Conv2d(5, 24, 3, dilation=2, padding=2, bias=False), (13, 11)),  # dilated, three channel vectors
    (nn.Conv2d(40, 16, 1), (1, 1)),                                      # 1x1 conv on a 1x1 map: reads NCHW
    (nn.Conv2d(16, 32, 1, stride=2), (9, 9)),                            # strided 1x1 (a ResNet downsample)
    (nn.Conv2d(12, 24, 1), (7, 7)),                                      # flat pixels: 49 computed as 13 x 4
    (nn.Conv2d(20, 16, 1, bias=False), (5, 3)),                          # flat pixels: 2 vectors x 5 pixels
    (nn.Conv2d(24, 24, 3, groups=24, padding=1), (13, 11)),              # depthwise
    (nn.Conv2d(16, 16, 3, groups=16, stride=2, padding=1), (14, 9)),     # depthwise stride 2
    (nn.Conv2d(8, 8, 5, groups=8, dilation=2, padding=4, bias=False), (7, 5)),  # depthwise 5x5 dilated
], ids=repr)
def test_blocked_conv_matches_pytorch(conv, hw):
    assert _spec_of(conv, hw).blocked
    compile_and_compare(conv, torch.randn(1, conv.in_channels, *hw), passes="")


def test_blocked_conv_batch_of_three_matches_pytorch():
    for conv in (nn.Conv2d(6, 16, 3, padding=1), nn.Conv2d(16, 16, 3, groups=16, padding=1)):
        compile_and_compare(conv, torch.randn(3, conv.in_channels, 9, 10), passes="")


@pytest.mark.parametrize("pool, fused", [(nn.MaxPool2d((2, 21)), False), (nn.AvgPool2d((1, 21)), False),
                                         (nn.MaxPool2d(3, 2, 1), True)], ids=repr)
def test_blocked_conv_then_pool(pool, fused):
    """conv2d_pool with windows that tile the conv output but whose rows exceed the blocked kernel's register tile
    (21 pixels; ``tests/backends/test_blocked_conv_pool.py`` for the pool in its epilogue): the blocked conv, then
    the pool as a Relax op (two PrimFuncs); overlapping windows stay one fused (banded) kernel."""
    model = nn.Sequential(nn.Conv2d(6, 16, 3, padding=1), nn.ReLU(), pool).eval()
    graph = compile_and_compare(model, torch.randn(1, 6, 12, 45), expect_op="conv2d_pool")
    mod = lower(graph)
    (name,) = [gv.name_hint for gv in mod.functions if gv.name_hint != "main"]
    assert name.startswith("conv2d_pool_" if fused else "conv2d_n")
    assert ("R.nn.max_pool2d" in mod["main"].script() or "R.nn.avg_pool2d" in mod["main"].script()) != fused


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x) + x)


def test_blocked_conv_with_fused_residual_matches_pytorch():
    graph = compile_and_compare(_Residual(), torch.randn(1, 16, 10, 6), passes="fuse-conv-add")
    (node,) = graph.op_nodes("conv2d")
    assert len(graph.operands(node)) == 2  # the residual is the kernel's second input


@pytest.mark.parametrize("conv, hw, pad, acc", [
    # 64 -> 64 3x3 (ResNet-18 layer 1): input packed to 8-channel blocks with its zero border (and 4 more zero
    # columns: 56 = 9 x 6 + 2 pixels); resident weights: per task 2 channel vectors x 8 rows x 56 columns of
    # accumulators (28 KB, L1), filled register tile by register tile (2 vectors x 6 pixels), written NCHW
    (nn.Conv2d(64, 64, 3, padding=1), (56, 56), (1, 8, 58, 62, 8), ("conv", (1, 2, 8, 56, 8), "global")),
    # unpadded 1x1: no copy of the input; its register tile (3 vectors x 4 pixels) holds its whole reduction
    (nn.Conv2d(24, 144, 1), (56, 56), None, ("conv_local", (1, 3, 1, 4, 8), "local")),
    (nn.Conv2d(144, 144, 3, groups=144, padding=1), (56, 56), (1, 18, 58, 58, 8),  # depthwise
     ("conv_local", (1, 1, 1, 8, 8), "local")),
], ids=["3x3", "1x1", "depthwise"])
def test_blocked_conv_buffers(conv, hw, pad, acc):
    spec = _spec_of(conv, hw, activation="relu")
    buffers = {name: (shape, scope) for name, shape, scope in compacted_buffers(conv_kernel(spec, "llvm"))}
    assert buffers.pop(acc[0]) == acc[1:]
    assert buffers == ({"pad": (pad, "global")} if pad else {})
    v, icb = spec.oc_vector, spec.ic_block
    oc, c, kh, kw = spec.weight_shape
    packed = spec.pack_weight(conv.weight.detach().numpy())
    assert packed.shape == (oc // v, c // icb, kh, kw, icb, v)
    # weight[o, i, y, x] sits at [o / v, i / icb, y, x, i % icb, o % v]
    assert packed[1, 0, kh - 1, 0, 0, 3] == conv.weight[v + 3, 0, kh - 1, 0]


ACTIVATIONS = {"none": lambda t: t, "relu": torch.relu, "relu6": lambda t: t.clamp(0, 6)}


def _run_kernel(spec: ConvSpec, tile: Tile, *arrays) -> np.ndarray:
    """``spec``'s kernel built alone with ``tile`` (weight packed as the lowering packs it), run on numpy arrays
    (data, weight, bias, residual: in the spec's layouts)."""
    func = conv_kernel(spec, "llvm", tile).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    data, weight, *rest = arrays
    args = [tvm.runtime.tensor(a) for a in (data, spec.pack_weight(weight), *rest)]
    out = tvm.runtime.empty(spec.stored_shape, spec.dtype)
    lib["main"](*args, out)
    return out.numpy()


@pytest.mark.parametrize("conv, hw, kw, tile", [
    (nn.Conv2d(24, 16, 3, padding=1), (13, 11), {}, Tile(16, 1, 4, task_rows=13)),  # 11 = 2 x 4 + 3 columns
    (nn.Conv2d(16, 32, 3, padding=1), (12, 10), {}, Tile(16, 2, 5, task_rows=4)),   # 2-row tiles, 3 bands
    (nn.Conv2d(8, 24, 3, stride=2, padding=1), (15, 9), {}, Tile(24, 1, 5, task_rows=8)),
    (nn.Conv2d(16, 16, 3, padding=1), (7, 7), {"in_block": 8, "out_block": 8, "residual": True,
                                                "activation": "relu"}, Tile(16, 1, 7, task_rows=7)),
    (nn.Conv2d(16, 32, 1, stride=2), (9, 9), {"activation": "relu6"}, Tile(16, 1, 5, task_rows=5)),
    (nn.Conv2d(16, 32, 3, padding=1), (7, 7), {"in_block": 8, "out_block": 8}, Tile(32, 1, 7, task_rows=7)),  # 4 x 7
], ids=repr)
def test_resident_weights_are_bit_identical_to_streamed_and_match_pytorch(conv, hw, kw, tile):
    """The resident-weight schedule (input-channel blocks outermost per task, accumulators in a task buffer) adds
    the same products in the same order as the register tile that holds its whole reduction (``task_rows`` 0):
    the outputs are equal bit for bit, odd widths (predicated last tiles), strides, bands that do not cover the
    map, 2-row register tiles, blocked layouts and the residual epilogue included; and both match PyTorch."""
    spec = _spec_of(conv, hw, **kw)
    assert resident_weights(spec)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, conv.in_channels, *hw, generator=gen)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        expected = conv(x)
        residual = torch.randn(expected.shape, generator=gen)
        expected = ACTIVATIONS[kw.get("activation", "none")](expected + (residual if kw.get("residual") else 0))
    arrays = [x.numpy(), conv.weight.detach().numpy(), conv.bias.detach().numpy(), residual.numpy()]
    if spec.in_block:  # NCHW -> NCHW[8]c for the data and the residual
        arrays[0], arrays[3] = (a.reshape(1, -1, 8, *a.shape[2:]).transpose(0, 1, 3, 4, 2).copy()
                                for a in (arrays[0], arrays[3]))
    arrays = arrays[:4 if spec.residual else 3]
    resident = _run_kernel(spec, tile, *arrays)
    np.testing.assert_array_equal(resident, _run_kernel(spec, dataclasses.replace(tile, task_rows=0), *arrays))
    if spec.out_block:
        resident = resident.transpose(0, 1, 4, 2, 3).reshape(expected.shape)
    np.testing.assert_allclose(resident, expected.numpy(), rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_resident_rows_fill_the_accumulator_budget_and_leave_tasks():
    """resnet18's 512-channel 3x3 convs at 7x7 on AVX-512: their weights (9.4 MB) outweigh the input, so a task
    streams 4 channel vectors' panels (x 7 pixels: a whole row, 28 accumulators), the whole map per task (7 KB of
    accumulators), 8 tasks; on AVX2 (12 accumulators) one 8-lane vector x 7 pixels, as before. 64 channels at
    56x56 (input larger than the weights): 2 vectors x 12 pixels, 4-row bands (the most within 32 KB), 28 tasks.
    Flat-pixel 1x1, depthwise and pooled convs keep the streamed schedule."""
    layer4 = _spec_of(nn.Conv2d(512, 512, 3, padding=1), (7, 7), lanes=16, in_block=16, out_block=16)
    assert not rows_first(layer4) and default_tile(layer4) == Tile(64, 1, 7, task_rows=7)
    avx2 = _spec_of(nn.Conv2d(512, 512, 3, padding=1), (7, 7), lanes=8, in_block=8, out_block=8)
    assert default_tile(avx2) == Tile(8, 1, 7, task_rows=7)
    layer1 = _spec_of(nn.Conv2d(64, 64, 3, padding=1), (56, 56), lanes=16)
    tile = default_tile(layer1)
    assert rows_first(layer1) and tile == Tile(32, 1, 12, task_rows=4)
    assert 4 * tile.oc_block * 4 * ceil_to(56, 12) <= RESIDENT_BYTES < 4 * tile.oc_block * 7 * ceil_to(56, 12)
    for conv in (nn.Conv2d(64, 128, 1), nn.Conv2d(32, 32, 3, groups=32, padding=1)):
        spec = _spec_of(conv, (14, 14), lanes=16)
        assert spec.blocked and not resident_weights(spec) and default_tile(spec).task_rows == 0


def test_tasks_split_rows_where_the_weights_are_smaller_than_the_input():
    """resnet18's downsample (64 -> 128 1x1 stride 2 at 56x56: 32 KB of weights, 800 KB of input) splits row bands
    over the cores; its 512-channel 3x3 at 7x7 (9.4 MB of weights, 166 KB of input) channel tiles; depthwise convs
    keep channel tiles. Both orders compute the same outputs (``test_blocked_conv_matches_pytorch`` has both)."""
    assert rows_first(_spec_of(nn.Conv2d(64, 128, 1, stride=2), (56, 56), lanes=16))
    assert not rows_first(_spec_of(nn.Conv2d(512, 512, 3, padding=1), (7, 7), lanes=16))
    assert not rows_first(_spec_of(nn.Conv2d(32, 32, 3, padding=1, groups=32), (112, 112), lanes=16))
    assert rows_first(_spec_of(nn.Conv2d(3, 8, 3, padding=1), (13, 11)))
    assert not rows_first(_spec_of(nn.Conv2d(40, 16, 1), (1, 1)))


def test_resident_rows_must_divide_the_map():
    spec = _spec_of(nn.Conv2d(16, 16, 3, padding=1), (10, 10))
    with pytest.raises(ValueError, match="task_rows 3 with register rows 1"):
        conv_kernel(spec, "llvm", Tile(16, 1, 5, task_rows=3))
    with pytest.raises(ValueError, match="task_rows 5 with register rows 2"):
        conv_kernel(spec, "llvm", Tile(16, 2, 5, task_rows=5))


def test_flat_pixel_1x1_conv_tiles_the_flattened_map():
    """An unpadded stride-1 1x1 conv is a GEMM over the H * W pixels: MobileNetV2's 160 -> 960 conv at 7x7 takes
    3 channel vectors x 4 consecutive pixels of the flattened map (the row of 7 allowed only 1 vector x 7), 13
    tiles computing 52 pixels, 49 stored; the output keeps its NCHW8c shape and no input copy is made."""
    spec = _spec_of(nn.Conv2d(160, 960, 1), (7, 7), activation="relu6", in_block=8, out_block=8)
    assert spec.flat_pixels and default_tile(spec) == Tile(oc_block=24, rows=1, cols=4)
    # 20 channel vectors (not 3 per tile): 2 x 5 pixels, 50 computed (2 x 6 computes 54: measured 1.25x slower)
    assert default_tile(dataclasses.replace(spec, weight_shape=(160, 960, 1, 1))) == Tile(16, 1, 5)
    func = conv_kernel(spec, "llvm")
    assert tuple(int(d) for d in func.params[-1].shape) == (1, 120, 7, 7, 8)  # (TVM 0.27: params carry shapes)
    assert {name: (shape, scope) for name, shape, scope in compacted_buffers(func)} == {
        "conv_local": ((1, 3, 1, 4, 8), "local")}


@pytest.mark.parametrize("conv, why", [
    (nn.Conv2d(16, 32, 1, stride=2), "stride 2: pixels of a row are not consecutive in memory"),
    (nn.Conv2d(16, 32, 1, padding=1), "padding: the zero border is not in the input"),
    (nn.Conv2d(16, 32, 3, padding=1), "3x3: a pixel reads its neighbours"),
    (nn.Conv2d(16, 16, 1, groups=16), "depthwise: no reduction over channels"),
], ids=["strided", "padded", "3x3", "depthwise"])
def test_flat_pixels_only_for_unpadded_stride_1_1x1_convs(conv, why):
    spec = _spec_of(conv, (7, 7))
    assert spec.blocked and not spec.flat_pixels, why


def test_not_blocked_keeps_the_other_schedules():
    """Grouped (not depthwise) convs, output channels that fill no vector, and fused pools keep the column- or
    channel-vectorized schedules."""
    assert not _spec_of(nn.Conv2d(8, 12, 3, groups=4), (9, 9)).blocked
    assert not _spec_of(nn.Conv2d(6, 10, 1), (9, 9)).blocked
    assert not _spec_of(nn.Conv2d(8, 16, 3), (8, 8), pool="max", pool_kernel=(2, 2), pool_stride=(2, 2)).blocked


def test_blocked_conv_compiles_for_avx512():
    """lanes 16 (AVX-512, not runnable here): 16-channel vectors, compiled to zmm FMAs without stack spills in the
    loop nest."""
    spec = _spec_of(nn.Conv2d(64, 64, 3, padding=1), (28, 28), lanes=16)
    assert spec.blocked and spec.oc_vector == spec.ic_block == 16
    func = conv_kernel(spec, "llvm").with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target={"kind": "llvm", "mcpu": "skylake-avx512"})
    asm = lib.mod.imports[0].inspect_source("asm") if lib.mod.imports else lib.mod.inspect_source("asm")
    fmas = [line for line in asm.splitlines() if "vfmadd" in line]
    assert fmas and all("zmm" in line for line in fmas)
