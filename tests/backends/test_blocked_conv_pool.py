"""The pool in the blocked (NCHWc) conv's epilogue (``ConvSpec.pool_epilogue``): numerics against PyTorch's conv ->
activation -> pool on odd shapes, the kernel's buffers (only the pooled output is stored), which conv2d_pool takes
it and why (``explain winograd``), bf16 storage, NaN, and CUDA staying on its own kernel."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from torch import nn

import passes
from backends.tvm.kernels import ConvSpec, Tile, compacted_buffers, conv_kernel, default_tile
from backends.tvm.lower import lower
from backends.tvm.select import explain_winograd, select_kernels
from backends.tvm.target import resolve_target
from tests.backends.test_kernels import compile_and_compare
from tests.e2e.test_robustness import UNIT_ROUNDOFF

pytestmark = pytest.mark.tvm

LANES = resolve_target("llvm").lanes  # what the build sizes its vectors by


def _pool_node(graph) -> str:
    (node,) = graph.op_nodes("conv2d_pool")
    return node


def _pool_choice(graph, target_kind: str = "llvm", lanes: int = LANES):
    return select_kernels(graph, target_kind, lanes)[_pool_node(graph)]


def _seed_batch_norms(model: nn.Module, seed: int) -> torch.Generator:
    """Non-trivial batch-norm statistics; returns the generator for the inputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return gen


@pytest.mark.parametrize("layers, shape, epilogue", [
    ((nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)), (1, 3, 13, 11), True),  # last row/col dropped
    ((nn.Conv2d(5, 16, 3, stride=2, padding=1), nn.ReLU6(), nn.MaxPool2d(2)), (1, 5, 15, 17), True),  # stride 2
    ((nn.Conv2d(7, 24, 3), nn.LeakyReLU(0.1), nn.MaxPool2d(3)), (1, 7, 17, 19), True),  # 3 vectors, 3x3/3
    ((nn.Conv2d(3, 16, 5, padding=2), nn.Sigmoid(), nn.MaxPool2d(2)), (1, 3, 9, 13), True),  # act before the max
    ((nn.Conv2d(6, 16, 3, padding=1, bias=False), nn.AvgPool2d(2)), (1, 6, 11, 10), True),
    ((nn.Conv2d(5, 8, 3, padding=1), nn.GELU(), nn.AvgPool2d((2, 3))), (1, 5, 10, 14), True),
    ((nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)), (1, 3, 12, 10), True),  # whole
    ((nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)), (1, 3, 11, 9), True),  # partial
    ((nn.Conv2d(16, 16, 3, groups=16, padding=1), nn.ReLU(), nn.MaxPool2d(2)), (1, 16, 10, 12), True),  # depthwise
    ((nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)), (2, 3, 10, 10), True),
], ids=["drop-last", "stride2-relu6", "3x3-leaky", "sigmoid", "avg", "avg-gelu-2x3", "ceil-whole", "ceil-partial",
        "depthwise", "bn-batch2"])
def test_pool_in_blocked_epilogue_matches_pytorch(layers, shape, epilogue):
    """fuse-conv-pool alone (it matches BN and the activation), then one kernel: windows that tile the conv output
    take the blocked conv with the pool in its epilogue (a partial ceil-mode window through its band of rows)."""
    model = nn.Sequential(*layers).eval()
    gen = _seed_batch_norms(model, 16)
    graph = compile_and_compare(model, torch.randn(shape, generator=gen) * 2, passes="fuse-conv-pool",
                                expect_op="conv2d_pool")
    choice = _pool_choice(graph)
    assert choice.kernel == "conv" and choice.spec.pool_epilogue == epilogue
    mod = lower(graph)
    assert [gv.name_hint for gv in mod.functions if gv.name_hint != "main"] == ["conv2d_pool_" + _pool_node(graph)]
    assert "R.nn.max_pool2d" not in mod["main"].script() and "R.nn.avg_pool2d" not in mod["main"].script()


