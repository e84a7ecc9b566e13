"""Winograd F(2x2,3x3) / F(4x4,3x3) conv kernel: the transforms' algebra, the cost rule's choices, each layer's
error against PyTorch's direct conv (the numeric guard), whole graphs through the build, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from torch import nn

from backends.tvm import build
from backends.tvm.kernels import ConvSpec, accumulator_vectors
from backends.tvm.select import select_kernels
from backends.tvm.target import resolve_target
from backends.tvm.winograd import WinogradSpec, choose, refusal, transform_matrices, winograd_kernel
from frontend.torch_fx import from_torch
from passes.core.pass_base import PassContext
from passes.core.pipeline import Pipeline, resolve
from tests.helpers import assert_outputs_close

pytestmark = pytest.mark.tvm

LANES = 8  # AVX2 blocking (the machine's); the kernel is correct for any lanes, its speed is tuned for the target
GUARD = 1e-4  # max |winograd - direct| / max |direct| per layer: our fp32 tolerance (rtol 1e-4 of the output scale)


def conv_spec(c: int, oc: int, h: int, w: int, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups: int = 1,
              kernel=(3, 3), dtype: str = "float32", pool: str | None = None, activation: str = "relu") -> ConvSpec:
    return ConvSpec((1, c, h, w), (oc, c // groups, *kernel), stride, padding, dilation, groups, True, activation,
                    pool=pool, pool_kernel=(2, 2) if pool else (1, 1), pool_stride=(2, 2) if pool else (1, 1),
                    dtype=dtype, lanes=LANES)


def run_kernel(spec: WinogradSpec, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
               residual: np.ndarray | None) -> np.ndarray:
    func = winograd_kernel(spec).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=resolve_target("llvm").tvm)
    device = tvm.cpu()
    arrays = [x, spec.pack_weight(weight)] + [a for a in (bias, residual) if a is not None]
    out = tvm.runtime.tensor(np.zeros(spec.stored_shape, np.float32), device)
    lib["main"](*[tvm.runtime.tensor(a, device) for a in arrays], out)
    return out.numpy()


def blocked(x: np.ndarray, block: int) -> np.ndarray:
    """NCHW -> NCHW[block]c (block 0: as is)."""
    if not block:
        return x
    n, c, h, w = x.shape
    return np.ascontiguousarray(x.reshape(n, c // block, block, h, w).transpose(0, 1, 3, 4, 2))


def unblocked(x: np.ndarray, block: int) -> np.ndarray:
    """NCHW[block]c -> NCHW."""
    if not block:
        return x
    n, cb, h, w, b = x.shape
    return x.transpose(0, 1, 4, 2, 3).reshape(n, cb * b, h, w)


def layer_error(n: int, c: int, oc: int, h: int, w: int, tile: int, padding=(1, 1), bias: bool = True,
                residual: bool = False, activation: str = "none", seed: int = 0, in_block: int = 0,
                out_block: int = 0, lanes: int = LANES) -> float:
    """max |winograd - torch direct conv| / max |direct| on seeded inputs with He-scaled weights (as trained
    convs have: outputs of unit scale); data in NCHW[in_block]c, output and residual in NCHW[out_block]c."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = (rng.standard_normal((oc, c, 3, 3)) * np.sqrt(2.0 / (9 * c))).astype(np.float32)
    b = rng.standard_normal(oc).astype(np.float32) if bias else None
    spec = WinogradSpec((n, c, h, w), (oc, c, 3, 3), padding, bias, activation, (), residual, tile, lanes,
                        in_block, out_block)
    expected = F.conv2d(torch.from_numpy(x), torch.from_numpy(weight), None if b is None else torch.from_numpy(b),
                        padding=padding)
    r = rng.standard_normal(tuple(expected.shape)).astype(np.float32) if residual else None
    expected = expected + torch.from_numpy(r) if residual else expected
    expected = torch.relu(expected) if activation == "relu" else expected
    got = unblocked(run_kernel(spec, blocked(x, in_block), weight, b, None if r is None else blocked(r, out_block)),
                    out_block)
    expected = expected.numpy()
    assert got.shape == expected.shape
    return float(np.abs(got - expected).max() / np.abs(expected).max())


