"""The tensor-core conv for cuda (``backends/tvm/cuda_conv.py``): which convs take it, the generated WMMA CUDA
(nvcc for sm_90), and its numerics on CPU threads (``tests/cuda_emulator.py`` emulates ``nvcuda::wmma``) against
PyTorch's conv2d."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import passes
from backends.tvm import cuda_conv, cuda_source
from backends.tvm.kernels import ConvSpec
from backends.tvm.select import explain_winograd, select_kernels
from tests.helpers import assert_nvcc_accepts

pytestmark = [pytest.mark.tvm, pytest.mark.cuda]

UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


class Block(nn.Module):
    """Stem (3 channels, stride 2), a 3x3 conv with a residual add + relu, a 1x1 conv, a depthwise conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.point = nn.Conv2d(16, 24, 1)
        self.depthwise = nn.Conv2d(24, 24, 3, padding=1, groups=24)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(self.conv(y) + y)
        return self.depthwise(self.point(y))


def _optimize(dtype: str | None):
    torch.manual_seed(0)
    pipeline = ["default"] + ([f"mixed-precision{{dtype={'fp16' if dtype == 'float16' else 'bf16'}}}"] if dtype
                              else [])
    return passes.optimize(Block().eval(), passes=pipeline, target="cuda", example_inputs=(torch.randn(1, 3, 12, 12),),
                           measure=False)


def _kernels(opt) -> dict[str, str]:
    return {node: choice.kernel for node, choice in select_kernels(opt.graph, "cuda").choices.items()
            if opt.graph.nodes[node]["op"] in ("conv2d", "conv2d_pool")}