@pytest.mark.parametrize("layers, shape", [
    ((nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(3, 2, 1)),
     (1, 3, 37, 41)),  # the ResNet stem, small and odd
    ((nn.Conv2d(5, 8, 3, padding=1), nn.ReLU6(), nn.MaxPool2d(3, 2, 1, ceil_mode=True)), (1, 5, 15, 13)),
    ((nn.Conv2d(7, 24, 3), nn.LeakyReLU(0.1), nn.MaxPool2d(3, 2)), (1, 7, 17, 19)),  # 3 vectors, no padding
    ((nn.Conv2d(3, 16, 5, padding=2), nn.Sigmoid(), nn.MaxPool2d(3, 2, 1)), (1, 3, 21, 11)),  # act before the max
    ((nn.Conv2d(5, 8, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d((3, 2), (2, 1), (1, 0), ceil_mode=True)),
     (2, 5, 19, 14)),  # strided conv, uneven window and stride, batch 2
    ((nn.Conv2d(5, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(3, 2)), (1, 5, 16, 15)),  # overlapping average
    ((nn.Conv2d(16, 16, 3, groups=16, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1)), (1, 16, 13, 10)),  # depthwise
], ids=["stem", "relu6-ceil", "3x3-2-leaky", "sigmoid", "stride2-2x3-batch2", "avg-overlap", "depthwise"])
def test_overlapping_windows_in_blocked_band_match_pytorch(layers, shape):
    """Overlapping, padded and ceil-mode windows (``banded``) run on the blocked kernel through its band of conv
    rows: exact against PyTorch's conv -> BN -> activation -> pool, one kernel, no Relax pool."""
    model = nn.Sequential(*layers).eval()
    gen = _seed_batch_norms(model, 17)
    graph = compile_and_compare(model, torch.randn(shape, generator=gen) * 2, passes="fuse-conv-pool",
                                expect_op="conv2d_pool")
    choice = _pool_choice(graph)
    assert choice.kernel == "conv" and choice.spec.pool_epilogue and choice.spec.banded and choice.spec.blocked
    script = lower(graph)["main"].script()
    assert "R.nn.max_pool2d" not in script and "R.nn.avg_pool2d" not in script


def _stem_spec(hw: tuple[int, int] = (224, 224), oc: int = 64, lanes: int = 8) -> ConvSpec:
    return ConvSpec(in_shape=(1, 3, *hw), weight_shape=(oc, 3, 7, 7), stride=(2, 2), padding=(3, 3),
                    dilation=(1, 1), groups=1, has_bias=True, activation="relu", pool="max", pool_kernel=(3, 3),
                    pool_stride=(2, 2), pool_padding=(1, 1), lanes=lanes, pool_epilogue=True)


def test_band_stores_only_the_pooled_output():
    """The ResNet stem: per task 16 channels x 28 pooled rows; the band holds their 57 conv rows (one shared with
    the next band: 1/56 of the conv computed twice) x 112 columns (19 register tiles of 6 pixels) in 408 KB. The
    other buffers are the packed input, the register tile (2 vectors x 6 pixels) and one pooled row (its rows'
    maxes, then its windows'): the conv output (112 x 112 x 64) never exists."""
    spec = _stem_spec()
    assert spec.blocked and spec.banded and default_tile(spec) == Tile(oc_block=16, rows=28, cols=6)
    buffers = {name: (shape, scope) for name, shape, scope in compacted_buffers(conv_kernel(spec, "llvm"))}
    assert buffers == {"pad": ((1, 1, 232, 233, 3), "global"), "band": ((1, 2, 57, 112, 8), "global"),
                       "conv_local": ((1, 2, 1, 6, 8), "local"), "pool_rows_local": ((1, 2, 1, 112, 8), "local"),
                       "pool_local": ((1, 2, 1, 56, 8), "local")}
    assert all(math.prod(shape) < math.prod(spec.conv_shape) // 7 for name, (shape, _) in buffers.items()
               if name != "pad")
    func = conv_kernel(spec, "llvm")
    assert tuple(int(d) for d in func.params[-1].shape) == spec.out_shape  # the only buffer written to memory


def test_band_pool_is_vectorized():
    """The window maxes are vector code: no scalar NaN compares (``ucomiss``), one vector max per pair of values."""
    func = conv_kernel(_stem_spec((40, 40), 16), "llvm").with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=resolve_target("llvm").tvm)
    asm = lib.mod.imports[0].inspect_source("asm") if lib.mod.imports else lib.mod.inspect_source("asm")
    assert "ucomiss" not in asm and "vmaxps" in asm


def _run_with_tile(spec, tile, x, w, b):
    """The blocked conv+pool kernel built alone with ``tile``, run on torch tensors (weights packed as the lowering
    packs them)."""
    lib = tvm.compile(tvm.IRModule({"main": conv_kernel(spec, "llvm", tile).with_attr("global_symbol", "main")}),
                      target="llvm")
    args = [tvm.runtime.tensor(a) for a in (x.numpy(), spec.pack_weight(w.numpy()), b.numpy())]
    out = tvm.runtime.empty(spec.out_shape, "float32")
    lib["main"](*args, out)
    return out.numpy()


def test_avx512_stem_takes_four_channel_vectors():
    """On AVX-512 the stem's register tile is 4 channel vectors x 6 pixels (24 accumulators, 4 weight loads and 6
    broadcasts per tap), its bands 7 pooled rows (8 tasks); AVX2 keeps 2 vectors x 6 (12 accumulators)."""
    assert default_tile(_stem_spec(lanes=16)) == Tile(oc_block=64, rows=7, cols=6)
    assert default_tile(_stem_spec()).oc_block == 16


@pytest.mark.parametrize("tile, oc", [(Tile(8, 3, 5), 16), (Tile(16, 1, 4), 16), (Tile(16, 7, 6), 16),
                                      (Tile(32, 4, 6), 32)], ids=str)
def test_band_tiles_other_than_the_default_match(tile, oc):
    """Bands the tuner may propose (1 pooled row: 3 conv rows; bands that do not divide the pooled height; one
    channel vector; 4 vectors, as AVX-512's default) stay exact, the padding row and the clamped last column
    included."""
    spec = _stem_spec((27, 29), oc)
    gen = torch.Generator().manual_seed(4)
    x, w, b = (torch.randn(s, generator=gen) for s in (spec.in_shape, spec.weight_shape, (oc,)))
    expected = F.max_pool2d(F.relu(F.conv2d(x, w, b, stride=2, padding=3)), 3, 2, 1).numpy()
    np.testing.assert_allclose(_run_with_tile(spec, tile, x, w, b), expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())


def test_nan_and_inf_propagate_through_the_band_max():
    """NaN in a window gives NaN (PyTorch's max pool), whichever window element and whichever side of the
    vector max it is on; an all -inf window is -inf, not the most negative float."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.MaxPool2d(3, 2, 1)).eval()
    x = torch.randn(1, 3, 9, 9)
    x[0, 0, 4, 0] = x[0, 2, 5, 6] = x[0, 1, 8, 8] = float("nan")
    x[0, :, 0:2, 0:2] = float("-inf")  # the top left window: padding and -inf only
    with torch.no_grad():
        model[0].weight.abs_()
        expected = model(x)
    opt = passes.optimize(model, passes=["fuse-conv-pool"], example_inputs=(x,), measure=False)
    choice = _pool_choice(opt.graph)
    assert choice.spec.pool_epilogue and choice.spec.banded
    assert torch.isnan(expected).any() and torch.isinf(expected).any()
    torch.testing.assert_close(torch.as_tensor(opt(x)), expected, equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 16, 3, padding=1, groups=2), nn.Conv2d(3, 12, 3, padding=1)],
                         ids=["groups2", "12-channels"])
def test_overlapping_windows_the_blocked_kernel_refuses_stay_banded(conv):
    """Convs the blocked kernel does not take (grouped, output channels that fill no vector) keep the banded
    channel-vectorized kernel with the pool fused, as before, and stay exact."""
    model = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(3, 2, 1)).eval()
    graph = compile_and_compare(model, torch.randn(1, conv.in_channels, 15, 13, generator=torch.Generator()
                                                   .manual_seed(6)), passes="fuse-conv-pool", expect_op="conv2d_pool")
    choice = _pool_choice(graph)
    assert choice.kernel == "conv" and not choice.spec.pool_epilogue and choice.spec.banded
    assert choice.spec.blocked_pool_fits.startswith("groups 2" if conv.groups == 2 else "12 output channels")


def _spec(c: int, oc: int, hw: tuple[int, int], pool: str = "max", k: int = 2, lanes: int = 8) -> ConvSpec:
    return ConvSpec(in_shape=(1, c, *hw), weight_shape=(oc, c, 3, 3), stride=(1, 1), padding=(1, 1),
                    dilation=(1, 1), groups=1, has_bias=True, activation="relu", pool=pool, pool_kernel=(k, k),
                    pool_stride=(k, k), lanes=lanes, pool_epilogue=True)


def test_only_the_pooled_output_is_stored():
    """The stack's first layer (3 -> 8 channels, 2x2/2 max): per task one pooled row; per tile 4 pooled pixels of
    one 8-channel vector, from one conv row of their windows (8 pixels = 8 accumulators) at a time. The buffers are
    the packed input, the register tile and the pooled tile: the conv output never exists at full size."""
    spec = _spec(3, 8, (64, 64))
    assert spec.blocked and spec.blocked_pool_fits is None
    assert default_tile(spec) == Tile(oc_block=8, rows=1, cols=4)
    buffers = {name: (shape, scope) for name, shape, scope in compacted_buffers(conv_kernel(spec, "llvm"))}
    assert buffers == {"pad": ((1, 1, 66, 66, 3), "global"), "conv_local": ((1, 1, 1, 8, 8), "local"),
                       "pool_local": ((1, 1, 1, 4, 8), "local")}
    func = conv_kernel(spec, "llvm")
    assert tuple(int(d) for d in func.params[-1].shape) == spec.out_shape  # the only buffer written to memory
    assert all(math.prod(shape) < math.prod(spec.conv_shape) for shape, _ in buffers.values())


@pytest.mark.parametrize("oc, k, tile", [(16, 2, Tile(16, 1, 3)), (24, 2, Tile(24, 1, 2)), (8, 3, Tile(8, 1, 2)),
                                         (16, 8, Tile(8, 1, 1))])
def test_register_tile_holds_one_conv_row_of_whole_windows(oc, k, tile):
    """At most 12 accumulators on AVX2 (8 with one vector): 2 vectors x 3 windows of 2 = 12, 3 x 2 x 2 = 12."""
    assert default_tile(_spec(8, oc, (32, 48), k=k)) == tile


def test_windows_the_epilogue_does_not_take():
    """Each reason the pool stays out of the blocked kernel, as ``explain`` words it."""
    def why(**kw):
        base = dict(in_shape=(1, 8, 32, 32), weight_shape=(16, 8, 3, 3), stride=(1, 1), padding=(1, 1),
                    dilation=(1, 1), groups=1, has_bias=True, pool="max", pool_kernel=(2, 2), pool_stride=(2, 2),
                    lanes=8)
        return ConvSpec(**(base | kw)).blocked_pool_fits

    assert why() is None
    assert why(pool_kernel=(3, 3), pool_stride=(2, 2), pool_padding=(1, 1)) is None  # banded: through a band
    assert "window row of 9 pixels" in why(pool_kernel=(9, 9), pool_stride=(9, 9))
    assert "12 output channels" in why(weight_shape=(12, 8, 3, 3))
    assert "groups 2" in why(weight_shape=(16, 4, 3, 3), groups=2)


@pytest.mark.parametrize("tile", [Tile(8, 2, 2), Tile(16, 1, 5)], ids=str)
def test_tuner_tiles_other_than_the_default_match(tile):
    """Tiles the tuner proposes (two pooled rows per task, a register tile past the budget) stay exact."""
    spec = _spec(5, 16, (13, 22))
    gen = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(s, generator=gen) for s in (spec.in_shape, spec.weight_shape, (16,)))
    expected = F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=1)), 2).numpy()
    np.testing.assert_allclose(_run_with_tile(spec, tile, x, w, b), expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())


def test_explain_names_the_pool_path():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d((1, 21))).eval()
    x = torch.randn(1, 3, 32, 96)
    opt = passes.optimize(model, passes=["fuse-conv-pool"], example_inputs=(x,), measure=False)
    rows = [why for _, why in explain_winograd(opt.graph, "llvm", LANES)]
    assert len(rows) == 3
    assert rows[0].endswith("pool: in the blocked conv's epilogue (one kernel, only the pooled output stored)")
    assert "pool: in the blocked conv's epilogue, from a band of conv rows per task (overlapping" in rows[1]
    assert "pool: after the blocked conv (a Relax op): a window row of 21 pixels" in rows[2]


def test_cuda_keeps_its_own_conv_pool_kernel():
    """On cuda a conv2d_pool is one thread per pooled output (``schedule_gpu``), never the CPU's blocked layout."""
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)).eval()
    opt = passes.optimize(model, passes=["fuse-conv-pool"], example_inputs=(torch.randn(1, 8, 16, 16),),
                          measure=False)
    cuda = _pool_choice(opt.graph, "cuda", 16)
    assert cuda.kernel == "conv" and not cuda.spec.pool_epilogue and not cuda.spec.blocked
    assert _pool_choice(opt.graph).spec.pool_epilogue


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("act, pool", [(nn.ReLU(), nn.MaxPool2d(2)), (nn.SiLU(), nn.AvgPool2d(2)),
                                       (nn.ReLU(), nn.MaxPool2d(3, 2, 1))], ids=repr)