# ------------------------------------------------------------------------------------------------ structure
@pytest.mark.parametrize("m", [2, 4])
def test_transform_matrices_compute_the_correlation(m):
    """A^T [(G g G^T) . (B^T d B)] A is the 3x3 correlation of the (m+2)^2 tile d, exactly (float64)."""
    a_t, b_t, g = transform_matrices(m)
    rng = np.random.default_rng(m)
    d, k = rng.standard_normal((m + 2, m + 2)), rng.standard_normal((3, 3))
    y = a_t @ ((g @ k @ g.T) * (b_t @ d @ b_t.T)) @ a_t.T
    direct = np.array([[np.sum(d[i:i + 3, j:j + 3] * k) for j in range(m)] for i in range(m)])
    np.testing.assert_allclose(y, direct, rtol=1e-12, atol=1e-12)


def test_weight_transform_is_g_g_gt_packed_with_channels_in_lanes():
    spec = WinogradSpec((1, 3, 8, 8), (20, 3, 3, 3), (1, 1), False, tile=4, lanes=LANES)
    weight = np.random.default_rng(0).standard_normal((20, 3, 3, 3)).astype(np.float32)
    packed = spec.pack_weight(weight)
    _, _, g = transform_matrices(4)
    assert spec.oc_block == 16 and packed.shape == (6, 6, 2, 3, 16)  # 20 channels in 2 blocks of 16 (12 zero)
    for k, c in [(0, 0), (13, 2), (19, 1)]:
        np.testing.assert_allclose(packed[:, :, k // 16, c, k % 16], g @ weight[k, c].astype(np.float64) @ g.T,
                                   rtol=1e-6, atol=1e-6)
    assert not packed[:, :, 1, :, 4:].any()


def test_cost_rule_chooses_wide_3x3_stride_1_convs_f4_on_large_maps_f2_on_small_ones_direct_at_7x7():
    assert choose(conv_spec(64, 64, 56, 56)).tile == 4
    assert choose(conv_spec(128, 128, 28, 28)).tile == 4
    assert choose(conv_spec(256, 256, 14, 14)).tile == 2
    assert choose(conv_spec(512, 512, 7, 7)) is None  # 16 tiles: the weights' reuse too low (``MIN_OUTPUT``)
    spec = choose(conv_spec(64, 128, 28, 28))
    assert (spec.in_shape, spec.weight_shape, spec.padding, spec.activation) == (
        (1, 64, 28, 28), (128, 64, 3, 3), (1, 1), "relu")


@pytest.mark.parametrize("size, tile, lanes, channels, block", [
    (14, 2, 16, 128, 7),   # ResNet's 7x7 grid of tiles: 49 = 7 x 7, none padded (12 would compute 60)
    (28, 4, 16, 128, 7),
    (56, 4, 16, 128, 7),   # 196 tiles = 28 x 7
    (16, 2, 16, 128, 8),   # 64 tiles: the largest exact block within the budget
    (14, 2, 8, 128, 5),    # AVX2: 6 tiles x 2 vectors at most; 50 computed
    (4, 2, 16, 128, 4),    # 4 tiles: a block of 4, not half the budget
    (56, 4, 16, 64, 4),    # 64 channels on AVX-512: 4 vectors a tile (6 tiles at most), 196 = 49 x 4
], ids=str)
def test_gemm_tile_block_pads_the_fewest_tiles_within_the_register_budget(size, tile, lanes, channels, block):
    spec = WinogradSpec((1, channels, size, size), (channels, channels, 3, 3), (1, 1), True, tile=tile, lanes=lanes)
    assert spec.oc_block == (64 if (lanes, channels) == (16, 64) else 2 * lanes)
    budget = accumulator_vectors(lanes) // (spec.oc_block // lanes)
    assert spec.tile_block == block <= budget
    assert spec.padded_tiles == -(-spec.tiles // block) * block < spec.tiles + block


class Block(nn.Module):
    """A ResNet basic block on 32 channels, then the convs the rule keeps direct."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.down = nn.Conv2d(32, 32, 3, stride=2, padding=1)   # stride 2: direct
        self.narrow = nn.Conv2d(32, 16, 3, padding=1)           # 16 output channels: direct
        self.point = nn.Conv2d(16, 32, 1)                       # 1x1: direct

    def forward(self, x):
        y = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)
        return self.point(self.narrow(self.down(y)))


def block_graph(x: torch.Tensor):
    model = Block().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    graph = from_torch(model, (x,))
    Pipeline(resolve("default")).run(graph, PassContext(example_inputs=(x,)))
    return model, graph


def test_selection_in_a_graph_and_the_switch_that_turns_it_off():
    torch.manual_seed(0)
    _, graph = block_graph(torch.randn(1, 32, 28, 28))
    chosen = {graph.nodes[n]["origin"][0]: c.spec.tile for n, c in select_kernels(graph, "llvm", LANES).choices.items()
              if c.kernel == "winograd"}
    assert chosen == {"conv1": 4, "conv2": 4}
    off = select_kernels(graph, "llvm", LANES, allow_winograd=False)
    assert not [c for c in off.choices.values() if c.kernel == "winograd"]
    assert not resolve_target("llvm", winograd=False).winograd and resolve_target("llvm").winograd
    assert not [c for c in select_kernels(graph, "cuda").choices.values() if c.kernel == "winograd"]


# ------------------------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("n, c, oc, h, w, tile, padding, residual", [
    (1, 3, 5, 7, 9, 2, (1, 1), False),    # outputs not a multiple of the tile, channels not of the vector
    (1, 3, 5, 7, 9, 4, (1, 1), True),
    (2, 5, 24, 11, 10, 4, (0, 0), True),  # batch 2, no padding: 9x8 outputs, 24 channels (one 16-block + 8)
    (1, 16, 40, 6, 13, 2, (1, 0), False),  # asymmetric padding
], ids=str)
def test_kernel_matches_pytorch_on_odd_shapes_with_bias_residual_relu(n, c, oc, h, w, tile, padding, residual):
    assert layer_error(n, c, oc, h, w, tile, padding, bias=True, residual=residual, activation="relu") <= GUARD


@pytest.mark.parametrize("c, oc, tile, in_block, out_block, residual", [
    (16, 24, 4, 8, 8, True),     # blocked in and out, residual blocked, 3 output blocks (not a multiple of 2)
    (32, 16, 2, 0, 16, False),   # NCHW in (a stem's output), blocked out
    (24, 32, 4, 8, 0, True),     # blocked in, NCHW out (the last conv before a flatten)
    (16, 40, 2, 16, 8, False),   # different blocks in and out
    (32, 64, 4, 16, 16, True),   # AVX-512 tiles: 64 channels, one 4-vector GEMM block
], ids=str)
def test_kernel_reads_and_writes_blocked_layouts(c, oc, tile, in_block, out_block, residual):
    """The same sums as NCHW with the data read from and the output (and residual) stored in NCHW[b]c."""
    assert layer_error(1, c, oc, 9, 11, tile, residual=residual, activation="relu", in_block=in_block,
                       out_block=out_block, lanes=16 if in_block == 16 else LANES) <= GUARD


@pytest.mark.parametrize("c, size", [(64, 56), (128, 28), (256, 14), (512, 7)], ids=str)
def test_numeric_guard_per_layer_at_resnet_shapes(c, size):
    """The tile the rule picks (and F(4x4) regardless of the rule) stays within the fp32 tolerance on ResNet-18's
    3x3 layer shapes (and F(2x2) at 7x7, which the tuner may still pick); the measured errors are in the README
    (1e-6..6e-6 of the output scale)."""
    chosen = choose(conv_spec(c, c, size, size))
    tiles = {chosen.tile if chosen else 2, 4}
    for tile in sorted(tiles):
        assert layer_error(1, c, c, size, size, tile) <= GUARD, f"F({tile}x{tile}) on {c}x{size}x{size}"


def test_block_through_the_build_matches_pytorch():
    """conv+BN+ReLU and conv+BN+residual+ReLU (fused by the default pipeline) as Winograd, the rest direct."""
    torch.manual_seed(1)
    x = torch.randn(1, 32, 28, 28)
    model, graph = block_graph(x)
    with torch.no_grad():
        assert_outputs_close(model(x), build(graph, "llvm")(x))


def test_blocked_graph_runs_winograd_on_nchwc_convs_and_matches_pytorch():
    """optimize()'s pipeline blocks the 3x3 convs (alter-layout) and the Winograd kernel takes them blocked, its
    residual blocked too: the one layout transform packs the graph's input for conv2's residual."""
    import passes

    torch.manual_seed(2)
    x = torch.randn(1, 32, 28, 28)
    model, _ = block_graph(x)
    opt = passes.optimize(model, example_inputs=(x,), measure=False)
    graph = opt.graph
    winograd_nodes = {graph.nodes[n]["origin"][0]: graph.nodes[n]["op"] for n, c in
                      select_kernels(graph, "llvm", resolve_target("llvm").lanes).choices.items()
                      if c.kernel == "winograd"}
    assert winograd_nodes == {"conv1": "conv2d_nchwc", "conv2": "conv2d_nchwc"}
    assert graph.op_nodes("layout_transform") == ["x_to_NCHW16c"]
    with torch.no_grad():
        assert_outputs_close(model(x), opt(x))


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("spec, reason", [
    (conv_spec(64, 64, 28, 28, stride=(2, 2)), "stride"),
    (conv_spec(64, 64, 28, 28, dilation=(2, 2), padding=(2, 2)), "dilation"),
    (conv_spec(64, 64, 28, 28, groups=2), "groups"),
    (conv_spec(64, 64, 28, 28, dtype="bfloat16"), "dtype bfloat16"),
    (conv_spec(64, 64, 28, 28, kernel=(5, 5), padding=(2, 2)), "kernel 5x5"),
    (conv_spec(16, 64, 28, 28), "channels"),
    (conv_spec(64, 64, 5, 5), "output 5x5"),
    (conv_spec(512, 512, 7, 7), "output 7x7"),
    (conv_spec(32, 32, 8, 8), "too little work"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_refusals_keep_the_direct_kernel(spec, reason):
    assert reason in refusal(spec)
    assert choose(spec) is None


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, 2, padding=1, ceil_mode=True), nn.AvgPool2d(2)],
                         ids=repr)
def test_conv_pool_runs_winograd_then_the_pool(pool):
    """fuse-conv-pool's conv2d_pool: the conv as Winograd (bias + ReLU fused), the pool after it."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(32, 40, 3, padding=1), nn.ReLU(), pool).eval()
    x = torch.randn(1, 32, 29, 30)
    graph = from_torch(model, (x,))
    Pipeline(resolve("default")).run(graph, PassContext(example_inputs=(x,)))
    choices = select_kernels(graph, "llvm", LANES).choices
    assert [(graph.nodes[n]["op"], c.kernel, c.spec.tile) for n, c in choices.items()] == [
        ("conv2d_pool", "winograd", 4)]
    assert [c.kernel for c in select_kernels(graph, "cuda").choices.values()] == ["conv"]  # CPU-only kernel
    with torch.no_grad():
        assert_outputs_close(model(x), build(graph, "llvm")(x))


def test_bf16_graph_keeps_direct_kernels():
    x = torch.randn(1, 32, 28, 28)
    _, graph = block_graph(x)
    Pipeline(resolve("mixed-precision")).run(graph, PassContext(example_inputs=(x,)))
    kernels = {c.kernel for c in select_kernels(graph, "llvm", LANES).choices.values()}
    assert "winograd" not in kernels and "conv" in kernels


def test_cli_explain_winograd_names_each_conv_and_why(capsys):
    from passes.cli import main

    assert main(["explain", "winograd", "zoo:resnet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("winograd: 0 of 9 conv(s) on llvm")
    assert "stride (2, 2): Winograd needs stride 1" in out and "8 -> 8 channels" in out
    assert main(["explain", "winograd", "zoo:resnet", "--no-winograd"]) == 0
    assert "Winograd turned off" in capsys.readouterr().out