def test_fp16_convs_run_on_tensor_cores_and_the_source_compiles_for_sm_90(tmp_path):
    opt = _optimize("float16")
    kernels = _kernels(opt)
    assert sorted(kernels.values()) == ["relax", "tensor_core", "tensor_core", "tensor_core"], kernels
    source = cuda_source(opt.compiled)
    names = re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(conv2d_tensor_core_\w+)\(", source)
    assert len(set(names)) == 3, names
    assert "nvcuda::wmma::mma_sync" in source and "fragment<nvcuda::wmma::matrix_a, 16, 16, 16, half" in source
    assert_nvcc_accepts(source, tmp_path)


def test_bf16_source_uses_bf16_fragments_and_compiles_for_sm_90(tmp_path):
    source = cuda_source(_optimize("bfloat16").compiled)
    assert "fragment<nvcuda::wmma::matrix_b, 16, 16, 16, nv_bfloat16" in source
    assert_nvcc_accepts(source, tmp_path)


def test_fp32_default_keeps_the_simt_path_without_wmma():
    opt = _optimize(None)
    assert "tensor_core" not in _kernels(opt).values()
    assert "wmma" not in cuda_source(opt.compiled)


def test_explain_names_the_tensor_core_convs_and_why_the_others_are_not():
    rows = dict(explain_winograd(_optimize("float16").graph, "cuda"))
    decisions = sorted(rows.values())
    assert decisions.count("tensor cores (implicit GEMM, WMMA)") == 3
    assert any(d.startswith("SIMT kernel: groups=24") for d in decisions), decisions
    fp32 = set(dict(explain_winograd(_optimize(None).graph, "cuda")).values())
    assert any("float32 storage: tensor cores need float16/bfloat16" in d for d in fp32), fp32


def _spec(dtype="float16", **kw) -> ConvSpec:
    base = dict(in_shape=(1, 16, 8, 8), weight_shape=(16, 16, 3, 3), stride=(1, 1), padding=(1, 1),
                dilation=(1, 1), groups=1, has_bias=True, dtype=dtype)
    return ConvSpec(**{**base, **kw})


def test_refusal_depthwise_and_grouped_convs_stay_on_simt():
    assert cuda_conv.refusal(_spec(groups=16, weight_shape=(16, 1, 3, 3))).startswith("groups=16")
    assert cuda_conv.refusal(_spec(groups=2, weight_shape=(16, 8, 3, 3))).startswith("groups=2")


def test_refusal_float32_names_mixed_precision_and_tf32():
    assert "run mixed-precision" in cuda_conv.refusal(_spec("float32"))


def test_refusal_fused_pool():
    assert cuda_conv.refusal(_spec(pool="max", pool_kernel=(2, 2), pool_stride=(2, 2))).startswith("a fused pool")


def test_k_and_oc_not_multiples_of_16_are_padded_not_refused():
    """K = 3*3*3 = 27 and OC = 20: padded to the tile with zero weights (and the A gather predicated to zero)."""
    spec = _spec(in_shape=(1, 3, 9, 9), weight_shape=(20, 3, 3, 3))
    assert cuda_conv.refusal(spec) is None
    shape = cuda_conv.gemm_shape(spec)
    assert (shape.k, shape.k_pad, shape.n, shape.n_pad) == (27, 32, 20, 64)
    weight = np.random.default_rng(0).standard_normal((20, 3, 3, 3)).astype(np.float32)
    packed = cuda_conv.pack_weight(spec, weight)
    assert packed.shape == (32, 64) and not packed[27:].any() and not packed[:, 20:].any()
    assert packed[(2 * 3 + 1) * 3 + 2, 5] == weight[5, 2, 1, 2]


def _low(t: torch.Tensor, dtype: str) -> np.ndarray:
    t = t.to(getattr(torch, dtype)).contiguous()
    return t.view(torch.int16).numpy().view(np.uint16).copy() if dtype == "bfloat16" else t.numpy().copy()


def _float(a: np.ndarray, dtype: str) -> torch.Tensor:
    return (torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if dtype == "bfloat16" else
            torch.from_numpy(a)).float()


CASES = {  # (N, C, H, W), (OC, KH, KW), stride, padding, bias, residual, activation, dilation
    "stem_3ch_stride2_oc20_residual_relu": ((1, 3, 9, 9), (20, 3, 3), 2, 1, True, True, "relu", 1),
    "1x1_two_m_tiles_no_bias": ((2, 24, 7, 5), (40, 1, 1), 1, 0, False, False, "none", 1),
    "3x3_three_k_stages_two_oc_tiles": ((1, 8, 6, 6), (72, 3, 3), 1, 1, True, False, "relu6", 1),
    "3x3_dilation2_padding2": ((1, 5, 7, 8), (16, 3, 3), 1, 2, True, False, "none", 2),
}


@pytest.mark.parametrize("case,dtype", [(case, "float16") for case in sorted(CASES)] + [
    ("stem_3ch_stride2_oc20_residual_relu", "bfloat16"), ("3x3_three_k_stages_two_oc_tiles", "bfloat16")])
def test_generated_cuda_matches_pytorch_on_cpu_threads(case, dtype, tmp_path):
    """The kernel's CUDA C run by the emulator (WMMA emulated exactly) against torch's fp32 conv2d; the bound is
    twice PyTorch's own error in ``dtype`` (its conv of the rounded tensors) plus one unit roundoff of the scale,
    as the fuzz oracle: products of fp16/bf16 values are exact and the kernel sums in fp32, so it is held to the
    rounding of its inputs and output. Outputs are poisoned with NaN first."""
    import tvm

    from backends.tvm.target import make_target
    from tests import cuda_emulator

    if not cuda_emulator.available():
        pytest.skip("g++ not installed")
    in_shape, (oc, kh, kw), stride, padding, bias, residual, activation, dilation = CASES[case]
    spec = ConvSpec(in_shape=in_shape, weight_shape=(oc, in_shape[1], kh, kw), stride=(stride, stride),
                    padding=(padding, padding), dilation=(dilation, dilation), groups=1, has_bias=bias,
                    activation=activation, residual=residual, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(in_shape, generator=generator), torch.randn(spec.weight_shape, generator=generator) * 0.3
    b = torch.randn(oc, generator=generator) if spec.has_bias else None
    r = torch.randn(spec.conv_shape, generator=generator)
    act = {"relu": torch.relu, "relu6": lambda v: v.clamp(0, 6), "none": lambda v: v}[activation]

    def conv(x, w, b, r, precision=torch.float32):
        y = nn.functional.conv2d(x.to(precision), w.to(precision), None if b is None else b.to(precision), stride,
                                 padding, dilation)
        return act(y + r.to(precision) if residual else y).float()

    reference = conv(x, w, b, r)
    theirs = (conv(x, w, b, r, getattr(torch, dtype)) - reference).abs().max().item()
    arrays = {"data": _low(x, dtype), "weight": _low(torch.from_numpy(cuda_conv.pack_weight(spec, w.numpy())), dtype),
              "epilogue": _low(torch.full(spec.conv_shape, float("nan")), dtype)}
    if b is not None:
        arrays["bias"] = b.numpy().astype("float32")  # float32 at any storage dtype (kernels._epilogue_inputs)
    if residual:
        arrays["residual"] = _low(r, dtype)
    func = cuda_conv.conv_kernel(spec).with_attr("global_symbol", "k")
    source = tvm.tirx.build(tvm.IRModule({"k": func}), target=make_target("cuda")).imports[0].inspect_source()
    tile, shape = cuda_conv.DEFAULT_TILE, cuda_conv.gemm_shape(spec)
    cuda_emulator.emulate(source, arrays, (shape.m_pad // tile.block_m, shape.n_pad // tile.block_n),
                          (cuda_conv.WARP, tile.warps_m * tile.warps_n), tmp_path)
    ours = (_float(arrays["epilogue"], dtype) - reference).abs().max().item()
    bound = 2 * theirs + UNIT_ROUNDOFF[dtype] * reference.abs().max().item()
    assert ours <= bound, (ours, theirs, bound)


def test_a_tile_in_the_tuning_table_sizes_the_kernel():
    """``lower(graph, tiles={spec: TensorCoreTile(...)})`` builds that tile (what a tuner would hand in): the stem's
    packed weight (K = 27, OC = 16) is (32, 16) with a one-fragment block instead of the default (32, 64)."""
    from backends.tvm.lower import lower

    graph = _optimize("float16").graph
    choices = select_kernels(graph, "cuda").choices
    stem = next(n for n, c in choices.items() if c.kernel == "tensor_core" and c.spec.in_shape[1] == 3)
    tile = cuda_conv.TensorCoreTile(warps_m=1, warps_n=1, frag_m=1, frag_n=1, chunk=1)
    for tiles, packed in (({}, (32, 64)), ({choices[stem].spec: tile}, (32, 16))):
        func = lower(graph, "cuda", tiles=tiles)[f"conv2d_tensor_core_{stem}"]
        assert tuple(int(d) for d in func.params[1].ty.shape) == packed