def test_low_precision_storage(act, pool, dtype):
    """bf16/fp16 data and weights, fp32 accumulation and pooling, one rounding at the store: within twice PyTorch's
    own low-precision error plus the dtype's unit roundoff of the output scale."""
    model = nn.Sequential(nn.Conv2d(5, 16, 3, padding=1), act, pool).eval()
    x = torch.randn((1, 5, 11, 14), generator=torch.Generator().manual_seed(5))
    opt = passes.optimize(model, passes=["fuse-conv-pool", f"mixed-precision{{dtype={dtype}}}"],
                          example_inputs=(x,), measure=False)
    choice = _pool_choice(opt.graph)
    assert choice.spec.pool_epilogue and choice.spec.dtype == ("bfloat16" if dtype == "bf16" else "float16")
    low = torch.bfloat16 if dtype == "bf16" else torch.float16
    with torch.no_grad():
        expected = model(x)
        torch_error = (model.to(low)(x.to(low)).float() - expected).abs().max().item()
    error = (opt(x).float() - expected).abs().max().item()
    assert error <= 2 * torch_error + UNIT_ROUNDOFF[dtype] * expected.abs().max().item()


def test_nan_propagates_through_the_epilogue_max():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.MaxPool2d(2)).eval()
    x = torch.randn(1, 3, 8, 8)
    x[0, 0, 0, 0] = x[0, 2, 5, 6] = float("nan")
    opt = passes.optimize(model, passes=["fuse-conv-pool"], example_inputs=(x,), measure=False)
    assert _pool_choice(opt.graph).spec.pool_epilogue
    with torch.no_grad():
        expected = model(x)
    assert torch.isnan(expected).sum() == 16  # two windows x 8 channels
    torch.testing.assert_close(torch.as_tensor(opt(x)), expected, equal_nan=True, rtol=1e-5, atol=1e-5)


def test_compiles_for_avx512():
    """lanes 16 (AVX-512): 16-channel vectors, 2 vectors x 5 windows of 2 conv pixels (20 of the 32 zmm registers
    accumulate, within the 24 of ``accumulator_vectors``; 14 pooled columns computed as 15), compiled to zmm FMAs."""
    spec = _spec(16, 32, (28, 28), lanes=16)
    assert spec.oc_vector == 16 and default_tile(spec) == Tile(oc_block=32, rows=1, cols=5)
    func = conv_kernel(spec, "llvm").with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target={"kind": "llvm", "mcpu": "skylake-avx512"})
    asm = lib.mod.imports[0].inspect_source("asm") if lib.mod.imports else lib.mod.inspect_source("asm")
    fmas = [line for line in asm.splitlines() if "vfmadd" in line]
    assert fmas and all("zmm" in line for line in fmas)


@pytest.mark.parametrize("layers, shape, kernel", [
    # ResNet's stem: the banded epilogue kernel stores NCHW[b]c itself
    ((nn.Conv2d(3, 32, 7, stride=2, padding=3), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1)),
     (1, 3, 40, 36), "conv"),
    # VGG's conv + 2x2 pool where Winograd takes the conv: NCHW from the pool, laid out after
    ((nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)), (1, 32, 36, 36), "winograd"),
], ids=["stem-epilogue", "winograd-then-pool"])
def test_conv_pool_stored_blocked_for_a_blocked_conv_matches_pytorch(layers, shape, kernel):
    """alter-layout stores a conv2d_pool blocked where a blocked conv reads it (``test_alter_layout``); each CPU
    path of the conv2d_pool gives the same values in that layout."""
    import passes

    model = nn.Sequential(*layers, nn.Conv2d(32, 32, 1), nn.ReLU()).eval()
    gen = _seed_batch_norms(model, 3)
    x = torch.randn(shape, generator=gen)
    opt = passes.optimize(model, example_inputs=(x,), measure=False)
    pool = _pool_node(opt.graph)
    assert opt.graph.nodes[pool]["attrs"]["out_layout"] == f"NCHW{LANES}c"
    assert _pool_choice(opt.graph).kernel == kernel
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(opt(x)), model(x), rtol=1e-5, atol=1e-5)
